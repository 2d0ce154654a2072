"""Replay a Scheduler's event log into a fresh Scheduler, to reproduce the state it reached.

    DLHUB_SCHEDULER_LOG=/tmp/ep.events dlhub-endpoint start NAME   # the endpoint logs its events
    from dlhub.endpoint.replay import replay
    s = replay("/tmp/ep.events", pool_offers=...)                   # same settings as the endpoint

The log holds each ``handle``/``apply`` call's events with their clock readings, so the replayed
Scheduler makes the same decisions (it reads no clock and does no I/O).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .events import read_log
from .scheduler import Scheduler


def replay(path: str | Path, scheduler: Scheduler | None = None, **kwargs: Any) -> Scheduler:
    """Feed a log's calls into ``scheduler`` or a fresh Scheduler made with ``kwargs`` (which
    must match the logged one's settings) and return it."""
    s = scheduler if scheduler is not None else Scheduler(**{"clock": None, "wall_clock": None, **kwargs})
    for method, events in read_log(path):
        if method == "handle":
            s.handle(*events)
        else:
            s.apply(*events)
    return s
