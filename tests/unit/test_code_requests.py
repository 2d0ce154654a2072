"""Code requests at the endpoint: a reply settles only what its own request asked (issue 11).

The interleaving of the race, made deterministic: tasks of function A arrive and A is asked for;
tasks of B arrive and B is asked for; the reply to the first request (A only) comes. B's tasks
must keep waiting for the second reply, not fail with ``function code ... is unknown``.
"""

from __future__ import annotations

from dlhub.endpoint.scheduler import Scheduler
from dlhub.protocol import messages as m

A, B, C = "sha256:aaaa", "sha256:bbbb", "sha256:cccc"


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def rec(n: int, digest: str) -> list:
    return m.task_record(tid(n), digest, b"\x01\x90", None, "auto")


def make() -> Scheduler:
    s = Scheduler(clock=lambda: 0.0, wall_clock=lambda: 5000.0)
    s.add_pool(b"p:p1", "p1", "0", {})
    s.add_worker(b"w:p1.0", "p1.0", "p1")
    return s


def test_a_reply_does_not_fail_digests_asked_after_its_request():
    s = make()
    s.add_tasks([rec(1, A)])
    assert s.take_code_requests() == [A]
    s.add_tasks([rec(2, B)])  # arrives before A's reply: asked in a second request
    assert s.take_code_requests() == [B]
    s.code_reply({A: b"\x10a"})  # the answer to the first request only
    assert s.results == [], [r[m.R_ERROR] for r in s.results]
    assert B in s.waiting_code and tid(2) in s.tasks
    s.code_reply({B: b"\x10b"})
    assert list(s.queues["default"]) == [tid(1), tid(2)]  # both ready to dispatch
    assert not s.code_asked and not s.waiting_code


def test_a_digest_the_reply_lacks_fails_only_the_tasks_that_request_asked_for():
    s = make()
    s.add_tasks([rec(1, A), rec(2, C)])
    assert s.take_code_requests() == [A, C]
    s.add_tasks([rec(3, B)])
    s.take_code_requests()
    s.code_reply({A: b"\x10a"})  # C is unknown at the manager; B was not asked in this request
    failed = {r[m.R_ID]: r for r in s.results}
    assert list(failed) == [tid(2)]
    assert failed[tid(2)][m.R_STATE] == "failed" and C in failed[tid(2)][m.R_ERROR][1]
    assert B in s.waiting_code
    s.code_reply({})  # B's request: unknown as well
    assert [r[m.R_ID] for r in s.results] == [tid(2), tid(3)]


def test_an_empty_reply_belongs_to_the_oldest_request():
    s = make()
    s.add_tasks([rec(1, A)])
    s.take_code_requests()
    s.add_tasks([rec(2, B)])
    s.take_code_requests()
    s.code_reply({})
    assert [r[m.R_ID] for r in s.results] == [tid(1)] and B in s.waiting_code


def test_a_new_manager_session_asks_again_for_code_still_waiting():
    s = make()
    s.add_tasks([rec(1, A), rec(2, B)])
    s.take_code_requests()
    s.code_link_reset()  # the requests may be lost with the old session: ask again, fail nothing
    assert sorted(s.take_code_requests()) == [A, B]
    s.code_reply({A: b"\x10a", B: b"\x10b"})
    assert s.results == [] and not s.waiting_code


def test_a_reply_from_before_the_reset_fails_nothing():
    s = make()
    s.add_tasks([rec(1, A)])
    s.take_code_requests()
    s.code_link_reset()
    s.code_reply({B: b"\x10b"})  # matches no pending request (B was never asked): kept, nothing failed
    assert s.results == [] and A in s.waiting_code and B in s.code


def test_code_evicted_before_dispatch_is_asked_again_once_without_receiving_the_task_again(monkeypatch):
    import dlhub.endpoint.code_wait as code_wait_module

    monkeypatch.setattr(code_wait_module, "CODE_CACHE_BYTES", 12)
    s = make()
    s.add_code({A: b"\x10aaaaaaa"})
    s.add_tasks([rec(1, A), rec(2, A)])
    s.add_code({B: b"\x10bbbbbbb"})  # over the cache: A is evicted, its tasks still queued
    assert A not in s.code
    s.dispatch()
    assert s.to_workers == [] and s.take_code_requests() == [A]
    assert s.waiting_code[A] == [tid(1), tid(2)] and s.outstanding() == 2
    assert s.counters["received"] == 2  # the same tasks, not received again
    s.code_reply({A: b"\x10aaaaaaa"})
    s.dispatch()
    assert [r[m.T_ID] for _, msg in s.to_workers for r in msg.tasks] == [tid(1)]
