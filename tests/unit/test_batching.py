"""Endpoint batching of vectorized servables in the sans-IO Scheduler, on a fake clock (no sleeps):
size and delay triggers, weights, idle workers only, the ``batches`` field of ``Tasks``, cancels,
the histogram and queue delay, worker reports (warm sets, per-servable counts) and the warm
preference of plain servable dispatch."""

from __future__ import annotations

import pytest

from dlhub.endpoint.scheduler import Scheduler
from dlhub.protocol import messages as m

VEC = "servable:" + "a" * 64  # a vectorized servable (batched once it has a policy)
PLAIN = "servable:" + "b" * 64  # a servable without a policy
FN = "sha256:f"  # a plain function
W1, W2 = b"w:p1.0", b"w:p1.1"


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def rec(n: int, function: str = VEC, options: dict | None = None) -> list:
    return m.task_record(tid(n), function, b"\x01\x90", None, "auto", None, options)


def make(t: list[float], *workers: bytes, policy: dict | None = None, label: str = "jane/vec:1") -> Scheduler:
    s = Scheduler(clock=lambda: t[0], wall_clock=lambda: 5000.0)
    s.add_code({VEC: b"\x20vec", PLAIN: b"\x20plain", FN: b"\x10fn"})
    if policy is not None:
        s.set_batching(VEC, policy, label)
    s.add_pool(b"p:p1", "p1", "0", {})
    for ident in workers:
        s.add_worker(ident, ident[2:].decode(), "p1")
    return s


def messages(s: Scheduler) -> list[tuple[bytes, m.Tasks]]:
    """Tasks messages sent since the last call (the outbox is cleared)."""
    out = [(ident, msg) for ident, msg in s.to_workers if isinstance(msg, m.Tasks)]
    s.to_workers.clear()
    return out


def finish(s: Scheduler, worker: bytes, ids: list[bytes]) -> None:
    s.worker_results(worker, [m.result_record(i, "succeeded", b"\x01\x00", None, [1.0, 1.001]) for i in ids])


# ---- size and delay ----------------------------------------------------------------------------


def test_a_full_batch_goes_at_once_before_its_delay():
    t = [100.0]
    s = make(t, W1, policy={"max_batch_size": 4, "max_batch_delay_ms": 1000})
    s.add_tasks([rec(n) for n in (1, 2, 3)])
    s.dispatch()
    assert messages(s) == []  # 3 of 4, delay not over: it fills
    assert s.batching_snapshot()["waiting"] == 3
    assert s.next_batch_deadline() == pytest.approx(101.0)

    s.add_tasks([rec(4)])
    s.dispatch()  # same instant: full by count
    [(ident, msg)] = messages(s)
    assert ident == W1
    assert [r[m.T_ID] for r in msg.tasks] == [tid(1), tid(2), tid(3), tid(4)]
    assert msg.batches == [[tid(1), tid(2), tid(3), tid(4)]]
    assert msg.code == {VEC: b"\x20vec"}  # the worker had never seen it
    assert m.unpack(m.pack(msg)) == msg  # the batches field travels
    assert s.next_batch_deadline() is None
    assert list(s.workers[W1].assigned) == [tid(1), tid(2), tid(3), tid(4)]
    assert VEC in s.workers[W1].warm


def test_more_than_a_batch_splits_over_idle_workers_and_the_rest_fills():
    t = [0.0]
    s = make(t, W1, W2, policy={"max_batch_size": 4, "max_batch_delay_ms": 500})
    s.add_tasks([rec(n) for n in range(1, 11)])
    s.dispatch()
    out = dict((ident, msg.batches) for ident, msg in messages(s))
    ids = [tid(n) for n in range(1, 11)]
    assert sorted(out.values()) == sorted([[ids[0:4]], [ids[4:8]]])
    assert s.batching_snapshot()["waiting"] == 2  # a partial third batch waits for its delay
    assert s.next_batch_deadline() == pytest.approx(0.5)


