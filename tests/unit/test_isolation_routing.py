"""Isolation in the sans-IO Router and the store (issue 10, items 3 and 4): a task belongs to its
submitter, news of a task comes only from the endpoint it went to, an endpoint name belongs to
its first owner. Driven directly, on a real TaskStore (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib

import pytest

from dlhub.manager.routing import Router, code_matches
from dlhub.manager.store import TaskStore, claim_endpoint, endpoint_owner, make_engine, migrate
from dlhub.protocol import messages as m

ALICE, BOB, ADMIN = b"c:alice", b"c:bob", b"c:admin"
EP, ROGUE = b"e:ep:s1", b"e:rogue:s1"
FLUSH_S = 10


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def task(n: int) -> list:
    return m.task_record(tid(n), "sha256:f", b"\x01", None, "auto")


def hello(name: str) -> m.Hello:
    return m.Hello("endpoint", name, "tok", "s1", {"python": "3.11.7", "dill": "0.4"}, {"pid": 1})


@pytest.fixture
def env(db_url):
    engine = make_engine(db_url)
    migrate(engine)
    store = TaskStore(engine, on_commit=lambda acks: None)
    store.start()
    router = Router(store, known_endpoints=["ep"])
    router.endpoint_hello(EP, hello("ep"))
    router.endpoint_hello(ROGUE, hello("rogue"))
    router.submit(ALICE, "alice", "sa", m.Submit("ep", [task(1), task(2)]))
    router.drain()
    try:
        yield router, store, engine
    finally:
        store.close()


def test_another_users_tasks_read_as_unknown_in_memory_and_in_the_store(env):
    router, store, _ = env
    router.endpoint_results(EP, [m.result_record(tid(2), "succeeded", b"\xa2ok")])
    assert store.flush(FLUSH_S)
    unknown = [{"task_id": tid(1), "state": "unknown"}, {"task_id": tid(2), "state": "unknown"}]
    assert router.task_records([tid(1), tid(2)], "bob") == unknown
    mine = router.task_records([tid(1), tid(2)], "alice")
    assert mine[0]["state"] == "dispatched" and mine[1]["state"] == "succeeded"
    assert router.task_records([tid(1), tid(2)], None) == mine  # an admin sees all


def test_cancel_of_another_users_task_is_refused_like_an_unknown_id(env):
    router, _, _ = env
    router.cancel(BOB, [tid(1), tid(99)], "bob")
    out = router.drain()
    assert out == [("client", BOB, m.CancelRefused([tid(1), tid(99)], "not cancellable"))]
    router.cancel(ALICE, [tid(1)], "alice")
    assert router.drain() == [("endpoint", EP, m.Cancel([tid(1)]))]


def test_a_duplicate_id_from_another_user_neither_steals_nor_resubmits(env):
    router, _, _ = env
    router.submit(BOB, "bob", "sb", m.Submit("ep", [task(1)]))
    [(link, ident, msg)] = router.drain()
    assert (link, ident) == ("client", BOB) and msg.results[0][m.R_STATE] == "failed"
    assert router.tasks[tid(1)].client == ALICE
    router.endpoint_results(EP, [m.result_record(tid(1), "succeeded", b"\xa2ok")])
    assert [(lk, ident) for lk, ident, _ in router.drain()] == [("client", ALICE)]


def test_results_states_and_cancel_answers_only_from_the_dispatched_endpoint(env, caplog):
    router, _, _ = env
    router.endpoint_results(ROGUE, [m.result_record(tid(1), "succeeded", b"\xa6forged")])
    router.endpoint_states(ROGUE, [[tid(1), "running", 1.0]])
    router.endpoint_cancel_refused(ROGUE, m.CancelRefused([tid(1)], "forged"))
    assert router.drain() == []
    assert router.tasks[tid(1)].state == "dispatched"
    assert "'rogue'" in caplog.text and tid(1).hex() in caplog.text and "'ep'" in caplog.text
    router.endpoint_results(EP, [m.result_record(tid(1), "succeeded", b"\xa2ok")])
    [(_, ident, msg)] = router.drain()
    assert ident == ALICE and msg.results[0][m.R_PAYLOAD] == b"\xa2ok"


def test_recovered_tasks_keep_their_submitter(env):
    router, store, _ = env
    assert store.flush(FLUSH_S)
    fresh = Router(store)
    fresh.recover(store.unfinished())
    assert fresh.tasks[tid(1)].owner == "alice"
    assert fresh.task_records([tid(1)], "bob") == [{"task_id": tid(1), "state": "unknown"}]
    assert fresh.task_records([tid(1)], "alice")[0]["state"] == "queued"


def test_code_matches_only_its_own_digest():
    blob = b"\x10code"
    assert code_matches("sha256:" + hashlib.sha256(blob).hexdigest(), blob)
    assert not code_matches("sha256:" + hashlib.sha256(b"other").hexdigest(), blob)
    assert not code_matches(hashlib.sha256(blob).hexdigest(), blob)  # the prefix is part of it


def test_an_endpoint_name_is_claimed_once(db_url):
    engine = make_engine(db_url)
    migrate(engine)
    assert endpoint_owner(engine, "site") is None
    assert claim_endpoint(engine, "site", "ep-carol") == "ep-carol"
    assert claim_endpoint(engine, "site", "ep-bob") == "ep-carol"
    assert endpoint_owner(engine, "site") == "ep-carol"
    engine.dispose()
