"""The endpoint's sans-IO Scheduler: dispatch, prefetch, code, failures, cancel."""

from __future__ import annotations

import pytest

from dlhub.endpoint.scheduler import Scheduler
from dlhub.protocol import messages as m

FAST, SLOW, OTHER = "sha256:fast", "sha256:slow", "sha256:other"
W1, W2, W3 = b"w:p1.0", b"w:p1.1", b"w:p2.0"


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def rec(n: int, digest: str = FAST, timeout_s: float | None = None) -> list:
    return m.task_record(tid(n), digest, b"\x01\x90", timeout_s, "auto")


def make(t: list[float] | None = None, **kwargs) -> Scheduler:
    clock = (lambda: t[0]) if t is not None else (lambda: 0.0)
    s = Scheduler(clock=clock, wall_clock=lambda: 5000.0, **kwargs)
    s.add_code({FAST: b"\x10fast", SLOW: b"\x10slow", OTHER: b"\x10other"})
    return s


def with_workers(s: Scheduler, *identities: bytes, pool: str = "p1") -> Scheduler:
    if pool not in s.pools:
        s.add_pool(b"p:" + pool.encode(), pool, "0", {})
    for ident in identities:
        s.add_worker(ident, ident[2:].decode(), pool)
    return s


def sent(s: Scheduler) -> dict[bytes, list[bytes]]:
    """Task ids sent to each worker since the last call (and clear the outbox)."""
    out: dict[bytes, list[bytes]] = {}
    for ident, msg in s.to_workers:
        if isinstance(msg, m.Tasks):
            out.setdefault(ident, []).extend(r[m.T_ID] for r in msg.tasks)
    s.to_workers.clear()
    return out


def done(s: Scheduler, worker: bytes, n: int, seconds: float = 0.001, state: str = "succeeded") -> None:
    s.worker_results(worker, [m.result_record(tid(n), state, b"\x01\x00", None, [100.0, 100.0 + seconds])])


def results(s: Scheduler) -> dict[bytes, list]:
    out = {r[m.R_ID]: r for r in s.results}
    s.results.clear()
    return out


# ---- dispatch ----------------------------------------------------------------------------------


def test_dispatch_fills_workers_up_to_capacity():
    s = with_workers(make(min_prefetch=1), W1, W2)
    s.add_tasks([rec(n) for n in range(1, 6)])
    s.dispatch()
    out = sent(s)
    # an unmeasured function: one running + min_prefetch (1) waiting at each worker, dealt
    # round-robin so the idle worker gets its first task before anyone prefetches
    assert out == {W1: [tid(1), tid(3)], W2: [tid(2), tid(4)]}
    assert list(s.queue) == [tid(5)]
    assert [len(w.assigned) for w in s.workers.values()] == [2, 2]
    s.dispatch()  # nothing frees up: nothing moves
    assert sent(s) == {} and list(s.queue) == [tid(5)]
    done(s, W2, 2)
    s.dispatch()
    assert sent(s) == {W2: [tid(5)]}
    assert results(s)[tid(2)][m.R_STATE] == "succeeded"


def test_code_is_sent_once_per_worker():
    s = with_workers(make(min_prefetch=0), W1)
    s.add_tasks([rec(1)])
    s.dispatch()
    ((ident, first),) = s.to_workers
    assert first.code == {FAST: b"\x10fast"}
    s.to_workers.clear()
    done(s, W1, 1)
    s.add_tasks([rec(2)])
    s.dispatch()
    ((ident, second),) = s.to_workers
    assert [r[m.T_ID] for r in second.tasks] == [tid(2)] and second.code == {}


def test_no_workers_no_dispatch():
    s = make()
    s.add_tasks([rec(1)])
    s.dispatch()
    assert s.to_workers == [] and list(s.queue) == [tid(1)]


def test_duplicate_tasks_are_ignored():
    s = make()
    assert s.add_tasks([rec(1), rec(2)]) == 2
    assert s.add_tasks([rec(1)]) == 0
    assert list(s.queue) == [tid(1), tid(2)] and s.outstanding() == 2


# ---- code ----------------------------------------------------------------------------------------


