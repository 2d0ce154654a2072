"""Progress display without a stack: plain lines when stderr is not a terminal, a rich bar on one,
and a clean stop when the caller gives up (time-out, exception). Futures come from a real
ThreadPoolExecutor: ``progress``/``as_completed`` take any concurrent.futures futures."""

from __future__ import annotations

import concurrent.futures as cf
import io
import re
import threading
import time

import pytest
from rich.console import Console

from dlhub.executor import _progress, as_completed, progress
from dlhub.executor._progress import TaskProgress


def test_a_pipe_gets_periodic_lines_and_a_summary_not_a_redrawn_bar(capsys, monkeypatch):
    monkeypatch.setattr(_progress, "LINE_INTERVAL_S", 0.05)
    with cf.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(time.sleep, 0.1) for _ in range(6)]
        assert len(list(progress(futures, description="naps"))) == 6
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err  # nothing a log file would garble
    assert re.search(r"^naps: [0-5]/6 \(\d+%\), [\d.,?]+/s", err, re.M), err  # while it ran
    assert re.search(r"^naps: 6/6 done in [\d.]+ s \([\d.,]+/s\)$", err, re.M), err


def test_a_terminal_gets_a_rich_bar_with_count_and_failures():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with cf.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(lambda x: 1 / x, x) for x in (1, 2, 0)]
        tracker = TaskProgress(len(futures), "divide", console=console)
        for fut in futures:
            fut.add_done_callback(tracker.future_done)
        cf.wait(futures)
    tracker.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "divide" in text and "3/3" in text and "1 failed" in text, text
    assert "━" in text  # the bar itself


def test_a_time_out_stops_the_bar_with_where_it_stopped(capsys):
    release = threading.Event()
    with cf.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(release.wait, 10), pool.submit(int, "3")]
        with pytest.raises(cf.TimeoutError):
            list(as_completed(futures, timeout=0.2, progress=True, description="waits"))
        release.set()
    assert re.search(r"^waits: stopped at 1/2 after [\d.]+ s", capsys.readouterr().err, re.M)


def test_without_progress_as_completed_is_concurrent_futures_own_and_silent(capsys):
    with cf.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(int, str(i)) for i in range(5)]
        assert sorted(f.result() for f in as_completed(futures + futures)) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""
