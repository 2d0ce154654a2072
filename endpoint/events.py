"""What goes into the endpoint's Scheduler and what comes out: typed, frozen records.

    loop --events--> Scheduler.handle(*events) --instructions--> loop (sends, logs, kills)

Events say what happened, each with the loop's clock reading ``now`` (``time.monotonic()``; the
Scheduler reads no clock); instructions say what to do, and the Scheduler does no I/O. Records
and messages inside them are the wire's (``protocol.messages``). The fields are what the
Scheduler needs, nothing of the sockets: the daemon turns messages into events and instructions
into messages.

An event log (``DLHUB_SCHEDULER_LOG=path``, off by default) holds every event handled, so
:func:`dlhub.endpoint.replay.replay` rebuilds a Scheduler's state from it (to reproduce a bug).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlhub.protocol import messages as m
from dlhub.protocol.eventlog import EventLog as _EventLog
from dlhub.protocol.eventlog import read_log as _read_log

# ---- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    now: float  # the loop's monotonic clock when it happened


@dataclass(frozen=True, slots=True)
class TasksArrived(Event):
    records: list  # task records (m.task_record); ids already held are ignored


@dataclass(frozen=True, slots=True)
class CodeArrived(Event):
    """The manager's answer to one code request: what it lacks is absent."""

    blobs: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class CodeFound(Event):
    """Code found without asking (servable packages kept on disk): settles no request."""

    blobs: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class ManagerSession(Event):
    """The manager welcomed us (again): code requests of an earlier session are asked again."""


@dataclass(frozen=True, slots=True)
class ServableLearned(Event):
    """A servable package's record read: its label and batching policy (None: no batching)."""

    function: str
    policy: dict[str, Any] | None
    label: str


@dataclass(frozen=True, slots=True)
class ImageUnavailable(Event):
    """A servable package names a container this endpoint cannot provide (no catalogue entry, a
    missing file, pulls not allowed, a failed pull): its tasks (verify: and servable:) fail with
    the reason, so a servable that cannot run here never becomes ``ready``."""

    package: str  # the record digest (m.package_key of its functions)
    reason: str


@dataclass(frozen=True, slots=True)
class ServableImage(Event):
    """A servable package runs inside ``image`` (its container as this endpoint resolved it, not
    a pool's own image): its calls go only to workers started inside that image, which the
    Scheduler asks pools for on demand (``StartWorker``), retiring the least recently used
    image's idle workers for room."""

    package: str  # the record digest (m.package_key of its functions)
    image: str
    fetching: bool = False  # being pulled into the image cache: no worker starts in it until
    # ImageFetched says it is there (its calls wait, as for a worker starting)


@dataclass(frozen=True, slots=True)
class ImageFetched(Event):
    """The image cache's fetch of a servable's image (at verification) finished: ``error`` None,
    workers may start in it; else every servable that runs in it fails with the reason."""

    image: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ImageFailed(Event):
    """Workers do not start inside a servable's image (a pool said so): the servables that run
    in it fail with the reason (as a failed fetch)."""

    image: str
    reason: str


@dataclass(frozen=True, slots=True)
class PoolJoined(Event):
    identity: bytes
    pool_id: str
    block_id: str
    info: dict
    drain_in_s: float | None = None  # give it no new work after this long (walltime ahead)


@dataclass(frozen=True, slots=True)
class WorkerJoined(Event):
    identity: bytes
    worker_id: str
    pool_id: str
    pool_name: str = "default"
    image: str | None = None  # the servable image it runs in (None: its pool's own)


@dataclass(frozen=True, slots=True)
class WorkerResults(Event):
    identity: bytes
    results: list  # result records
    info: dict | None = None  # servable loads, evictions, warm set


@dataclass(frozen=True, slots=True)
class WorkerDied(Event):
    worker_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class PoolHeartbeat(Event):
    identity: bytes
    pool_id: str
    info: dict | None = None


@dataclass(frozen=True, slots=True)
class PoolLost(Event):
    """A block ended or was scaled in: its tasks are retried."""

    pool_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class PoolRefused(Event):
    """A named pool cannot start workers: its tasks fail with ``error``."""

    pool_name: str
    error: list


@dataclass(frozen=True, slots=True)
class CancelRequested(Event):
    task_ids: list


@dataclass(frozen=True, slots=True)
class PolicyChanged(Event):
    policy: Any  # protocol.policy.Policy


@dataclass(frozen=True, slots=True)
class Paused(Event):
    """Draining for shutdown: nothing new is dispatched."""


@dataclass(frozen=True, slots=True)
class Tick(Event):
    """A heartbeat: missed pool heartbeats, overrun tasks, and running states (wall clock)."""

    wall: float


@dataclass(frozen=True, slots=True)
class Idle(Event):
    """The loop found nothing to read: report running tasks (off the hot path)."""

    wall: float


# ---- instructions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendToWorker:
    identity: bytes  # a worker's or a pool's
    message: m.Message


@dataclass(frozen=True, slots=True)
class SendResults:
    results: list
    info: dict = field(default_factory=dict)  # {"uncacheable": [hex task ids]} (see Results)


@dataclass(frozen=True, slots=True)
class SendStates:
    updates: list  # [task id, state, wall time]


@dataclass(frozen=True, slots=True)
class RequestCode:
    digests: list[str]


@dataclass(frozen=True, slots=True)
class RefuseCancel:
    task_ids: list
    reason: str


@dataclass(frozen=True, slots=True)
class KillWorker:
    pool_identity: bytes
    worker_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class LogFailures:
    failures: list  # (task id, function, worker identity or None, error)


@dataclass(frozen=True, slots=True)
class PoolDropped:
    """A pool missed its heartbeats: dropped, its tasks re-queued (for the log)."""

    pool_id: str


Instruction = (
    SendToWorker
    | SendResults
    | SendStates
    | RequestCode
    | RefuseCancel
    | KillWorker
    | LogFailures
    | PoolDropped
)


# ---- the event log -------------------------------------------------------------------------------


class EventLog(_EventLog):
    """Appends each call's events to ``path`` as one ``(method, events)`` record (``method``:
    "handle", which dispatches, or "apply"): a debugging aid, off unless asked for; the file is
    the endpoint's own (0600) and framed by :mod:`dlhub.protocol.eventlog`."""

    def write(self, method: str, events: tuple[Event, ...]) -> None:
        self.append((method, events))


def read_log(path: str | Path) -> Iterator[tuple[str, tuple[Event, ...]]]:
    """A log's calls, ``(method, events)`` in order (a log cut short ends at its last whole one)."""
    return _read_log(path)
