"""dlhub.protocol: the contract every dlhub process speaks.

Versioned wire messages with typed task/result records (:mod:`.messages`) and the frames of their
large payloads (:mod:`.frames`), the user-payload serializer registry (:mod:`.serialize`) and its
out-of-band pickle5 payload (:mod:`.oob`), the typed errors with their wire record
(:mod:`.errors`), the search parameters shared by REST, client and CLI (:mod:`.search`), the loops'
event-log framing (:mod:`.eventlog`), CurveZMQ helpers (:mod:`.curve`), endpoint policies
(:mod:`.policy`), private files (:mod:`.private`), the servable record (:mod:`.servable`), the
checks of what endpoints and pools report (:mod:`.reports`) and the loops' garbage-collection
schedule (:mod:`.loopgc`).
Depends on the standard library and msgpack only (dill is loaded lazily by the serializers).
"""

from .errors import (
    AccessDenied,
    DLHubError,
    EndpointLost,
    EndpointRequired,
    ManagerUnreachable,
    PayloadTooLarge,
    ProtocolError,
    QuotaExceeded,
    RemoteError,
    RemoteTraceback,
    ResourceUnavailable,
    SerializationError,
    ServableLoadError,
    ServableNotFound,
    TaskCancelled,
    TaskLost,
    TaskTimeout,
    UnknownEndpoint,
    VersionMismatch,
    WorkerLost,
)
from .messages import PROTOCOL_VERSION, TASK_STATES, TERMINAL_STATES, pack, unpack

__version__ = "0.1.0"
DEFAULT_PAYLOAD_LIMIT_BYTES = 256 * 1024 * 1024

__all__ = [
    "PROTOCOL_VERSION",
    "TASK_STATES",
    "TERMINAL_STATES",
    "DEFAULT_PAYLOAD_LIMIT_BYTES",
    "pack",
    "unpack",
    "AccessDenied",
    "DLHubError",
    "EndpointLost",
    "EndpointRequired",
    "ManagerUnreachable",
    "PayloadTooLarge",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteError",
    "ResourceUnavailable",
    "RemoteTraceback",
    "SerializationError",
    "ServableLoadError",
    "ServableNotFound",
    "TaskCancelled",
    "TaskLost",
    "TaskTimeout",
    "UnknownEndpoint",
    "VersionMismatch",
    "WorkerLost",
]