def test_a_partial_batch_waits_for_the_delay_since_the_first_call():
    t = [100.0]
    s = make(t, W1, policy={"max_batch_size": 8, "max_batch_delay_ms": 50})
    s.add_tasks([rec(1)])
    s.dispatch()
    t[0] = 100.03
    s.add_tasks([rec(2)])
    s.dispatch()
    assert messages(s) == []
    # the timer runs from the FIRST waiting call, not the latest
    assert s.next_batch_deadline() == pytest.approx(100.05)
    t[0] = 100.045
    s.dispatch()
    assert messages(s) == []
    t[0] = 100.051
    s.dispatch()
    [(ident, msg)] = messages(s)
    assert ident == W1 and msg.batches == [[tid(1), tid(2)]]
    assert s.next_batch_deadline() is None
    delay = s.batching_snapshot()["queue_delay_ms"]
    assert delay["count"] == 2
    assert delay["max"] == pytest.approx(51.0, abs=0.01)
    assert delay["mean"] == pytest.approx((51.0 + 21.0) / 2, abs=0.01)


def test_delay_zero_adds_no_latency_a_lone_call_goes_at_once_as_a_batch_of_one():
    t = [7.0]
    s = make(t, W1, policy={"max_batch_size": 16, "max_batch_delay_ms": 0})
    s.add_tasks([rec(1)])
    assert s.next_batch_deadline() is None  # due already: nothing to wake for, it goes now
    s.dispatch()
    [(ident, msg)] = messages(s)
    assert ident == W1 and msg.batches == [[tid(1)]]
    snap = s.batching_snapshot()
    assert snap["queue_delay_ms"] == {"mean": 0.0, "max": 0.0, "count": 1}
    assert snap["batch_size_histogram"] == {"1": 1}


def test_delay_zero_batches_what_already_waits():
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 16, "max_batch_delay_ms": 0})
    s.add_tasks([rec(n) for n in (1, 2, 3)])  # arrived together, before the loop dispatches
    s.dispatch()
    [(_, msg)] = messages(s)
    assert msg.batches == [[tid(1), tid(2), tid(3)]]


def test_the_default_policy_is_size_64_and_no_delay():
    t = [0.0]
    s = make(t, W1, policy={})
    s.add_tasks([rec(n) for n in range(1, 71)])
    s.dispatch()
    [(_, msg)] = messages(s)
    assert msg.batches == [[tid(n) for n in range(1, 65)]]
    assert s.batching_snapshot()["waiting"] == 6


# ---- idle workers only -------------------------------------------------------------------------


def test_batches_go_only_to_idle_workers_and_keep_filling_meanwhile():
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 4, "max_batch_delay_ms": 0})
    s.add_tasks([rec(1)])
    s.dispatch()
    [(_, first)] = messages(s)
    assert first.batches == [[tid(1)]]
    # W1 runs that batch: the next calls are due (delay 0) but wait for an idle worker
    s.add_tasks([rec(n) for n in (2, 3, 4, 5, 6)])
    t[0] = 1.0
    s.dispatch()
    assert messages(s) == []
    assert s.batching_snapshot()["waiting"] == 5
    finish(s, W1, [tid(1)])
    t[0] = 1.5
    s.dispatch()
    [(ident, msg)] = messages(s)
    assert ident == W1 and msg.batches == [[tid(2), tid(3), tid(4), tid(5)]]  # up to the size
    assert msg.code == {}  # sent with the first batch already
    assert s.batching_snapshot()["waiting"] == 1
    # a busy worker with a regular task is not idle either
    s2 = make(t, W1, policy={"max_batch_size": 4, "max_batch_delay_ms": 0})
    s2.add_tasks([rec(1, FN)])
    s2.dispatch()
    messages(s2)
    s2.add_tasks([rec(2)])
    s2.dispatch()
    assert messages(s2) == []


def test_an_idle_worker_with_the_servable_warm_gets_the_batch():
    t = [0.0]
    s = make(t, W1, W2, policy={"max_batch_size": 4, "max_batch_delay_ms": 0})
    s.worker_info(W2, {"warm": [VEC]})
    s.add_tasks([rec(1)])
    s.dispatch()
    [(ident, _)] = messages(s)
    assert ident == W2


