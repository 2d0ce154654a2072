"""What the endpoint log says about tasks, so that after thousands of them it tells what happened.

Each failed task is logged at WARNING with its id, function or servable, worker and the first line
of its error, but at most ``per_kind`` lines per kind of failure (exception type, or the error
code of failures that did not come from user code) and ``max_lines`` in all every ``window_s``;
the rest are counted and summed up in ``suppressed N similar failures`` lines (one per kind, for
the ``SUPPRESSED_KINDS`` most frequent). A one-line summary of the tasks finished and failed (by
kind) is written every ``summary_s`` while tasks run, and once the endpoint has nothing left to
do (at most once a window). The scheduler only collects failures (it is sans-IO); the daemon
hands them here, once per loop pass, off the per-result path.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from dlhub.protocol import messages as m
from dlhub.protocol.serialize import CODE

PER_KIND = 5
MAX_LINES = 50
WINDOW_S = 10.0
SUPPRESSED_KINDS = 10
SUMMARY_S = 60.0
MESSAGE_CHARS = 300

_TYPE_PREFIX = re.compile(r"([A-Za-z_][\w.]*): ")


def failure_kind(error: list | None) -> str:
    """``ValueError`` for an exception raised by user code (its message starts with the type),
    else the error code (``worker-lost``, ``task-timeout``, ``lost`` ...)."""
    if not error:
        return "error"
    match = _TYPE_PREFIX.match(str(error[1] or ""))
    return match.group(1) if match else str(error[0])


class TaskLog:
    def __init__(
        self,
        logger: logging.Logger,
        describe: Callable[[str], str],
        per_kind: int = PER_KIND,
        max_lines: int = MAX_LINES,
        window_s: float = WINDOW_S,
        summary_s: float = SUMMARY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.log, self.describe, self.clock = logger, describe, clock
        self.per_kind, self.max_lines = per_kind, max_lines
        self.window_s, self.summary_s = window_s, summary_s
        self.window_start = self.since = self.last_summary = clock()
        self.logged: dict[str, int] = {}  # kind -> lines written in this window
        self.lines = 0  # failure lines written in this window
        self.suppressed: dict[str, int] = {}  # kind -> failures not written in this window
        self.kinds: dict[str, int] = {}  # kind -> failures since the last summary
        self.counted = (0, 0)  # (finished, failed) at the last summary

    def failures(self, failures: list[tuple[bytes, str, bytes | None, list]]) -> None:
        """Log (some of) these failed tasks: (task id, function, worker identity, error record)."""
        now = self.clock()
        if now - self.window_start >= self.window_s:
            self._flush(now)
        for task_id, function, worker, error in failures:
            kind = failure_kind(error)
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            written = self.logged.get(kind, 0)
            if written >= self.per_kind or self.lines >= self.max_lines:
                self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
                continue
            self.logged[kind] = written + 1
            self.lines += 1
            message = str(error[1] if error else "").strip().split("\n", 1)[0][:MESSAGE_CHARS]
            if not message.startswith(kind):
                message = f"{kind}: {message}"
            self.log.warning(
                "task %s failed: %s (%s, worker %s)",
                task_id.hex() if isinstance(task_id, bytes) else task_id,
                message,
                self.describe(function),
                worker[2:].decode(errors="replace") if worker else "none",
            )

    def tick(self, finished: int, failed: int, idle: bool, state: str, final: bool = False) -> None:
        """Called every heartbeat with the scheduler's running totals: write the suppression
        lines when their window ends, and the summary when due (or the endpoint went idle).
        ``final``: the endpoint stops; say everything now."""
        now = self.clock()
        if final or now - self.window_start >= self.window_s:
            self._flush(now)
        done, bad = finished - self.counted[0], failed - self.counted[1]
        if not done:
            self.since = now  # the next summary covers the time tasks ran, not idle hours
            return
        due = now - self.since >= self.summary_s or (idle and now - self.last_summary >= self.window_s)
        if final or due:
            self._flush(now)
            kinds = sorted(self.kinds.items(), key=lambda kc: -kc[1])
            by_kind = ", ".join(f"{count} {kind}" for kind, count in kinds[:3])
            if len(kinds) > 3:
                by_kind += f", {sum(c for _, c in kinds[3:])} of {len(kinds) - 3} other kinds"
            self.log.info(
                "tasks in the last %s: %d finished, %d failed%s; %s",
                _span(now - self.since),
                done,
                bad,
                f" ({by_kind})" if by_kind else "",
                state,
            )
            self.counted, self.since, self.last_summary = (finished, failed), now, now
            self.kinds.clear()

    def _flush(self, now: float) -> None:
        """Sum up what this window did not write, then start a new window."""
        span, limits = _span(now - self.window_start), self._limits()
        ranked = sorted(self.suppressed.items(), key=lambda kc: (-kc[1], kc[0]))
        for kind, count in ranked[:SUPPRESSED_KINDS]:
            self.log.warning(
                "suppressed %d similar failures (%s) in the last %s; %s", count, kind, span, limits
            )
        rest = ranked[SUPPRESSED_KINDS:]
        if rest:
            self.log.warning(
                "suppressed %d failures of %d other kinds in the last %s; %s",
                sum(count for _, count in rest),
                len(rest),
                span,
                limits,
            )
        self.logged.clear()
        self.suppressed.clear()
        self.lines = 0
        self.window_start = now

    def _limits(self) -> str:
        return (
            f"at most {self.per_kind} per kind and {self.max_lines} in all are logged every "
            f"{_span(self.window_s)}"
        )


def function_name(blob: bytes | None) -> str | None:
    """The ``__name__`` recorded in a function's code blob (None if it cannot be read)."""
    if not blob or blob[0] != CODE:
        return None
    try:
        import msgpack

        return str(msgpack.unpackb(blob[1:], raw=False).get("name"))
    except Exception:
        return None


def describe_function(digest: str, labels: dict[str, str], code: dict[str, bytes]) -> str:
    """``servable admin/noop:1``, ``function boom sha256:1a2b3c4d5e6f`` or the digest."""
    label = labels.get(digest)
    if label:
        return f"servable {label}"
    if m.package_key(digest) is not None:
        return f"servable {digest}"
    name = function_name(code.get(digest))
    short = digest.removeprefix("sha256:")[:12]
    return f"function {name} {short}" if name else f"function {digest}"


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
