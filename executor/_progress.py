"""Progress for long waits: futures finishing (``as_completed``/``progress``, ``Executor.map``) and
one-line stages with elapsed time (``Client.publish``).

On a terminal, stderr shows a live rich bar (count, rate, ETA) or spinner; when stderr is a file or
a pipe (batch jobs, CI logs) nothing is redrawn: a plain line every ``LINE_INTERVAL_S`` seconds
and a one-line summary at the end keep logs readable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures as cf

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

LINE_INTERVAL_S = 10.0  # plain-line mode: at most one progress line this often


def _live(console: Console) -> bool:
    """Redraw in place only on a real terminal; files, pipes and dumb terminals get lines."""
    return console.is_terminal and not console.is_dumb_terminal


def _rate(per_s: float | None) -> str:
    if per_s is None:
        return "?/s"
    return f"{per_s:,.0f}/s" if per_s >= 10 else f"{per_s:.1f}/s"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class _RateColumn(ProgressColumn):
    """Finished tasks per second (rich's own speed columns are for bytes)."""

    def render(self, task: Task) -> Text:
        return Text(_rate(task.finished_speed or task.speed), style="progress.data.speed")


class TaskProgress:
    """Counts finished futures and shows the count. Thread-safe: ``advance`` runs on whichever
    thread resolves a future (for dlhub, the connection's I/O thread), so the bar moves as
    results arrive, not as the caller consumes them. ``close`` is idempotent."""

    def __init__(
        self, total: int, description: str, console: Console | None = None, started: float | None = None
    ):
        self.total = total
        self.description = description
        self.console = console or Console(stderr=True)
        self.finished = 0
        self.failed = 0
        self.started = time.monotonic() if started is None else started  # e.g. before submitting
        self._lock = threading.Lock()
        self._closed = False
        self._bar: Progress | None = None
        self._stop_lines: threading.Event | None = None
        if _live(self.console):
            self._bar = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _RateColumn(),
                TextColumn("{task.fields[failed]}", style="red"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._bar.add_task(description, total=total, failed="")
            self._bar.start()
        else:
            self._stop_lines = threading.Event()
            threading.Thread(target=self._print_lines, name="dlhub-progress", daemon=True).start()

    def future_done(self, fut: cf.Future) -> None:
        """A done-callback: count ``fut`` (failed when it raised or was cancelled)."""
        try:
            failed = fut.cancelled() or fut.exception(0) is not None
        except Exception:  # never let a display problem escape into the future's machinery
            failed = True
        self.advance(failed)

    def advance(self, failed: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self.finished += 1
            self.failed += bool(failed)
            if self._bar is not None:
                extra = f"{self.failed} failed" if self.failed else ""
                self._bar.update(self._task, completed=self.finished, failed=extra)
            everything = self.finished >= self.total
        if everything:  # a map nobody iterates to the end still ends its bar
            self.close()

    def _print_lines(self) -> None:
        while not self._stop_lines.wait(LINE_INTERVAL_S):
            with self._lock:
                if self._closed:
                    return
                line = self._line()
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def _line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.finished / elapsed if elapsed > 0 else None
        share = f" ({self.finished / self.total:.0%})" if self.total else ""
        eta = f", eta {_duration((self.total - self.finished) / rate)}" if rate else ""
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.description}: {self.finished:,}/{self.total:,}{share}, {_rate(rate)}{eta}{failed}"

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = _rate(self.finished / elapsed if elapsed > 0 else None)
        failed = f", {self.failed} failed" if self.failed else ""
        if self.finished >= self.total:
            counts = f"{self.finished:,}/{self.total:,}"
            return f"{self.description}: {counts} done in {_duration(elapsed)} ({rate}){failed}"
        return (
            f"{self.description}: stopped at {self.finished:,}/{self.total:,} after {_duration(elapsed)} "
            f"({rate}){failed}"
        )

    def close(self) -> None:
        """Stop redrawing; in line mode print the one-line summary."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            summary = self.summary()
        if self._bar is not None:
            self._bar.stop()  # the final bar stays on screen
        else:
            self._stop_lines.set()
            self.console.print(summary, highlight=False, markup=False, soft_wrap=True)


def as_completed(
    fs: Iterable[cf.Future],
    timeout: float | None = None,
    *,
    progress: bool = False,
    description: str = "tasks",
) -> Iterator[cf.Future]:
    """Like :func:`concurrent.futures.as_completed`: yield each future (once, duplicates
    dropped) as it finishes. ``progress=True`` shows a bar on stderr that counts futures as they
    finish, with rate and ETA (plain lines and a final summary when stderr is not a terminal)."""
    futures = list(dict.fromkeys(fs))
    if not progress:
        yield from cf.as_completed(futures, timeout)
        return
    tracker = TaskProgress(len(futures), description)
    try:
        for fut in futures:
            fut.add_done_callback(tracker.future_done)
        yield from cf.as_completed(futures, timeout)
    finally:
        tracker.close()


def progress(
    fs: Iterable[cf.Future], description: str = "tasks", timeout: float | None = None
) -> Iterator[cf.Future]:
    """``as_completed(fs, timeout, progress=True)``: yield futures as they finish, with a bar::

    for fut in progress(futures, description="featurize"):
        handle(fut.result())
    """
    return as_completed(fs, timeout, progress=True, description=description)


class Stage:
    """A one-line status with elapsed time for a wait with stages (upload, then verification):
    a rich spinner on a terminal; elsewhere a line per stage, a reminder every
    ``LINE_INTERVAL_S`` and a final line."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.started = time.monotonic()
        self._text = ""
        self._stage_started = self.started
        self._last_line = self.started
        self._status = self.console.status("") if _live(self.console) else None
        if self._status is not None:
            self._status.start()

    def stage(self, text: str) -> None:
        """Enter a new stage (say what is being waited for)."""
        self._text, self._stage_started = text, time.monotonic()
        if self._status is None:
            self._last_line = self._stage_started
            self.console.print(f"{text} ...", highlight=False, markup=False, soft_wrap=True)
        self.tick()

    def tick(self, detail: str = "") -> None:
        """Refresh the elapsed time (and an optional detail such as a status)."""
        now = time.monotonic()
        line = f"{self._text}{f' ({detail})' if detail else ''} {_duration(now - self._stage_started)}"
        if self._status is not None:
            self._status.update(line)
        elif now - self._last_line >= LINE_INTERVAL_S:
            self._last_line = now
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def done(self, text: str) -> None:
        """Finish with a final line (kept on screen)."""
        self.close()
        elapsed = _duration(time.monotonic() - self.started)
        self.console.print(f"{text} in {elapsed}", highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


class PublishProgress:
    """What ``Client.publish(progress=True)`` says while it waits: the upload (files and size),
    then the verification on the chosen endpoint with the version's status and elapsed time.
    Disabled, every method does nothing."""

    def __init__(self, servable, enabled: bool = True):
        from rich.filesize import decimal

        self._stage = Stage() if enabled else None
        self._servable = servable
        if self._stage is not None:
            count, size = len(servable.files), sum(len(data) for data in servable.files.values())
            what = f"{_plural(count, 'file')} ({decimal(size)})" if count else "the record"
            self._stage.stage(f"uploading {what}")

    def uploaded(self, ref: str, endpoint: str | None, wait: bool) -> None:
        if self._stage is None:
            return
        self._endpoint = endpoint or "an endpoint"
        if not wait:
            self._stage.done(f"{ref} uploaded; verifying on {self._endpoint}")
            return
        record = self._servable.record
        requirements, examples = len(record.get("requirements") or []), len(record.get("examples") or [])
        steps = [f"checking {_plural(requirements, 'requirement')}"] if requirements else []
        steps += ["loading", f"running {_plural(examples, 'example')}"]
        self._stage.stage(f"verifying on endpoint {self._endpoint}: {', '.join(steps)}")

    def status(self, status: str) -> None:
        if self._stage is not None:
            self._stage.tick(status)

    def ready(self, ref: str) -> None:
        if self._stage is not None:
            self._stage.done(f"{ref} ready: verified on {self._endpoint}")

    def close(self) -> None:
        if self._stage is not None:
            self._stage.close()


__all__ = ["PublishProgress", "Stage", "TaskProgress", "as_completed", "progress"]
