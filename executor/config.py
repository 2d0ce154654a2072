"""The client config in ``$DLHUB_HOME/config.json``: where the manager is, our token, and the
endpoint to use when none is named.

``dlhub up`` writes it; ``Executor()`` and ``Client()`` read it when no address or token is
given, and the manager's CURVE public key (``manager_key``, pinned by every connection; also
``$DLHUB_MANAGER_KEY``, or found for a manager this user runs on this host). Explicit arguments
win over environment variables (``DLHUB_MANAGER``, ``DLHUB_TOKEN``, ``DLHUB_ENDPOINT``), which
win over the file. The endpoint: ``endpoint=`` or ``$DLHUB_ENDPOINT``,
else the file's ``default_endpoint`` (``local`` after ``dlhub up``; only for the manager the file
describes), else the manager's default endpoint, else the only connected one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from dlhub.protocol.curve import find_server_key


def dlhub_home(home: str | Path | None = None) -> Path:
    return Path(home or os.environ.get("DLHUB_HOME") or Path.home() / ".dlhub").expanduser()


def endpoint_from(stored: dict, url_key: str, url: str | None) -> str | None:
    """``$DLHUB_ENDPOINT``, else the config file's ``default_endpoint`` when ``url`` is the
    address the file describes (a default for one manager means nothing to another)."""
    named = os.environ.get("DLHUB_ENDPOINT")
    if named:
        return named
    if url and str(stored.get(url_key) or "").rstrip("/") == url.rstrip("/"):
        return stored.get("default_endpoint") or None
    return None


@dataclass(frozen=True)
class ClientConfig:
    manager: str
    token: str
    home: Path
    endpoint: str | None = None  # for an Executor that names none: $DLHUB_ENDPOINT or the file's default
    manager_key: str | None = None  # the manager's CURVE public key, pinned (None: none known)
    rest_url: str | None = None  # the manager's REST API (File/DataRef arguments use it)

    @classmethod
    def resolve(
        cls,
        manager: str | None = None,
        token: str | None = None,
        home: str | Path | None = None,
        manager_key: str | None = None,
    ) -> ClientConfig:
        root = dlhub_home(home)
        stored: dict = {}
        path = root / "config.json"
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc}") from None
        manager = manager or os.environ.get("DLHUB_MANAGER") or stored.get("manager")
        token = token or os.environ.get("DLHUB_TOKEN") or stored.get("token")
        if not manager:
            raise ValueError(
                f"no dlhub manager is configured in {root}: run `dlhub up`, or give its address "
                "(Executor(manager=...) or the DLHUB_MANAGER environment variable)"
            )
        endpoint = endpoint_from(stored, "manager", manager)
        key = find_server_key(manager, manager_key, stored)
        rest_url = os.environ.get("DLHUB_REST_URL") or (
            stored.get("rest_url") if str(stored.get("manager") or "") == manager else None
        )
        return cls(manager, token or "", root, endpoint, key, rest_url)


def write_client_config(home: Path, manager: str, token: str, **extra: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"manager": manager, "token": token, **extra}, f, indent=2)
    return path
