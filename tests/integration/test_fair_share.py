"""Fair share and quotas end to end: an in-process manager, a real endpoint process whose policy
lets alice and bob submit, real workers.

While alice keeps thousands of 1 ms tasks queued on the endpoint, bob's single calls must complete
about as fast as on the idle endpoint (the endpoint serves users round-robin; with the FIFO it
had, each of bob's calls waited behind all of alice's). A user over the manager's open-task quota
gets QuotaExceeded at once."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time

import pytest
from conftest import RESULT_TIMEOUT_S, wait_until

from dlhub.executor import QuotaExceeded

BACKLOG_CAP = 20_000  # alice keeps up to this many tasks open
BACKLOG_READY = 5_000  # bob starts once this many of hers wait for the endpoint
BOB_CALLS = 20
BOB_BUDGET_S = 30.0  # all of bob's calls under the backlog (a FIFO: each waits for thousands)

# alice's side, in its own process (her client must not share the test's GIL with the manager):
# keeps submitting 1 ms tasks, at most BACKLOG_CAP open, printing "submitted open" lines, until
# its stdin closes. Not no-ops: on a 2-core machine the manager (recording each task) is slower
# than an endpoint running no-ops, so her backlog would wait upstream, in the manager's socket
# (fair-queued between clients by ZeroMQ), not in the endpoint's queue this test is about.
ALICE = """
import sys, threading, time
from dlhub.executor import Executor

def short():
    time.sleep(0.001)

manager, token, home, endpoint, cap = sys.argv[1:6]
cap = int(cap)
ex = Executor(endpoint=endpoint, manager=manager, token=token, home=home)
lock, state, stop = threading.Lock(), {"open": 0, "submitted": 0}, threading.Event()

def done(_):
    with lock:
        state["open"] -= 1

threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
last = 0.0
while not stop.is_set():
    if state["open"] >= cap:
        time.sleep(0.005)
    else:
        future = ex.submit(short)
        with lock:
            state["open"] += 1
        state["submitted"] += 1
        future.add_done_callback(done)
    if time.monotonic() - last > 0.1:
        last = time.monotonic()
        print(state["submitted"], state["open"], flush=True)
ex.shutdown(wait=False, cancel_futures=True)
"""


def noop():
    return None


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def add_users(cs) -> dict[str, str]:
    from dlhub.manager.auth import create_user

    return {name: create_user(cs.manager.auth.engine, name, "user") for name in ("alice", "bob")}


def waiting(cs) -> int:
    """alice's tasks waiting for the endpoint: in its queue, or held at the manager (beyond her
    fair share in flight there, ``max_inflight_per_user``)."""
    held = cs.manager.status()["endpoints"].get(cs.endpoint_name, {}).get("held", 0)
    return cs.status().get("queued", 0) + held


def timed_calls(ex, n: int, deadline: float) -> list[float]:
    """Latencies (s) of ``n`` serial no-op calls, each waited for until ``deadline``."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        ex.submit(noop).result(max(0.1, deadline - time.monotonic()))
        out.append(time.perf_counter() - t0)
    return out


class Backlog:
    """alice's process, and the last (submitted, open) it reported."""

    def __init__(self, cs, token: str):
        args = [cs.manager.client_url, token, str(cs.home), cs.endpoint_name, str(BACKLOG_CAP)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ALICE, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.submitted = self.open = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.submitted, self.open = map(int, line.split())

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)


