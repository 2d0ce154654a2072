"""What a manager starts with (:class:`ManagerConfig`) and what it tells others once it listens
(``manager.json`` in its home: its bound addresses, CURVE key and pid).

Apart from the broker loop so that the settings and their checks read in one place, and so that
code that only needs a manager's settings or its published addresses need not import the loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlhub.protocol.curve import is_loopback

from .fair_share import MAX_INFLIGHT_PER_USER
from .routing import MAX_OPEN_TASKS_PER_USER

ENDPOINT_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # as an endpoint's config.yaml requires


@dataclass(frozen=True)
class ManagerConfig:
    home: Path
    db_url: str | None = None  # default: SQLite file under home
    host: str = "127.0.0.1"
    client_port: int = 0  # 0: pick a free port (written to manager.json)
    endpoint_port: int = 0
    payload_limit_bytes: int = 256 * 1024 * 1024
    endpoint_timeout_s: float = 30.0
    admin_user: str = "admin"
    rest_port: int | None = 0  # REST API port (0: any free port; None: no REST API)
    result_cache_mb: float = 256.0  # results of deterministic servables (0: no cache)
    result_cache_ttl_s: float | None = None  # None: entries live until evicted
    persist_result_cache: bool = False  # keep the result cache across restarts (in the database)
    default_endpoint: str | None = None  # for publishes and REST runs that name no endpoint
    # ZeroMQ PLAIN (token as password, no encryption) instead of CURVE: only on a loopback host
    insecure_loopback: bool = False
    tls_cert: str | None = None  # REST over HTTPS: certificate and key files (PEM) for uvicorn
    tls_key: str | None = None
    max_open_tasks_per_user: int = MAX_OPEN_TASKS_PER_USER  # quota: queued + running, admins exempt
    # fair share: a user's tasks in flight on one endpoint (the rest wait at the manager, queued)
    max_inflight_per_user: int = MAX_INFLIGHT_PER_USER

    def __post_init__(self) -> None:
        if self.insecure_loopback and not is_loopback(self.host):
            raise ValueError(
                f"binding {self.host} without CURVE is refused: links off this host must be encrypted; "
                "drop --insecure-loopback (CURVE is the default) or bind 127.0.0.1"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both (PEM files) or neither")
        for key in ("client_port", "endpoint_port"):
            value = getattr(self, key)
            if not isinstance(value, int) or not 0 <= value < 65536:
                raise ValueError(f"{key} must be a port number 0-65535, got {value!r}")
        if self.payload_limit_bytes <= 0:
            raise ValueError(f"payload_limit_bytes must be positive, got {self.payload_limit_bytes!r}")
        if not isinstance(self.max_open_tasks_per_user, int) or self.max_open_tasks_per_user < 1:
            raise ValueError(
                f"max_open_tasks_per_user must be a positive integer, got {self.max_open_tasks_per_user!r}"
            )
        if not isinstance(self.max_inflight_per_user, int) or self.max_inflight_per_user < 1:
            raise ValueError(
                f"max_inflight_per_user must be a positive integer, got {self.max_inflight_per_user!r}"
            )
        if self.endpoint_timeout_s <= 0:
            raise ValueError(f"endpoint_timeout_s must be positive, got {self.endpoint_timeout_s}")
        if self.result_cache_mb < 0:
            raise ValueError(f"result_cache_mb must not be negative, got {self.result_cache_mb}")
        if self.result_cache_ttl_s is not None and self.result_cache_ttl_s <= 0:
            raise ValueError(f"result_cache_ttl_s must be positive, got {self.result_cache_ttl_s}")
        if self.default_endpoint is not None and not re.fullmatch(ENDPOINT_NAME, self.default_endpoint):
            raise ValueError(
                f"default_endpoint must be an endpoint name like 'local', got {self.default_endpoint!r}"
            )

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{Path(self.home) / 'dlhub.db'}"


def write_manager_info(home: Path, info: dict[str, Any]) -> None:
    """Write ``manager.json`` whole (a temporary file, then a rename): a reader never sees half."""
    tmp = home / "manager.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(home / "manager.json")
