"""Slow calls off the endpoint loop: provider commands (``sacct``, ``squeue``, ``qstat``...) may
take up to ``cmd_timeout_s`` (30 s by default), and the loop must never wait on them.

    loop --submit(key, fn, args)--> SimpleQueue --> [daemon thread] fn(*args)
    loop <--outcomes()-- deque <-- Outcome(key, value | error, started, seconds)

One daemon thread per ``OffLoop`` runs its calls in order; the loop submits at most one call per
key at a time (:meth:`busy`), reads finished ones each turn with :meth:`outcomes` and acts on them
as events. ``in_flight`` says which call has been running how long and ``health`` adds when
each key last answered (for status and the heartbeat: a stalled provider is shown, not felt).
The thread is a daemon: a hung command never holds up the endpoint's exit.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple


class Outcome(NamedTuple):
    key: str
    value: Any  # what the call returned (None when it raised)
    error: BaseException | None
    started: float  # time.monotonic() when the call began
    seconds: float


class OffLoop:
    """Runs submitted calls, one at a time, on a daemon thread named ``name``."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: deque[Outcome] = deque()
        self._running: dict[str, float] = {}  # key -> when its call began (written by both sides)
        self._pending: set[str] = set()  # keys submitted and not yet read back by the loop
        self._last_ok: dict[str, float] = {}  # key -> when a call last returned (written by the thread)
        self._last_error: dict[str, str] = {}  # key -> the last call's error, while it failed
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        self._pending.add(key)
        self._jobs.put((key, fn, args))

    def busy(self, key: str) -> bool:
        """A call for ``key`` was submitted and its outcome not yet read."""
        return key in self._pending

    def in_flight(self, now: float | None = None) -> dict[str, float]:
        """Calls running now: key -> seconds so far."""
        now = time.monotonic() if now is None else now
        return {key: now - started for key, started in list(self._running.items())}

    def health(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per key: ``query_running_for_s`` (the call running now, None when none),
        ``last_ok_age_s`` (since a call last returned; None: never yet) and ``last_error``."""
        now = time.monotonic() if now is None else now
        running, last_ok = dict(self._running), dict(self._last_ok)
        errors = dict(self._last_error)
        return {
            key: {
                "query_running_for_s": round(now - running[key], 1) if key in running else None,
                "last_ok_age_s": round(now - last_ok[key], 1) if key in last_ok else None,
                "last_error": errors.get(key),
            }
            for key in sorted(set(running) | set(last_ok) | set(errors))
        }

    def _finished(self, outcome: Outcome) -> None:
        if outcome.error is None:
            self._last_ok[outcome.key] = outcome.started + outcome.seconds
            self._last_error.pop(outcome.key, None)
        else:
            self._last_error[outcome.key] = f"{type(outcome.error).__name__}: {outcome.error}"[:300]
        self._done.append(outcome)

    def outcomes(self) -> list[Outcome]:
        """Finished calls since the last look, oldest first (the loop's thread only)."""
        out = []
        while self._done:
            outcome = self._done.popleft()
            self._pending.discard(outcome.key)
            out.append(outcome)
        return out

    def close(self) -> None:
        """Stop after the call running now (not waited for)."""
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            key, fn, args = job
            started = self._running[key] = time.monotonic()
            value, error = None, None
            try:
                value = fn(*args)
            except BaseException as exc:  # reported to the loop, which logs it
                error = exc
            self._running.pop(key, None)
            self._finished(Outcome(key, value, error, started, time.monotonic() - started))


class Inline(OffLoop):
    """Runs each call at once on the caller's thread: for an endpoint driven by hand (unit tests
    call its block watch directly, without a loop or pools); the outcome is read the same way."""

    def __init__(self) -> None:
        self._done = deque()
        self._running = {}
        self._pending = set()
        self._last_ok = {}
        self._last_error = {}

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        self._pending.add(key)
        started = time.monotonic()
        value, error = None, None
        try:
            value = fn(*args)
        except Exception as exc:
            error = exc
        self._finished(Outcome(key, value, error, started, time.monotonic() - started))

    def close(self) -> None:
        pass
