"""dlhub.executor: the user's side — the futures ``Executor`` and the ``dlhub`` CLI."""

from dlhub.protocol import (
    AccessDenied,
    DLHubError,
    EndpointLost,
    ManagerUnreachable,
    PayloadTooLarge,
    RemoteError,
    ResourceUnavailable,
    TaskLost,
    TaskTimeout,
    UnknownEndpoint,
    WorkerLost,
)

from .client import Client, NotFoundError
from .executor import DLHubFuture, Executor

__all__ = [
    "AccessDenied",
    "Client",
    "DLHubError",
    "DLHubFuture",
    "EndpointLost",
    "Executor",
    "ManagerUnreachable",
    "NotFoundError",
    "PayloadTooLarge",
    "RemoteError",
    "ResourceUnavailable",
    "TaskLost",
    "TaskTimeout",
    "UnknownEndpoint",
    "WorkerLost",
]
