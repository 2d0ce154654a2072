"""The client config in ``$DLHUB_HOME/config.json``: where the manager is and our token.

``dlhub up`` writes it; ``Executor()`` and ``Client()`` read it when no address or token is
given. Explicit arguments win over environment variables (``DLHUB_MANAGER``, ``DLHUB_TOKEN``),
which win over the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


def dlhub_home(home: str | Path | None = None) -> Path:
    return Path(home or os.environ.get("DLHUB_HOME") or Path.home() / ".dlhub").expanduser()


@dataclass(frozen=True)
class ClientConfig:
    manager: str
    token: str
    home: Path

    @classmethod
    def resolve(
        cls, manager: str | None = None, token: str | None = None, home: str | Path | None = None
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
        return cls(manager=manager, token=token or "", home=root)


def write_client_config(home: Path, manager: str, token: str, **extra: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"manager": manager, "token": token, **extra}, f, indent=2)
    return path
