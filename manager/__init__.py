"""dlhub.manager: the broker loop, task store, users and (later) the repository and REST API."""

from .broker import Manager, ManagerConfig

__all__ = ["Manager", "ManagerConfig"]
