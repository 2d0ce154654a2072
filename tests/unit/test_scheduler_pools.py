"""Scheduler: named pools (choice by resources, per-pool queues and dispatch), draining,
pausing and refusing. Helpers come from test_scheduler."""

from __future__ import annotations

from test_scheduler import FAST, W1, W2, done, make, rec, results, sent, tid, with_workers

from dlhub.endpoint.scheduler import Scheduler
from dlhub.protocol import messages as m

# ---- named pools: choice by resources, per-pool queues and dispatch ------------------------------

CPU_OFFERS = {"cores": None, "memory_gb": None, "gpus": 0}
GPU_OFFERS = {"cores": None, "memory_gb": None, "gpus": 1}
G1, G2 = b"w:g1.0", b"w:g1.1"


def make_pools(t: list[float] | None = None, **kwargs) -> Scheduler:
    """Two named pools: ``default`` (CPU workers W1, W2 in block p1) and ``gpu`` (G1, G2 in g1)."""
    s = make(t, pool_offers={"default": dict(CPU_OFFERS), "gpu": dict(GPU_OFFERS)}, **kwargs)
    s.add_pool(b"p:p1", "p1", "default/0", {})
    s.add_pool(b"p:g1", "g1", "gpu/0", {})
    for ident in (W1, W2):
        s.add_worker(ident, ident[2:].decode(), "p1", pool_name="default")
    for ident in (G1, G2):
        s.add_worker(ident, ident[2:].decode(), "g1", pool_name="gpu")
    return s


def rrec(n: int, resources: dict | None, digest: str = FAST) -> list:
    return m.task_record(tid(n), digest, b"\x01\x90", None, "auto", resources)


def test_choose_pool():
    s = make(pool_offers={"default": dict(CPU_OFFERS), "gpu": dict(GPU_OFFERS)})
    assert s.choose_pool(None) == ("default", "")
    assert s.choose_pool({}) == ("default", "")
    assert s.choose_pool({"pool": "gpu"}) == ("gpu", "")
    assert s.choose_pool({"pool": "default"}) == ("default", "")
    assert s.choose_pool({"gpus": 1}) == ("gpu", "")
    assert s.choose_pool({"gpus": 0}) == ("default", "")
    assert s.choose_pool({"cores": 4, "memory_gb": 2}) == ("default", "")  # undeclared: fits
    pool, why = s.choose_pool({"gpus": 2})
    assert pool is None
    assert "no pool offers {'gpus': 2} per worker" in why and "default:" in why and "gpu:" in why
    pool, why = s.choose_pool({"pool": "nope"})
    assert pool is None and why == "no pool named 'nope' at this endpoint (pools: default, gpu)"
    pool, why = s.choose_pool({"pool": "default", "gpus": 1})  # the named pool has no GPU
    assert pool is None and "{'pool': 'default', 'gpus': 1}" in why


def test_choose_pool_with_declared_cores_and_memory():
    s = make(
        pool_offers={
            "default": {"cores": 2, "memory_gb": 4, "gpus": 0},
            "fat": {"cores": 16, "memory_gb": 256, "gpus": 0},
        }
    )
    assert s.choose_pool({"cores": 2, "memory_gb": 4}) == ("default", "")
    assert s.choose_pool({"cores": 2.5}) == ("fat", "")
    assert s.choose_pool({"memory_gb": 100}) == ("fat", "")
    assert s.choose_pool({"memory_gb": 300})[0] is None
    # a single-pool endpoint never offers GPUs unless it declares accelerators
    assert make().choose_pool({"gpus": 1})[0] is None


def test_impossible_resources_fail_at_once():
    s = make_pools()
    # unknown code too: the task fails before any code is asked for
    s.add_tasks([rrec(1, {"gpus": 2}, "sha256:unseen"), rrec(2, {"pool": "nope"}), rrec(3, None)])
    res = results(s)
    assert set(res) == {tid(1), tid(2)}
    for n in (1, 2):
        assert res[tid(n)][m.R_STATE] == "failed" and res[tid(n)][m.R_ERROR][0] == "resources"
    assert "no pool offers" in res[tid(1)][m.R_ERROR][1]
    assert "no pool named 'nope'" in res[tid(2)][m.R_ERROR][1]
    assert s.code_requests == [] and s.outstanding() == 1
    assert list(s.queues["default"]) == [tid(3)] and not s.queues["gpu"]


