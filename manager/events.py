"""What goes into the manager's Router and what comes out: typed, frozen events and instructions.

    broker loop: frames, ticks, I/O outcomes --> events --> Router.handle(*events)
                                                               |
                 sockets, task store, callbacks <-- instructions

Events carry everything the Router needs, the time included (the Router reads no clock when
driven through :meth:`Router.handle`); instructions say what to do and the broker does it: send
a message, hand writes to the task store (which only enqueues), call back an internal task's
owner. Events can be logged (``DLHUB_ROUTER_EVENT_LOG``) and replayed into a fresh Router to
reproduce a state (:func:`replay`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlhub.protocol import messages as m
from dlhub.protocol.eventlog import EventLog as _EventLog
from dlhub.protocol.eventlog import read_log

# ---- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """Base of the Router's events."""


@dataclass(frozen=True, slots=True)
class ClientSubmitted(Event):
    identity: bytes  # the client's routing identity (empty for the manager's own tasks)
    user: str
    session: str
    msg: m.Submit
    now: float
    callback: Callable[[list], None] | None = field(default=None, compare=False)  # internal tasks


@dataclass(frozen=True, slots=True)
class ClientCancelled(Event):
    identity: bytes
    task_ids: list[bytes]
    user: str | None  # None: an admin


@dataclass(frozen=True, slots=True)
class CodePut(Event):
    digest: str
    blob: bytes


@dataclass(frozen=True, slots=True)
class CodeLoaded(Event):
    """Code blobs or packages read off the loop, to keep in memory."""

    blobs: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class EndpointRegistered(Event):
    identity: bytes
    hello: m.Hello
    owner: str | None
    now: float


@dataclass(frozen=True, slots=True)
class EndpointResultsArrived(Event):
    identity: bytes
    results: list[list]
    now: float
    uncacheable: frozenset = frozenset()  # task ids whose result must not be shared or cached


@dataclass(frozen=True, slots=True)
class EndpointStatesArrived(Event):
    identity: bytes
    updates: list[list]


@dataclass(frozen=True, slots=True)
class EndpointHeartbeat(Event):
    identity: bytes
    info: dict
    now: float


@dataclass(frozen=True, slots=True)
class EndpointCancelRefused(Event):
    identity: bytes
    msg: m.CancelRefused


@dataclass(frozen=True, slots=True)
class EndpointLeft(Event):
    """The endpoint said goodbye (a clean stop)."""

    identity: bytes


@dataclass(frozen=True, slots=True)
class Tick(Event):
    now: float


@dataclass(frozen=True, slots=True)
class LoopLoad(Event):
    """The fraction of wall time the loop spent working (not waiting in poll) since the last
    sample: sizes the fair-share window while users compete (:mod:`.fair_share`)."""

    busy: float
    now: float


@dataclass(frozen=True, slots=True)
class Flush(Event):
    """The loop is about to sleep: everything held to send goes out now. ``now``: the time, when
    tasks held for fair share go at a rate (else the last event's time serves)."""

    now: float | None = None


# ---- instructions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    """Base of what the Router asks its loop to do."""


@dataclass(frozen=True, slots=True)
class Send(Instruction):
    link: str  # "client" | "endpoint"
    identity: bytes
    msg: m.Message


@dataclass(frozen=True, slots=True)
class PersistReceived(Instruction):
    """New task rows; ``acks`` are (link, identity, task id) to acknowledge once committed (link
    "client", "client-again" for a resent task's, whose ack the broker never skips, or "endpoint")."""

    rows: list[dict[str, Any]]
    acks: list[tuple[str, bytes, bytes]]

    def apply(self, store: Any) -> None:
        store.received(self.rows, self.acks)


@dataclass(frozen=True, slots=True)
class PersistUpdates(Instruction):
    changes: list[tuple[bytes, dict[str, Any]]]
    acks: list[tuple[str, bytes, bytes]] = field(default_factory=list)

    def apply(self, store: Any) -> None:
        store.update(self.changes, self.acks)


@dataclass(frozen=True, slots=True)
class PersistCode(Instruction):
    digest: str
    blob: bytes

    def apply(self, store: Any) -> None:
        store.put_code(self.digest, self.blob)


Persist = PersistReceived | PersistUpdates | PersistCode


@dataclass(frozen=True, slots=True)
class Notify(Instruction):
    """Give an internal task's result to its callback (a REST run, a publish's verification)."""

    callback: Callable[[list], None]
    result: list


# ---- the event log -----------------------------------------------------------------------------


class EventLog(_EventLog):
    """Appends each event handled to a file, one record an event (callbacks left out: the
    replayed run has no one to call back), to replay; the framing is :mod:`dlhub.protocol.eventlog`'s."""

    def write(self, event: Event) -> None:
        if isinstance(event, ClientSubmitted) and event.callback is not None:
            event = dataclasses.replace(event, callback=None)
        self.append(event)


def read_events(path: str | Path) -> Iterator[Event]:
    """The events of a log written by :class:`EventLog`, in order (a log cut short ends at its
    last whole event)."""
    return read_log(path)


def replay(path: str | Path, router: Any) -> list[Instruction]:
    """Feed a logged run into a fresh ``router``; returns every instruction it gave."""
    out: list[Instruction] = []
    for event in read_events(path):
        out.extend(router.handle(event))
    return out