def test_bobs_call_is_not_stuck_behind_alices_backlog(custom_stack_factory):
    cs = custom_stack_factory(
        name="shared", endpoint={"heartbeat_s": 0.5, "policy": {"allowed_users": ["alice", "bob"]}}, workers=1
    )
    tokens = add_users(cs)
    bob = cs.executor(token=tokens["bob"])
    timed_calls(bob, 5, time.monotonic() + RESULT_TIMEOUT_S)  # warm: code shipped, run time measured
    idle = timed_calls(bob, BOB_CALLS, time.monotonic() + RESULT_TIMEOUT_S)

    alice = Backlog(cs, tokens["alice"])
    try:
        wait_until(  # her tasks wait for the endpoint (not upstream, in the manager's socket)
            lambda: waiting(cs) >= BACKLOG_READY or alice.proc.poll() is not None,
            60,
            what="alice's backlog queued for the endpoint",
        )
        assert alice.proc.poll() is None, "alice's process exited"
        busy = timed_calls(bob, BOB_CALLS, time.monotonic() + BOB_BUDGET_S)
        open_after, queued_after = alice.open, waiting(cs)
    finally:
        alice.stop()

    p50_idle, p50_busy = statistics.median(idle), statistics.median(busy)
    print(
        f"bob p50 idle {1000 * p50_idle:.1f} ms, under alice's backlog {1000 * p50_busy:.1f} ms "
        f"(x{p50_busy / p50_idle:.2f}); alice submitted {alice.submitted}, {open_after} open at the end"
    )
    # the backlog was there all along: bob's calls were measured against it
    assert open_after >= BACKLOG_READY and queued_after >= 1_000, (open_after, queued_after)
    # the target is 3x; a loaded 2-core test machine gets slack (alice's flood shares its CPUs),
    # far below what a FIFO gives (each call waits for thousands of tasks: seconds)
    assert p50_busy <= max(3 * p50_idle, p50_idle + 0.25), (p50_idle, p50_busy)


def test_a_user_over_the_open_task_quota_gets_quota_exceeded_at_once(custom_stack_factory):
    cs = custom_stack_factory(
        name="quota",
        manager_kwargs={"max_open_tasks_per_user": 3},
        endpoint={"heartbeat_s": 0.5, "policy": {"allowed_users": ["alice", "bob"]}},
        workers=1,
    )
    tokens = add_users(cs)
    alice, bob = cs.executor(token=tokens["alice"]), cs.executor(token=tokens["bob"])
    held = [alice.submit(nap, 3.0) for _ in range(3)]
    t0 = time.monotonic()
    over = alice.submit(nap, 0.0)
    with pytest.raises(QuotaExceeded) as info:
        over.result(RESULT_TIMEOUT_S)
    assert time.monotonic() - t0 < 2.0  # at once: not after alice's running tasks
    assert "alice already has 3 tasks open" in str(info.value)
    assert "dlhub-manager serve --max-open-tasks-per-user N" in str(info.value)
    assert over.done() and not any(f.done() for f in held)
    # bob's quota is his own; the admin has none
    assert bob.submit(nap, 0.0).result(RESULT_TIMEOUT_S) == 0.0
    admin = cs.executor()
    assert [f.result(RESULT_TIMEOUT_S) for f in [admin.submit(nap, 0.0) for _ in range(5)]] == [0.0] * 5
    # places free up as alice's tasks finish
    assert [f.result(RESULT_TIMEOUT_S) for f in held] == [3.0] * 3
    assert alice.submit(nap, 0.0).result(RESULT_TIMEOUT_S) == 0.0
    assert cs.manager.status()["over_quota"] == 1


def test_a_users_tasks_in_flight_on_an_endpoint_are_bounded_and_the_rest_wait_at_the_manager(
    custom_stack_factory,
):
    cs = custom_stack_factory(
        name="window",
        manager_kwargs={"max_inflight_per_user": 4},
        endpoint={"heartbeat_s": 0.5, "policy": {"allowed_users": ["alice", "bob"]}},
        workers=1,
    )
    tokens = add_users(cs)
    alice = cs.executor(token=tokens["alice"])
    futures = [alice.submit(nap, 0.02) for _ in range(40)]
    seen: list[tuple[int, int]] = []  # (in flight, held) as the manager reports them

    def look() -> bool:
        ep = cs.manager.status()["endpoints"]["window"]
        seen.append((ep["inflight"], ep["held"]))
        return ep["held"] > 0

    wait_until(look, 10, what="alice's tasks held at the manager")
    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [0.02] * 40  # each ran, none lost
    assert max(inflight for inflight, _ in seen) <= 4, seen
    ep = cs.manager.status()["endpoints"]["window"]
    assert (ep["inflight"], ep["held"]) == (0, 0)
    # what waited at the manager was recorded as queued there, then dispatched when it went
    # (their results came before their rows' commit: read waits for it, as for any finished task)
    last = [bytes.fromhex(f.task_id) for f in futures[-3:]]
    rows = cs.manager.store.read(last, last)
    assert all(row["state"] == "succeeded" and row["t_dispatched"] for row in rows.values()), rows
