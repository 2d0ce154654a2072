"""Full garbage collections when the loop says so, not whenever the allocator trips them.

CPython runs a full (generation 2) collection each time enough new long-lived objects have piled
up (a quarter of those already there). A loop holding a flood of tasks (the manager's Router, its
task store's write queue, the endpoint's queues) allocates and keeps objects so fast that full
collections come every few seconds and each pauses the loop 0.2-1.1 s: measured in the manager
under benchmarks/fairshare.py (100,000 no-ops open), where those pauses were most of another
user's p99 (issue 10, item 7).

:class:`LoopGC` leaves the young generations to CPython and turns the automatic full collections
off (their threshold out of reach); the loop calls :meth:`LoopGC.tick` once a turn, which runs a
full collection when the loop is idle and ``idle_every_s`` have passed since the last one, or
after ``every_s`` regardless, so garbage in reference cycles is still freed, on the loop's
schedule. The thresholds are process-wide: :meth:`LoopGC.close` puts back the ones it found.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("dlhub.protocol.loopgc")

_NEVER = 1 << 30  # a generation-2 threshold no count reaches
_lock = threading.Lock()
_users = 0  # LoopGCs open in this process (tests run several loops in one)
_saved: tuple[int, ...] = ()  # the thresholds found when the first one opened


class LoopGC:
    """Full collections from the loop: when idle (at most every ``idle_every_s``), else every
    ``every_s``. ``tick`` returns the seconds a collection took, None when it ran none."""

    def __init__(
        self,
        idle_every_s: float = 30.0,
        every_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        global _users, _saved
        if not 0 < idle_every_s <= every_s:
            raise ValueError(f"need 0 < idle_every_s <= every_s, got {idle_every_s} and {every_s}")
        self.idle_every_s, self.every_s, self.clock = idle_every_s, every_s, clock
        with _lock:
            if _users == 0:
                _saved = gc.get_threshold()
                if _saved[0]:  # a threshold of 0 (collection off) is left as it is
                    gc.set_threshold(_saved[0], _saved[1], _NEVER)
            _users += 1
        self._open = True
        self.last = clock()
        self.collections = 0
        self.longest_s = 0.0

    def tick(self, idle: bool) -> float | None:
        """Once a loop turn; ``idle``: the turn found nothing to do."""
        since = self.clock() - self.last
        if since < self.idle_every_s or (not idle and since < self.every_s):
            return None
        start = time.perf_counter()
        gc.collect()
        took = time.perf_counter() - start
        self.last = self.clock()
        self.collections += 1
        self.longest_s = max(self.longest_s, took)
        if took > 0.1:
            log.info("full garbage collection took %.0f ms (%s)", took * 1000, "idle" if idle else "due")
        return took

    def close(self) -> None:
        """Done with it; the last one closed in the process puts the thresholds back."""
        global _users
        with _lock:
            if not self._open:
                return
            self._open = False
            _users -= 1
            if _users == 0:
                gc.set_threshold(*_saved)