def test_the_error_is_resource_unavailable_for_the_client():
    from dlhub.protocol import ResourceUnavailable
    from dlhub.protocol.errors import exception_from_record

    s = make_pools()
    s.add_tasks([rrec(1, {"gpus": 8})])
    exc = exception_from_record(results(s)[tid(1)][m.R_ERROR])
    assert isinstance(exc, ResourceUnavailable) and "gpus" in str(exc)


def test_tasks_queue_per_pool_and_go_only_to_their_pools_workers():
    s = make_pools(min_prefetch=2)
    s.add_tasks([rrec(n, {"gpus": 1}) for n in range(1, 7)] + [rrec(n, None) for n in range(7, 9)])
    assert list(s.queues["gpu"]) == [tid(n) for n in range(1, 7)]
    assert list(s.queues["default"]) == [tid(7), tid(8)]
    assert s.outstanding("gpu") == 6 and s.outstanding("default") == 2
    s.dispatch()
    out = sent(s)
    gpu_tasks = {tid(n) for n in range(1, 7)}
    assert set(out.get(G1, []) + out.get(G2, [])) == gpu_tasks
    assert set(out.get(W1, []) + out.get(W2, [])) == {tid(7), tid(8)}
    snap = s.snapshot()
    assert snap["queued_by_pool"] == {"default": 0, "gpu": 0}


def test_gpu_tasks_wait_for_gpu_workers_while_cpu_workers_are_idle():
    s = make(min_prefetch=4, pool_offers={"default": dict(CPU_OFFERS), "gpu": dict(GPU_OFFERS)})
    with_workers(s, W1, W2)  # default-pool workers only
    s.add_tasks([rrec(1, {"gpus": 1}), rrec(2, {"pool": "gpu"}), rrec(3, {})])
    s.dispatch()
    assert sent(s) == {W1: [tid(3)]}
    assert list(s.queues["gpu"]) == [tid(1), tid(2)]
    s.dispatch()
    assert sent(s) == {}  # still nowhere to go
    s.add_pool(b"p:g1", "g1", "gpu/0", {})
    s.add_worker(G1, "g1.0", "g1", pool_name="gpu")
    s.dispatch()
    assert sent(s) == {G1: [tid(1), tid(2)]}


def test_a_lost_worker_requeues_into_its_own_pool():
    s = make_pools(min_prefetch=1)
    s.add_tasks([rrec(n, {"gpus": 1}) for n in range(1, 5)])
    s.dispatch()
    out = sent(s)
    assert out == {G1: [tid(1), tid(3)], G2: [tid(2), tid(4)]}
    s.worker_died("g1.0", "exit code 1")
    assert results(s)[tid(1)][m.R_ERROR][0] == "worker-lost"
    assert list(s.queues["gpu"]) == [tid(3)] and not s.queues["default"]
    s.pool_lost("g1", "block gpu/0 ended")
    # G2's running and prefetched tasks go back first, in order, each with a retry counted
    assert list(s.queues["gpu"]) == [tid(2), tid(4), tid(3)] and not s.queues["default"]
    assert s.tasks[tid(2)].retries == 1 and s.tasks[tid(3)].retries == 0
    s.dispatch()
    assert sent(s) == {}  # the default pool's idle workers never take them


# ---- draining, pausing, refusing ---------------------------------------------------------------


def test_drain_pool_in_stops_dispatch_to_that_pool_after_the_time():
    t = [100.0]
    s = make_pools(t, min_prefetch=0)
    s.drain_pool_in("g1", 30.0)
    s.drain_pool_in("no-such-pool", 1.0)  # ignored
    s.add_tasks([rrec(1, {"gpus": 1})])
    t[0] = 129.9
    s.dispatch()
    assert sent(s) == {G1: [tid(1)]}
    assert s.snapshot()["pools"]["g1"]["draining"] is False
    done(s, G1, 1)
    t[0] = 130.0
    assert s.snapshot()["pools"]["g1"]["draining"] is True
    s.add_tasks([rrec(2, {"gpus": 1}), rrec(3, None)])
    s.dispatch()
    assert sent(s) == {W1: [tid(3)]}  # the other pool is unaffected
    assert list(s.queues["gpu"]) == [tid(2)]
    # a new block of the same pool takes the work
    s.add_pool(b"p:g2", "g2", "gpu/1", {})
    s.add_worker(b"w:g2.0", "g2.0", "g2", pool_name="gpu")
    s.dispatch()
    assert sent(s) == {b"w:g2.0": [tid(2)]}