def test_draining_pool_gets_no_batches():
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 4, "max_batch_delay_ms": 0})
    s.drain_pool_in("p1", 0.0)
    s.add_tasks([rec(1)])
    s.dispatch()
    assert messages(s) == []
    assert s.batching_snapshot()["waiting"] == 1


# ---- weights -----------------------------------------------------------------------------------


def test_weight_len_counts_the_first_arguments_length():
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 100, "max_batch_delay_ms": 1000, "weight": "len"})
    s.add_tasks([rec(n, options={"len": 30}) for n in (1, 2, 3)])  # 90 atoms of 100
    s.dispatch()
    assert messages(s) == []
    s.add_tasks([rec(4, options={"len": 30})])  # 120 >= 100: full
    s.dispatch()
    [(_, msg)] = messages(s)
    assert msg.batches == [[tid(1), tid(2), tid(3)]]  # 90; a fourth would exceed 100
    assert s.batching_snapshot()["waiting"] == 1
    stats = s.servable_stats["jane/vec:1"]
    assert stats["batches"] == 1 and stats["batched_calls"] == 90  # by weight
    assert s.batching_snapshot()["batch_size_histogram"] == {"128": 1}


def test_weight_len_a_call_heavier_than_the_limit_goes_alone():
    t = [0.0]
    s = make(t, W1, W2, policy={"max_batch_size": 100, "max_batch_delay_ms": 1000, "weight": "len"})
    s.add_tasks([rec(1, options={"len": 250}), rec(2, options={"len": 10})])
    s.dispatch()
    [(ident, msg)] = messages(s)
    assert msg.batches == [[tid(1)]]
    assert s.batching_snapshot()["waiting"] == 1  # 10 of 100: waits for its delay


def test_weight_len_without_a_len_option_counts_one():
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 3, "max_batch_delay_ms": 1000, "weight": "len"})
    s.add_tasks([rec(1), rec(2), rec(3, options={"len": 0})])  # no len, no len, len 0 -> 1 each
    s.dispatch()
    [(_, msg)] = messages(s)
    assert msg.batches == [[tid(1), tid(2), tid(3)]]


def test_weight_count_ignores_len_but_an_explicit_client_batch_weighs_its_size():
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 8, "max_batch_delay_ms": 1000})
    s.add_tasks([rec(n, options={"len": 50}) for n in (1, 2)])  # count: 2 of 8
    s.dispatch()
    assert messages(s) == []
    s.add_tasks([rec(3, options={"batch": True, "len": 5})])  # 5 inputs in one call: 7 of 8
    s.dispatch()
    assert messages(s) == []
    s.add_tasks([rec(4)])  # 8 of 8
    s.dispatch()
    [(_, msg)] = messages(s)
    assert msg.batches == [[tid(1), tid(2), tid(3), tid(4)]]
    assert s.servable_stats["jane/vec:1"]["batched_calls"] == 8


# ---- cancel ------------------------------------------------------------------------------------


def test_cancelled_calls_drop_out_of_a_waiting_batch():
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 8, "max_batch_delay_ms": 100})
    s.add_tasks([rec(n) for n in (1, 2, 3, 4)])
    s.dispatch()
    assert s.cancel([tid(1), tid(3)]) == []  # waiting at the endpoint: cancelled here
    cancelled = {r[m.R_ID]: r for r in s.results}
    assert set(cancelled) == {tid(1), tid(3)}
    assert {r[m.R_STATE] for r in cancelled.values()} == {"cancelled"}
    t[0] = 0.2
    s.dispatch()
    [(_, msg)] = messages(s)
    assert msg.batches == [[tid(2), tid(4)]]
    assert [r[m.T_ID] for r in msg.tasks] == [tid(2), tid(4)]
    assert s.batching_snapshot()["waiting"] == 0
    assert s.next_batch_deadline() is None


def test_a_batch_whose_calls_are_all_cancelled_sends_nothing():
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 8, "max_batch_delay_ms": 100})
    s.add_tasks([rec(1), rec(2)])
    s.cancel([tid(1), tid(2)])
    t[0] = 1.0
    s.dispatch()
    assert messages(s) == []
    assert s.batching_snapshot()["batches"] == 0 and not s.workers[W1].assigned


