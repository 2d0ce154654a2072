"""A real ``globus_compute_sdk.Client`` wired to this user's dlhub manager (issue 13, item 5)::

    from dlhub.compat.globus_compute import client, endpoint_id
    gcc = client()
    fid = gcc.register_function(square)
    tid = gcc.run(7, endpoint_id=endpoint_id("local"), function_id=fid)
    gcc.get_result(tid)  # 49 (TaskPending until then)

The manager's Globus Compute API URL comes from ``$DLHUB_HOME/manager/globus_compute.json``
(written by ``dlhub-manager serve --globus-compute-port``, which ``dlhub up`` runs), the token from
the client config (``$DLHUB_TOKEN`` or ``$DLHUB_HOME/config.json``). No Globus Auth call is made.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dlhub.executor.config import ClientConfig, dlhub_home
from dlhub.protocol.gc_serialize import endpoint_uuid, servable_uuid


def endpoint_id(name: str) -> str:
    """The Globus Compute UUID of the dlhub endpoint ``name`` (stable: uuid5 of its name)."""
    return endpoint_uuid(name)


def servable_id(ref: str) -> str:
    """The Globus Compute function UUID of the published servable ``owner/name`` (stable; it
    calls the latest ready version): ``gcc.run(x, endpoint_id=..., function_id=servable_id(ref))``."""
    owner, _, name = ref.partition(":")[0].partition("/")
    if not owner or not name:
        raise ValueError(f"expected a servable reference owner/name, got {ref!r}")
    return servable_uuid(owner, name)


def service_url(home: str | Path | None = None) -> str:
    """The Globus Compute API URL of the manager under ``home`` ($DLHUB_HOME)."""
    env = os.environ.get("DLHUB_GLOBUS_COMPUTE_URL")
    if env:
        return env
    path = dlhub_home(home) / "manager" / "globus_compute.json"
    try:
        return json.loads(path.read_text())["url"]
    except (OSError, ValueError, KeyError):
        raise RuntimeError(
            f"no Globus Compute API found ({path} is missing): start the manager with `dlhub up` "
            "or `dlhub-manager serve --globus-compute-port PORT`, or set DLHUB_GLOBUS_COMPUTE_URL"
        ) from None


def client(home: str | Path | None = None, url: str | None = None, token: str | None = None, **kwargs: Any):
    """A ``globus_compute_sdk.Client`` that talks to the dlhub manager with the dlhub token."""
    try:
        import globus_sdk
        from globus_compute_sdk import Client
        from globus_compute_sdk.sdk.client import _ComputeWebClient
    except ImportError as exc:  # pragma: no cover - the optional extra
        raise ImportError("install the extra: pip install 'dlhub[globus-compute]'") from exc
    token = token or ClientConfig.resolve(home=home).token
    authorizer = globus_sdk.AccessTokenAuthorizer(token)
    kwargs.setdefault("do_version_check", False)
    gcc = Client(environment="local", authorizer=authorizer, **kwargs)
    base = (url or service_url(home)).rstrip("/")
    if base != "http://localhost:5000":  # the SDK has no base-URL argument: its web client is replaced
        gcc._compute_web_client = _ComputeWebClient(base_url=base, authorizer=authorizer)
    return gcc