def test_unknown_code_is_requested_once_and_tasks_park_until_it_arrives():
    s = with_workers(make(min_prefetch=1), W1, W2)
    s.add_tasks([rec(1, "sha256:new"), rec(2, "sha256:new"), rec(3)])
    assert s.code_requests == ["sha256:new"]
    assert list(s.queue) == [tid(3)]
    s.dispatch()
    assert sent(s) == {W1: [tid(3)]}
    s.add_code({"sha256:new": b"\x10new"})
    assert list(s.queue) == [tid(1), tid(2)]
    s.dispatch()
    out = sent(s)
    assert sorted(out.get(W1, []) + out.get(W2, [])) == [tid(1), tid(2)]
    assert s.code_requests == ["sha256:new"]  # still one request


def test_code_the_manager_lacks_fails_its_tasks():
    s = make()
    s.add_tasks([rec(1, "sha256:gone"), rec(2, "sha256:gone")])
    s.code_missing(["sha256:gone"])
    res = results(s)
    assert set(res) == {tid(1), tid(2)}
    for r in res.values():
        assert r[m.R_STATE] == "failed"
        assert r[m.R_ERROR][0] == "serialization" and "sha256:gone" in r[m.R_ERROR][1]
    assert s.outstanding() == 0


# ---- failures --------------------------------------------------------------------------------


def test_worker_died_fails_the_head_with_worker_lost_and_requeues_the_rest():
    s = with_workers(make(min_prefetch=2), W1, W2)
    s.add_tasks([rec(n) for n in range(1, 8)])
    s.dispatch()
    out = sent(s)
    assert out == {W1: [tid(1), tid(3), tid(5)], W2: [tid(2), tid(4), tid(6)]}  # round-robin
    assert list(s.queue) == [tid(7)]
    s.worker_died("p1.0", "exit code 1")
    res = results(s)
    assert list(res) == [tid(1)]
    assert res[tid(1)][m.R_STATE] == "failed"
    code, message, _, _ = res[tid(1)][m.R_ERROR]
    assert code == "worker-lost" and "p1.0" in message and "exit code 1" in message
    # the prefetched tasks go back to the front of the queue, in order, no retry counted
    assert list(s.queue) == [tid(3), tid(5), tid(7)]
    assert s.tasks[tid(3)].retries == 0 and s.tasks[tid(3)].worker is None
    assert W1 not in s.workers and "p1.0" not in s.pools["p1"].workers
    assert s.counters["worker_lost"] == 1
    # a replacement worker picks them up
    with_workers(s, b"w:p1.9")
    s.dispatch()
    assert sent(s) == {b"w:p1.9": [tid(3), tid(5), tid(7)]}
    s.worker_died("unknown-worker", "x")  # unknown: ignored
    assert results(s) == {}


def test_pool_lost_requeues_with_retries_then_lost_after_max_retries():
    s = make(max_retries=2, min_prefetch=1)
    for attempt in range(3):
        pool = f"p{attempt}"
        ident = f"w:{pool}.0".encode()
        with_workers(s, ident, pool=pool)
        if attempt == 0:
            s.add_tasks([rec(1), rec(2)])
        s.dispatch()
        assert sent(s) == {ident: [tid(1), tid(2)]}
        s.pool_lost(pool, f"block of {pool} ended")
        if attempt < 2:
            assert list(s.queue) == [tid(1), tid(2)]
            assert s.tasks[tid(1)].retries == attempt + 1
            assert results(s) == {}
    res = results(s)
    assert set(res) == {tid(1), tid(2)}
    for r in res.values():
        assert r[m.R_STATE] == "lost"
        code, message, _, _ = r[m.R_ERROR]
        assert code == "lost" and "block of p2 ended" in message and "2 retries" in message
    assert s.outstanding() == 0 and not s.pools and not s.workers


def test_late_result_after_requeue_is_reported_once():
    s = with_workers(make(min_prefetch=0), W1)
    s.add_tasks([rec(1)])
    s.dispatch()
    sent(s)
    s.pool_lost("p1", "gone")
    with_workers(s, W3, pool="p2")
    s.dispatch()
    assert sent(s) == {W3: [tid(1)]}
    done(s, W1, 1)  # the old worker answers after all
    done(s, W3, 1)
    assert [r[m.R_ID] for r in s.results] == [tid(1)]
    assert not s.workers[W3].assigned


