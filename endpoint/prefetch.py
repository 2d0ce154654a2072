"""How many tasks of a function may wait behind a worker's running task: the prefetch policy the
endpoint's Scheduler composes (sans-IO; it learns from the run times workers report).

Each worker holds a FIFO of tasks, the head running. A task may sit at depth ``d`` behind the head
only if its function's prefetch allows it. The prefetch adapts to the function's measured run
time so that about ``prefetch_target_ms`` of work is queued ahead of a worker: many for no-ops (so
batches fill), one for short tasks, none for tasks longer than ``no_prefetch_above_ms`` (a round
trip is noise next to them; kept at the endpoint, any idle worker can take them and a cancel acts
at once). Functions not yet measured get ``min_prefetch`` (0 by default: the first results arrive
within one task's time and set the real depth).
"""

from __future__ import annotations

import math


class Prefetch:
    def __init__(
        self,
        target_ms: float = 2.0,
        min_prefetch: int = 0,
        max_prefetch: int = 64,
        no_prefetch_above_ms: float = 100.0,
    ):
        self.target_s = target_ms / 1000.0
        self.min_prefetch, self.max_prefetch = min_prefetch, max_prefetch
        self.no_prefetch_above_s = no_prefetch_above_ms / 1000.0
        self.avg_task_s: dict[str, float] = {}  # function digest -> EWMA of its run time

    def depth(self, digest: str) -> int:
        """How many tasks of this function may wait behind a worker's running task."""
        avg = self.avg_task_s.get(digest)
        if avg is None:
            return self.min_prefetch
        if avg > self.no_prefetch_above_s:
            return 0
        return min(self.max_prefetch, max(1, math.ceil(self.target_s / max(avg, 1e-6))))

    def learn(self, digest: str, seconds: float) -> None:
        """Update the function's mean run time (an EWMA), which sets its prefetch depth."""
        avg = self.avg_task_s.get(digest)
        self.avg_task_s[digest] = seconds if avg is None else 0.8 * avg + 0.2 * seconds
