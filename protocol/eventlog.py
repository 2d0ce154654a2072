"""An append-only log of a loop's events, to replay a bug: one writer and one reader for both loops.

    Router (manager/events.py)      --EventLog.append(event)-->              file (pickle frames)
    Scheduler (endpoint/events.py)  --EventLog.append((method, events))-->     |
    replay (manager/events.replay, endpoint/replay.replay) <--read_log(path)----'

Each record is one pickle frame, written whole and flushed, so a process that dies leaves a log
whose last whole record is read and a torn tail is dropped. The file is created 0600 (it holds
task payloads and user names). The log is a developer's debugging aid, off unless asked for
(``DLHUB_ROUTER_EVENT_LOG``, ``DLHUB_SCHEDULER_LOG``): pickle is fine here because a replay reads
a private file a dlhub process of the same user wrote, never anything from the network: do not
replay a log from someone else.

What a record is belongs to each side (the Router logs one event a record, the Scheduler one
``(method, events)`` call a record); this module only frames them.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["EventLog", "read_log"]


class _Pickler(pickle.Pickler):
    """Large payloads arrive as memoryviews of ZeroMQ frames (``messages.pack_frames``), which
    pickle refuses: logged as the bytes they hold, so a replay sees the same values."""

    dispatch_table = {memoryview: lambda view: (bytes, (view.tobytes(),))}


class EventLog:
    """Appends records (anything picklable) to ``path``, one pickle frame each, flushed at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab")

    def append(self, record: Any) -> None:
        # one write() of the whole frame: a concurrent reader or a crash sees whole frames or a torn tail
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(record)
        self._file.write(buffer.getbuffer())
        self._file.flush()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: str | Path) -> Iterator[Any]:
    """The records of a log written by :class:`EventLog`, in order; a log cut short (its writer
    died mid-record) ends at its last whole record."""
    with open(path, "rb") as f:
        while True:
            try:
                yield pickle.load(f)  # noqa: S301 - the process's own file, written by EventLog
            except (EOFError, pickle.UnpicklingError):
                return