def test_check_pools_uses_the_injected_clock():
    t = [100.0]
    s = with_workers(make(t, heartbeat_threshold_s=10.0, min_prefetch=0), W1)
    s.add_tasks([rec(1)])
    s.dispatch()
    sent(s)
    t[0] = 110.0
    assert s.check_pools() == []  # exactly the threshold: not yet
    assert s.pool_heartbeat("p1", {"workers": 1})
    t[0] = 120.0
    assert s.check_pools() == []
    t[0] = 120.5
    assert s.check_pools() == ["p1"]
    assert "p1" not in s.pools and W1 not in s.workers
    assert list(s.queue) == [tid(1)] and s.tasks[tid(1)].retries == 1
    assert s.pool_heartbeat("p1") is False  # a forgotten pool must register again


def test_check_timeouts_asks_the_pool_to_kill_and_reports_a_timeout():
    t = [0.0]
    s = with_workers(make(t, min_prefetch=0), W1)
    s.add_tasks([rec(1, timeout_s=2.0)])
    s.dispatch()
    sent(s)
    t[0] = 3.0
    s.check_timeouts(grace_s=1.0)
    assert s.kill_requests == []
    t[0] = 3.5
    s.check_timeouts(grace_s=1.0)
    assert [(p, w) for p, w, _ in s.kill_requests] == [("p1", "p1.0")]
    s.check_timeouts(grace_s=1.0)
    assert len(s.kill_requests) == 1  # asked once
    s.worker_died("p1.0", "killed by signal 9")
    res = results(s)[tid(1)]
    assert res[m.R_STATE] == "failed" and res[m.R_ERROR][0] == "task-timeout"
    assert s.counters["worker_lost"] == 0


# ---- cancel ------------------------------------------------------------------------------------


def test_cancel_queued_prefetched_running_and_unknown():
    s = with_workers(make(min_prefetch=1), W1)
    s.add_tasks([rec(1), rec(2), rec(3)])
    s.dispatch()
    assert sent(s) == {W1: [tid(1), tid(2)]}
    refused = s.cancel([tid(3), tid(2), tid(1), tid(99)])
    # running and unknown tasks are refused
    assert refused == [tid(1), tid(99)]
    # the queued one is cancelled here and now
    res = results(s)
    assert list(res) == [tid(3)]
    assert res[tid(3)][m.R_STATE] == "cancelled" and res[tid(3)][m.R_ERROR][0] == "cancelled"
    # the prefetched one is for the worker to drop
    assert [(ident, msg.task_ids) for ident, msg in s.to_workers if isinstance(msg, m.Cancel)] == [
        (W1, [tid(2)])
    ]
    s.to_workers.clear()
    s.dispatch()
    assert sent(s) == {}  # the cancelled queued task is never dispatched
    # the worker reports the prefetched one cancelled
    s.worker_results(W1, [m.result_record(tid(2), "cancelled")])
    assert results(s)[tid(2)][m.R_STATE] == "cancelled"


def test_a_task_cancelled_while_queued_and_sent_again_goes_to_a_worker_once():
    """A cancelled queued task leaves its queue entry behind (dropped when reached); the same id
    sent again must not then sit in the queue twice and reach a worker twice."""
    s = with_workers(make(min_prefetch=4), W1)
    s.add_tasks([rec(1), rec(2)])
    s.dispatch()
    assert sent(s) == {W1: [tid(1), tid(2)]}
    s.add_tasks([rec(3)])
    assert s.cancel([tid(3)]) == []  # still queued: cancelled here, its queue entry left behind
    results(s)
    s.add_tasks([rec(3)])  # the same id again (a resend)
    s.dispatch()
    assert sent(s) == {W1: [tid(3)]}  # once (twice before: both queue entries were dispatched)
    assert list(s.workers[W1].assigned).count(tid(3)) == 1
    s.worker_results(W1, [m.result_record(tid(n), "succeeded", b"\x01\x00") for n in (1, 2, 3)])
    s.dispatch()
    assert sent(s) == {}  # nothing left over to send again
    assert [r[m.R_ID] for r in s.results].count(tid(3)) == 1


# ---- prefetch adapts to task duration -----------------------------------------------------------


