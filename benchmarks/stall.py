"""The manager's loop never waits on its database (issue 11, item 3): no-op calls of a function
the endpoint already knows, with the task database free and while another process holds it
locked (SQLite ``BEGIN EXCLUSIVE``, as a backup, a migration or an admin's sqlite3 shell would).

One `dlhub up` stack (SQLite, 2 workers). Serial calls for ``stall_s`` seconds without a stall,
then for as long as the lock is held, then after it. The promise: p99 during the stall within 2x
of p99 without it (results flow while their rows wait to be written; the writer retries until
the lock is gone and nothing is lost: every call is checked, then looked up in the store).

    .venv/bin/python benchmarks/stall.py            # 5 s stall, 2 rounds
    .venv/bin/python benchmarks/stall.py --quick    # 3 s stall, 1 round

Output: JSON lines (each phase's p50/p99/count, the ratio of p99s), then a summary; exit 1 when
a call fails, returns a wrong value, or the ratio is over 2.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from _stack import run_bench, stats

# the promise (2x) is checked on a full run; the quick smoke run in CI fails only when the stall
# is felt (the bug it guards against made p99 475x), so a noisy shared machine cannot fail it
FULL = {"stall_s": 5.0, "rounds": 2, "target": 2.0}
QUICK = {"stall_s": 3.0, "rounds": 1, "target": 10.0}

LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def noop():
    return "noop"


def _calls(ex, seconds: float, until=None) -> list[float]:
    """Serial no-op calls for ``seconds`` (or until ``until()`` returns something); their latencies."""
    out, deadline = [], time.monotonic() + seconds
    while (until() is None) if until is not None else time.monotonic() < deadline:
        t0 = time.perf_counter()
        value = ex.submit(noop).result(60)
        out.append(time.perf_counter() - t0)
        if value != "noop":
            raise AssertionError(f"a call returned {value!r}")
    return out


def _look_up_in_a_loop(home: Path, stop: threading.Event, took: list[tuple[float, float]]) -> None:
    """A second user session: the state of a finished task, every 100 ms."""
    from dlhub.executor import Executor

    with Executor(endpoint="local", home=str(home)) as ex:
        fut = ex.submit(noop)
        fut.result(60)
        while not stop.wait(0.1):
            t0 = time.perf_counter()
            state = ex.task_info(fut)["state"]
            took.append((t0, time.perf_counter() - t0))
            if state != "succeeded":
                raise AssertionError(f"task_info said {state!r}")


def measure(stack, sizes: dict, emit, args) -> None:
    stack.up()
    ex = stack.ex
    db = next(Path(stack.home).rglob("dlhub.db"))
    _calls(ex, 1.0)  # warm: the function is known at the endpoint
    stop, lookups = threading.Event(), []
    looker = threading.Thread(target=_look_up_in_a_loop, args=(stack.home, stop, lookups), daemon=True)
    looker.start()
    try:
        _rounds(ex, db, sizes, emit, lookups)
    finally:
        stop.set()
        looker.join(60)


def _rounds(ex, db: Path, sizes: dict, emit, lookups: list[tuple[float, float]]) -> None:
    for round_ in range(sizes["rounds"]):
        free = _calls(ex, sizes["stall_s"])
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(db), str(sizes["stall_s"])], stdout=subprocess.PIPE, text=True
        )
        try:
            if locker.stdout.readline().strip() != "locked":
                raise RuntimeError("the locking process did not get the lock")
            began = time.perf_counter()
            stalled = _calls(ex, 0, until=locker.poll)
            ended = time.perf_counter()
        finally:
            locker.wait(60)
        after = _calls(ex, 2.0)
        lookups_stalled = [took for t0, took in lookups if began <= t0 < ended]
        row = {"round": round_, "stall_s": sizes["stall_s"]}
        emit("noop_free", "dlhub", **row, **stats(free))
        emit("noop_db_locked", "dlhub", **row, **stats(stalled))
        emit("noop_after", "dlhub", **row, **stats(after))
        if lookups_stalled:
            emit("task_info_db_locked", "dlhub", **row, **stats(lookups_stalled))
        ratio = stats(stalled)["p99_ms"] / stats(free)["p99_ms"]
        emit("p99_ratio_locked_vs_free", "dlhub", **row, ratio=round(ratio, 2), target=sizes["target"])
        if len(stalled) < 10:
            raise AssertionError(f"only {len(stalled)} calls completed in a {sizes['stall_s']} s stall")
        if ratio > sizes["target"]:
            raise AssertionError(
                f"p99 during the stall is {ratio:.2f}x p99 without it (target {sizes['target']}x)"
            )


def summary(records: list[dict]) -> str:
    lines = ["stall: serial no-op calls, database free vs locked by another process"]
    for r in records:
        if r["metric"].startswith(("noop_", "task_info")):
            lines.append(
                f"  round {r['round']} {r['metric']:<19} p50 {r['p50_ms']:8.3f} ms  "
                f"p99 {r['p99_ms']:8.3f} ms  n={r['n']}"
            )
        elif r["metric"] == "p99_ratio_locked_vs_free":
            lines.append(f"  round {r['round']} p99 locked / free = {r['ratio']} (target <= {r['target']})")
        elif r["metric"] == "error":
            lines.append(f"  ERROR: {r['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_bench("stall", __doc__, FULL, QUICK, measure, summary))
