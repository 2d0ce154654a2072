"""Fair share at the endpoint: each pool's queue serves users round-robin (sans-IO Scheduler, fake
clock, no sleeps). A user with thousands of tasks waiting must not make another's single call
wait behind all of them; cancel and requeue keep each user's turn."""

from __future__ import annotations

from dlhub.endpoint.scheduler import FairQueue, Scheduler
from dlhub.protocol import messages as m
from dlhub.protocol.policy import Policy

FAST = "sha256:fast"
W1, W2, W3 = b"w:p1.0", b"w:p1.1", b"w:p1.2"
USERS = {"a": "alice", "b": "bob", "c": "carol"}


def tid(user: str, n: int) -> bytes:
    """Task ids that say whose they are: ``tid("a", 3)`` is alice's third."""
    return user.encode() + n.to_bytes(m.TASK_ID_BYTES - 1, "big")


def name(task_id: bytes) -> str:
    return f"{task_id[:1].decode()}{int.from_bytes(task_id[1:], 'big')}"


def recs(user: str, first: int, last: int) -> list[list]:
    origin = {"user": USERS[user], "admin": False}
    return [
        m.task_record(tid(user, n), FAST, b"\x01\x90", None, "auto", None, None, origin)
        for n in range(first, last + 1)
    ]


def make(*workers: bytes, **kwargs) -> Scheduler:
    s = Scheduler(clock=lambda: 0.0, wall_clock=lambda: 5000.0, **kwargs)
    s.add_code({FAST: b"\x10fast"})
    s.add_pool(b"p:p1", "p1", "0", {})
    for ident in workers:
        s.add_worker(ident, ident[2:].decode(), "p1")
    return s


def sent(s: Scheduler) -> list[str]:
    """Names of the tasks sent to workers since the last call, in order (clears the outbox)."""
    out = [name(r[m.T_ID]) for _, msg in s.to_workers if isinstance(msg, m.Tasks) for r in msg.tasks]
    s.to_workers.clear()
    return out


def finish_head(s: Scheduler, worker: bytes, measured: bool = False) -> None:
    """The worker's running task succeeds (``measured``: a 1 ms run, which sets the prefetch)."""
    head = s.workers[worker].assigned[0]
    timing = [100.0, 100.001] if measured else None
    s.worker_results(worker, [m.result_record(head, "succeeded", b"\x01\x00", None, timing)])


def test_one_task_of_bob_overtakes_ten_thousand_of_alice():
    s = make(W1)  # min_prefetch 0: a worker holds only its running task
    s.add_tasks(recs("a", 1, 10_000))
    s.dispatch()
    assert sent(s) == ["a1"]
    s.add_tasks(recs("b", 1, 1))
    order = []
    for _ in range(3):
        finish_head(s, W1)
        s.dispatch()
        order += sent(s)
    # FIFO would send b1 after a10000; round-robin sends it within the next two dispatches
    assert order == ["a2", "b1", "a3"]
    assert len(s.queue) == 10_000 - 3


def test_bob_waits_behind_at_most_the_prefetched_tasks():
    s = make(W1, W2)
    s.add_tasks(recs("a", 1, 10_000))
    s.dispatch()
    sent(s)
    for w in (W1, W2):  # alice's function is measured (1 ms): 2 ms of work may wait per worker
        finish_head(s, w, measured=True)
    assert s.prefetch(FAST) == 2
    s.dispatch()
    sent(s)
    assert [len(w.assigned) for w in s.workers.values()] == [3, 3]
    s.add_tasks(recs("b", 1, 1))
    finish_head(s, W1)
    finish_head(s, W2)
    s.dispatch()
    # one of the next two free slots is bob's: then only what is prefetched there runs before it
    assert sent(s) == ["a9", "b1"]
    assert [name(t) for t in s.workers[W2].assigned] == ["a6", "a8", "b1"]


def test_round_robin_across_three_users():
    s = make(W1)
    s.add_tasks(recs("a", 1, 4) + recs("b", 1, 2) + recs("c", 1, 3))
    expected = ["a1", "b1", "c1", "a2", "b2", "c2", "a3", "c3", "a4"]
    assert [name(t) for t in s.queue] == expected  # iteration is the dispatch order
    order = []
    s.dispatch()
    order += sent(s)
    while s.workers[W1].assigned:
        finish_head(s, W1)
        s.dispatch()
        order += sent(s)
    assert order == expected
    assert not s.queue and s.queue.users() == {}


def test_round_robin_holds_through_the_endpoint_policy_which_clears_the_origin():
    """On a real endpoint the policy check drops the origin from the record (workers need none):
    the user must be kept for the queue before that."""
    s = make(W1)
    s.policy = Policy("ep", "alice", allowed_users=["*"])
    s.add_tasks(recs("a", 1, 3) + recs("b", 1, 2))
    assert all(t.record[m.T_ORIGIN] is None for t in s.tasks.values())
    assert [name(t) for t in s.queue] == ["a1", "b1", "a2", "b2", "a3"]


def test_a_cancelled_task_costs_its_user_no_turn_and_an_emptied_user_leaves_the_ring():
    s = make(W1)
    s.add_tasks(recs("a", 1, 3) + recs("b", 1, 2) + recs("c", 1, 1))
    assert s.cancel([tid("a", 1), tid("b", 1), tid("b", 2)]) == []
    order = []
    s.dispatch()
    order += sent(s)
    while s.workers[W1].assigned:
        finish_head(s, W1)
        s.dispatch()
        order += sent(s)
    assert order == ["a2", "c1", "a3"]


def test_tasks_requeued_from_a_dead_worker_keep_their_place():
    s = make(W1, W2, min_prefetch=2)  # up to 3 tasks a worker
    s.add_tasks(recs("a", 1, 1000))
    s.dispatch()
    assert sent(s) == ["a1", "a3", "a5", "a2", "a4", "a6"]
    s.add_tasks(recs("b", 1, 2))
    s.worker_died("p1.0", "killed")  # a1 fails (WorkerLost); a3 and a5 go back to alice's front
    assert [name(t) for t in s.queue][:5] == ["a3", "b1", "a5", "b2", "a7"]
    s.add_worker(W3, "p1.2", "p1")
    s.dispatch()
    assert sent(s) == ["a3", "b1", "a5"]


def test_a_requeued_user_with_nothing_waiting_is_served_next():
    s = make(W1, min_prefetch=2)
    s.add_tasks(recs("a", 1, 1) + recs("b", 1, 1) + recs("a", 2, 2))
    s.dispatch()
    assert sent(s) == ["a1", "b1", "a2"]
    s.add_tasks(recs("c", 1, 2))
    s.pool_lost("p1", "block ended")  # everything re-queued, a retry counted each
    assert [name(t) for t in s.queue] == ["a1", "b1", "c1", "a2", "c2"]
    assert all(s.tasks[t].retries == 1 for t in (tid("a", 1), tid("a", 2), tid("b", 1)))


def test_fair_queue_with_one_user_is_a_fifo():
    q = FairQueue()
    for n in range(5):
        q.push(bytes([n]), None)
    q.push(b"\x09", None, front=True)
    assert list(q) == [b"\x09", b"\x00", b"\x01", b"\x02", b"\x03", b"\x04"] and len(q) == 6
    assert q.peek() == b"\x09" and q.pop() == b"\x09" and q.pop(served=False) == b"\x00"
    assert q.users() == {None: 4}
    q.clear()
    assert not q and len(q) == 0