def test_cancelled_calls_do_not_count_towards_a_full_batch():
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 3, "max_batch_delay_ms": 1000})
    s.add_tasks([rec(n) for n in (1, 2, 3)])
    s.cancel([tid(2)])  # 2 live calls of 3: not full, not due
    s.dispatch()
    assert messages(s) == []


def test_waiting_count_excludes_cancelled_calls():
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 8, "max_batch_delay_ms": 1000})
    s.add_tasks([rec(n) for n in (1, 2, 3)])
    s.cancel([tid(2)])
    assert s.batching_snapshot()["waiting"] == 2


# ---- histogram, queue delay, per-servable counts ------------------------------------------------


def test_histogram_and_queue_delay_in_the_batching_snapshot():
    t = [10.0]
    s = make(t, W1, policy={"max_batch_size": 8, "max_batch_delay_ms": 0})
    for size, start in ((1, 1), (3, 10), (4, 20), (5, 30)):
        s.add_tasks([rec(n) for n in range(start, start + size)])
        t[0] += 0.004  # each batch's calls waited 4 ms
        s.dispatch()
        [(_, msg)] = messages(s)
        assert len(msg.batches[0]) == size
        finish(s, W1, msg.batches[0])
    snap = s.batching_snapshot()
    # power-of-two buckets: 1 -> 1, 3 -> 4, 4 -> 4, 5 -> 8
    assert snap["batch_size_histogram"] == {"1": 1, "4": 2, "8": 1}
    assert snap["batches"] == 4 and snap["waiting"] == 0
    assert snap["queue_delay_ms"]["count"] == 13
    assert snap["queue_delay_ms"]["mean"] == pytest.approx(4.0, abs=0.01)
    assert snap["queue_delay_ms"]["max"] == pytest.approx(4.0, abs=0.01)
    assert s.snapshot()["servables"]["jane/vec:1"]["batches"] == 4
    assert s.snapshot()["servables"]["jane/vec:1"]["batched_calls"] == 13
    assert s.snapshot()["batching"] == snap


def test_an_empty_batching_snapshot():
    s = make([0.0], W1)
    assert s.batching_snapshot() == {
        "batch_size_histogram": {},
        "batches": 0,
        "queue_delay_ms": {"mean": None, "max": 0.0, "count": 0},
        "waiting": 0,
    }


def test_worker_info_updates_warm_sets_and_per_servable_counts():
    t = [0.0]
    s = make(t, W1, W2, policy={"max_batch_size": 4}, label="jane/vec:1")
    s.worker_info(W1, {"warm": [VEC, PLAIN, 7]})  # non-strings ignored
    assert s.workers[W1].warm == {VEC, PLAIN}
    s.worker_info(W1, {"warm": [PLAIN]})  # replaced: VEC was evicted there
    assert s.workers[W1].warm == {PLAIN}
    s.worker_info(W1, {"warm": "nonsense"})  # malformed: kept
    assert s.workers[W1].warm == {PLAIN}

    s.worker_info(W1, {"servables": {VEC: {"loads": 1, "output_cache_misses": 2}}})
    s.worker_info(W2, {"servables": {VEC: {"loads": 1, "evictions": 1, "output_cache_hits": 3}}})
    s.worker_info(W2, {"servables": {PLAIN: {"loads": "many", "evictions": 2}, FN: "bad"}})
    s.worker_info(b"w:unknown", {"servables": {PLAIN: {"loads": 1}}})  # counts even so
    servables = s.snapshot()["servables"]
    assert servables["jane/vec:1"] == {  # the label set with the policy names it
        "batches": 0,
        "batched_calls": 0,
        "loads": 2,
        "evictions": 1,
        "output_cache_hits": 3,
        "output_cache_misses": 2,
    }
    assert servables[PLAIN]["loads"] == 1 and servables[PLAIN]["evictions"] == 2  # no label: function
    assert FN not in servables


# ---- plain dispatch --------------------------------------------------------------------------------


