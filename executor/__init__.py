"""dlhub.executor: the user's side — the futures ``Executor`` and the ``dlhub`` CLI."""

from dlhub.protocol import (
    AccessDenied,
    DLHubError,
    EndpointLost,
    EndpointRequired,
    ManagerUnreachable,
    PayloadTooLarge,
    QuotaExceeded,
    RemoteError,
    ResourceUnavailable,
    ServableLoadError,
    ServableNotFound,
    TaskLost,
    TaskTimeout,
    UnknownEndpoint,
    WorkerLost,
)

from ._progress import as_completed, progress
from .client import Client, NotFoundError, PublishError
from .dataset import Dataset
from .executor import DLHubFuture, Executor
from .refs import DataRef, File, OutputFile, OutputNotStored
from .servable import Servable

__all__ = [
    "AccessDenied",
    "Client",
    "DLHubError",
    "DLHubFuture",
    "DataRef",
    "Dataset",
    "EndpointLost",
    "EndpointRequired",
    "Executor",
    "File",
    "ManagerUnreachable",
    "NotFoundError",
    "OutputFile",
    "OutputNotStored",
    "PayloadTooLarge",
    "PublishError",
    "QuotaExceeded",
    "RemoteError",
    "ResourceUnavailable",
    "Servable",
    "ServableLoadError",
    "ServableNotFound",
    "TaskLost",
    "TaskTimeout",
    "UnknownEndpoint",
    "WorkerLost",
    "as_completed",
    "progress",
]