def test_prefetch_adapts_to_measured_task_time():
    s = with_workers(
        make(prefetch_target_ms=2.0, min_prefetch=1, max_prefetch=64, no_prefetch_above_ms=100.0), W1
    )
    assert s.prefetch(FAST) == 1  # not measured yet: min_prefetch
    s.add_tasks([rec(1, FAST), rec(2, SLOW)])
    s.dispatch()
    sent(s)
    done(s, W1, 1, seconds=0.0005)
    assert s.prefetch(FAST) == 4  # 2 ms of 0.5 ms tasks
    done(s, W1, 2, seconds=1.0)
    assert s.prefetch(SLOW) == 0  # long tasks are never prefetched
    # an EWMA: one fast run does not make a slow function fast
    s.add_tasks([rec(3, SLOW)])
    s.dispatch()
    sent(s)
    done(s, W1, 3, seconds=0.0001)
    assert s.avg_task_s[SLOW] == pytest.approx(0.8 * 1.0 + 0.2 * 0.0001)
    assert s.prefetch(SLOW) == 0
    # very short tasks: capped at max_prefetch
    s.add_tasks([rec(4, OTHER)])
    s.dispatch()
    sent(s)
    done(s, W1, 4, seconds=0.000001)
    assert s.prefetch(OTHER) == 64


def test_long_tasks_wait_at_the_endpoint_for_an_idle_worker():
    s = with_workers(make(min_prefetch=1), W1, W2)
    s.avg_task_s[SLOW] = 2.0
    s.add_tasks([rec(n, SLOW) for n in range(1, 5)])
    s.dispatch()
    assert sent(s) == {W1: [tid(1)], W2: [tid(2)]}
    assert list(s.queue) == [tid(3), tid(4)]
    # cancelling one that waits at the endpoint answers at once
    assert s.cancel([tid(4)]) == []
    assert results(s)[tid(4)][m.R_STATE] == "cancelled"
    done(s, W2, 2, seconds=2.0)
    s.dispatch()
    assert sent(s) == {W2: [tid(3)]}


def test_short_tasks_fill_a_worker_deeply():
    s = with_workers(make(prefetch_target_ms=2.0, max_prefetch=64), W1)
    s.avg_task_s[FAST] = 0.0001  # 0.1 ms: 20 may wait behind the running one
    s.add_tasks([rec(n) for n in range(1, 31)])
    s.dispatch()
    assert len(sent(s)[W1]) == 21
    assert len(s.queue) == 9


# ---- reporting ---------------------------------------------------------------------------------


def test_running_updates_report_each_head_once():
    s = with_workers(make(min_prefetch=1), W1)
    s.add_tasks([rec(1), rec(2)])
    s.dispatch()
    s.running_updates()
    s.running_updates()
    assert s.states == [[tid(1), "running", 5000.0]]
    done(s, W1, 1)
    s.running_updates()
    assert s.states[-1] == [tid(2), "running", 5000.0] and len(s.states) == 2


def test_idle_pools_and_snapshot():
    s = with_workers(make(min_prefetch=0), W1)
    with_workers(s, W3, pool="p2")
    assert sorted(s.idle_pools()) == ["p1", "p2"]
    s.add_tasks([rec(1), rec(2), rec(3)])
    s.dispatch()
    busy = {ident for ident in sent(s)}
    assert busy == {W1, W3}
    assert s.idle_pools() == []
    snap = s.snapshot()
    assert snap["queued"] == 1 and snap["outstanding"] == 3 and snap["workers"] == 2
    assert snap["pools"]["p1"]["workers"] == 1


# ---- regressions found while building ----------------------------------------------------------


def test_idle_workers_get_work_before_any_worker_prefetches():
    s = with_workers(make(min_prefetch=1), W1, W2)
    s.add_tasks([rec(1), rec(2)])
    s.dispatch()
    assert sent(s) == {W1: [tid(1)], W2: [tid(2)]}


def test_max_prefetch_zero_disables_prefetch():
    s = with_workers(make(min_prefetch=0, max_prefetch=0), W1)
    s.add_tasks([rec(1)])
    s.dispatch()
    sent(s)
    done(s, W1, 1, seconds=0.001)  # a short task: would normally be prefetched
    assert s.prefetch(FAST) == 0