def test_functions_without_a_policy_use_the_regular_queue():
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 4, "max_batch_delay_ms": 1000})
    s.add_tasks([rec(1, FN), rec(2, PLAIN)])
    assert list(s.queue) == [tid(1), tid(2)] and s.batch_queues == {}
    s.dispatch()
    [(ident, msg)] = messages(s)
    assert [r[m.T_ID] for r in msg.tasks] == [tid(1)]  # an unmeasured function: no prefetch
    assert msg.batches == []
    assert s.next_batch_deadline() is None
    # a policy removed: the servable goes back to the regular queue
    s.set_batching(VEC, None)
    s.add_tasks([rec(3)])
    assert list(s.queue)[-1] == tid(3) and not any(s.batch_queues.values())


def test_plain_servable_dispatch_goes_to_the_least_loaded_worker_even_if_another_is_warm():
    t = [0.0]
    s = make(t, W1, W2)
    s.add_tasks([rec(1, FN)])
    s.dispatch()
    assert [i for i, _ in messages(s)] == [W1]
    s.worker_info(W1, {"warm": [PLAIN]})
    s.add_tasks([rec(2, PLAIN)])  # W1 is warm but busy, W2 idle
    s.dispatch()
    assert [i for i, _ in messages(s)] == [W2]
    assert PLAIN in s.workers[W2].warm  # it will load it there


def test_plain_servable_dispatch_prefers_an_equally_loaded_warm_worker():
    t = [0.0]
    s = make(t, W1, W2)
    s.worker_info(W2, {"warm": [PLAIN]})
    s.add_tasks([rec(1, PLAIN)])
    s.dispatch()
    assert [i for i, _ in messages(s)] == [W2]


def test_a_due_batch_waiting_for_a_busy_worker_sets_no_deadline():
    """The loop must not spin (poll with no wait) while a due batch waits for a worker."""
    t = [10.0]
    s = make(t, W1, policy={"max_batch_size": 4, "max_batch_delay_ms": 0})
    s.add_tasks([rec(1)])
    s.dispatch()
    assert len(messages(s)) == 1  # W1 is busy now
    s.add_tasks([rec(2), rec(3)])
    s.dispatch()
    assert messages(s) == [] and s.next_batch_deadline() is None
    finish(s, W1, [tid(1)])
    s.dispatch()
    [(ident, msg)] = messages(s)
    assert msg.batches == [[tid(2), tid(3)]]


def test_batches_of_one_use_the_regular_queue():
    """max_batch_size 1 is no batching: calls go through the regular queue (with prefetch)."""
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 1})
    assert VEC not in s.batching
    s.add_tasks([rec(1)])
    assert list(s.queue) == [tid(1)]


# ---- fairness between users ------------------------------------------------------------------------


def rec_of(n: int, user: str) -> list:
    return m.task_record(tid(n), VEC, b"\x01\x90", None, "auto", None, None, {"user": user, "admin": False})


def test_a_batch_takes_users_in_turn_not_the_oldest_users_flood():
    """alice has 100 calls of a batched servable waiting, bob then sends 1: bob's call rides in
    the next batch (one call of each user a turn), not behind alice's 100."""
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 8, "max_batch_delay_ms": 0})
    s.add_tasks([rec_of(n, "alice") for n in range(1, 101)])
    s.dispatch()
    [(_, first)] = messages(s)  # W1 busy with alice's first batch
    assert first.batches == [[tid(n) for n in range(1, 9)]]
    s.add_tasks([rec_of(1000, "bob")])
    finish(s, W1, first.batches[0])
    s.dispatch()
    [(_, second)] = messages(s)
    assert tid(1000) in second.batches[0], "bob's call waited behind alice's flood"
    assert len(second.batches[0]) == 8


def test_a_requeued_batched_call_goes_first_and_a_single_user_keeps_fifo():
    t = [0.0]
    s = make(t, W1, policy={"max_batch_size": 4, "max_batch_delay_ms": 0})
    s.add_tasks([rec_of(n, "alice") for n in range(1, 9)])
    s.dispatch()
    [(_, first)] = messages(s)
    assert first.batches == [[tid(1), tid(2), tid(3), tid(4)]]
    finish(s, W1, first.batches[0])
    s.dispatch()
    [(_, second)] = messages(s)
    assert second.batches == [[tid(5), tid(6), tid(7), tid(8)]]  # one user: plain FIFO