def test_paused_dispatches_nothing_until_resumed():
    s = make_pools(min_prefetch=0)
    s.paused = True
    s.add_tasks([rrec(1, None), rrec(2, {"gpus": 1})])
    s.dispatch()
    assert sent(s) == {} and s.outstanding() == 2
    s.paused = False
    s.dispatch()
    out = sent(s)
    assert tid(1) in out.get(W1, []) + out.get(W2, []) and tid(2) in out.get(G1, []) + out.get(G2, [])


def test_refuse_pool_fails_its_waiting_and_later_tasks_only():
    from dlhub.protocol import errors

    s = make_pools(min_prefetch=0)
    s.add_tasks([rrec(1, None), rrec(2, None), rrec(3, None), rrec(4, {"gpus": 1})])
    s.dispatch()
    assert sent(s) == {W1: [tid(1)], W2: [tid(2)], G1: [tid(4)]}
    assert list(s.queues["default"]) == [tid(3)]
    s.add_tasks(
        [
            rrec(5, None, "sha256:unseen"),
            rrec(6, {"gpus": 1}),
            rrec(7, {"gpus": 1}, "sha256:unseen"),
        ]
    )
    assert s.code_requests == ["sha256:unseen"]
    error = errors.infra_error("lost", "cannot start workers in pool 'gpu'")
    s.refuse_pool("gpu", error)
    res = results(s)
    # the gpu pool's queued task and its task waiting for code fail; the default pool's stay
    assert set(res) == {tid(6), tid(7)}
    assert all(r[m.R_STATE] == "failed" and r[m.R_ERROR][:2] == error[:2] for r in res.values())
    assert not s.queues["gpu"] and list(s.queues["default"]) == [tid(3)]
    # the task running in the refused pool finishes normally
    done(s, G1, 4)
    assert results(s)[tid(4)][m.R_STATE] == "succeeded"
    # later tasks for the pool fail at once; others are queued, or fail for their own reason
    s.add_tasks([rrec(8, {"pool": "gpu"}), rrec(9, None), rrec(10, {"gpus": 5})])
    res = results(s)
    assert res[tid(8)][m.R_ERROR][:2] == error[:2]
    assert res[tid(10)][m.R_ERROR][0] == "resources"
    assert tid(9) not in res and list(s.queues["default"]) == [tid(3), tid(9)]
    done(s, W1, 1)
    done(s, W2, 2)
    results(s)
    s.add_code({"sha256:unseen": b"\x10unseen"})  # the default pool's waiting task goes on
    s.dispatch()
    out = sent(s)
    assert sorted(out) == [W1, W2] and sorted(out[W1] + out[W2]) == [tid(3), tid(9)]
    assert list(s.queues["default"]) == [tid(5)]
    assert s.refused_pools == {"gpu": error}


def test_a_prefetched_tasks_time_limit_counts_from_when_it_starts():
    t = [0.0]
    s = with_workers(make(t, min_prefetch=1), W1)
    s.add_tasks([rec(1, timeout_s=2.0), rec(2, timeout_s=2.0)])
    s.dispatch()
    assert sent(s) == {W1: [tid(1), tid(2)]}
    t[0] = 1.5
    done(s, W1, 1)  # task 2 starts now
    t[0] = 4.0  # 4 s after dispatch, 2.5 s after it started: within limit + grace
    s.check_timeouts(grace_s=1.0)
    assert s.kill_requests == []
    t[0] = 4.6
    s.check_timeouts(grace_s=1.0)
    assert [(p, w) for p, w, _ in s.kill_requests] == [("p1", "p1.0")]
    assert "time limit of 2.0 s" in s.kill_requests[0][2]


def test_tasks_without_a_time_limit_are_never_killed():
    t = [0.0]
    s = with_workers(make(t, min_prefetch=0), W1)
    s.add_tasks([rec(1)])
    s.dispatch()
    t[0] = 1e6
    s.check_timeouts()
    assert s.kill_requests == []
