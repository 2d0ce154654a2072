"""The manager's sans-IO Router, driven directly, writing to a real TaskStore on SQLite."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from dlhub.manager.routing import Router
from dlhub.manager.store import TaskStore, make_engine, migrate, unpack_error
from dlhub.protocol import messages as m

CLIENT, CLIENT2 = b"c:client-1", b"c:client-2"
EP_ID, EP_ID2 = b"e:ep:s1", b"e:ep:s2"
FLUSH_S = 10


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def task(n: int, function: str = "sha256:f", payload: bytes = b"\x01\x90") -> list:
    return m.task_record(tid(n), function, payload, None, "auto")


def hello(name: str = "ep", session: str = "s1") -> m.Hello:
    return m.Hello("endpoint", name, "tok", session, {"python": "3.11.7", "dill": "0.4"}, {"pid": 1})


class Acks:
    """on_commit callback: records acks, and checks each acked row is already committed."""

    def __init__(self, db_url: str):
        self.reader = sa.create_engine(db_url)
        self.batches: list[list] = []
        self.visible: list[bool] = []
        self.lock = threading.Lock()

    def __call__(self, acks: list) -> None:
        # a separate connection sees only committed data
        with self.reader.connect() as con:
            ok = all(
                con.execute(sa.text("SELECT 1 FROM tasks WHERE task_id = :t"), {"t": task_id}).first()
                is not None
                for _, _, task_id in acks
            )
        with self.lock:
            self.batches.append(list(acks))
            self.visible.append(ok)

    def all(self) -> list:
        with self.lock:
            return [a for batch in self.batches for a in batch]


@pytest.fixture
def env(db_url):
    engine = make_engine(db_url)
    migrate(engine)
    acks = Acks(db_url)
    store = TaskStore(engine, on_commit=acks)
    store.start()
    t = [1000.0]
    router = Router(store, clock=lambda: t[0], endpoint_timeout_s=30.0, known_endpoints=["ep"])
    try:
        yield router, store, acks, t
    finally:
        store.close()
        acks.reader.dispose()


def flush(store: TaskStore) -> None:
    assert store.flush(FLUSH_S), "store did not flush in time"


def by_kind(out, link, cls):
    return [(ident, msg) for (lk, ident, msg) in out if lk == link and isinstance(msg, cls)]


def connect(router: Router, identity: bytes = EP_ID, session: str = "s1") -> list:
    router.endpoint_hello(identity, hello(session=session))
    return router.drain()


# ---- submit ----------------------------------------------------------------------------------


def test_submit_to_unknown_endpoint_fails_the_tasks_at_once(env):
    router, store, acks, _ = env
    router.submit(CLIENT, "alice", "sess", m.Submit("nope", [task(1), task(2)]))
    out = router.drain()
    assert len(out) == 1
    link, ident, msg = out[0]
    assert (link, ident) == ("client", CLIENT) and isinstance(msg, m.Results)
    assert [r[m.R_ID] for r in msg.results] == [tid(1), tid(2)]
    for res in msg.results:
        assert res[m.R_STATE] == "failed"
        code, message, _, _ = res[m.R_ERROR]
        assert code == "unknown-endpoint"
        assert "'nope'" in message and "ep" in message  # names it and the known ones
    flush(store)
    assert store.lookup([tid(1)]) == {}  # nothing stored for an unknown endpoint
    # the results message round-trips the wire
    assert m.unpack(m.pack(msg)) == msg


def test_submit_while_endpoint_offline_waits_then_hello_sends(env):
    router, store, acks, _ = env
    router.submit(CLIENT, "alice", "sess", m.Submit("ep", [task(1), task(2)]))
    assert by_kind(router.drain(), "endpoint", m.Tasks) == []
    assert list(router.endpoints["ep"].pending) == [tid(1), tid(2)]
    flush(store)
    rows = store.lookup([tid(1), tid(2)])
    assert {r["state"] for r in rows.values()} == {"queued"}
    assert rows[tid(1)]["owner"] == "alice" and rows[tid(1)]["t_dispatched"] is None
    assert ("client", CLIENT, tid(1)) in acks.all() and ("client", CLIENT, tid(2)) in acks.all()

    out = connect(router)
    welcome = by_kind(out, "endpoint", m.Welcome)
    assert welcome and welcome[0][0] == EP_ID
    sent = by_kind(out, "endpoint", m.Tasks)
    assert len(sent) == 1 and sent[0][0] == EP_ID
    assert [r[m.T_ID] for r in sent[0][1].tasks] == [tid(1), tid(2)]
    # the record travels unchanged (payload opaque) but for the origin the manager writes
    assert sent[0][1].tasks[0] == task(1)._replace(origin={"user": "alice", "admin": False})
    assert not router.endpoints["ep"].pending
    flush(store)
    assert {r["state"] for r in store.lookup([tid(1), tid(2)]).values()} == {"dispatched"}


def test_submit_to_connected_endpoint_forwards_at_once(env):
    router, store, _, _ = env
    connect(router)
    router.submit(CLIENT, "alice", "sess", m.Submit("ep", [task(1)]))
    sent = by_kind(router.drain(), "endpoint", m.Tasks)
    assert [(ident, [r[m.T_ID] for r in msg.tasks]) for ident, msg in sent] == [(EP_ID, [tid(1)])]
    assert router.tasks[tid(1)].state == "dispatched"


def test_results_route_back_to_the_submitting_client(env):
    router, store, acks, _ = env
    connect(router)
    router.submit(CLIENT, "alice", "s1", m.Submit("ep", [task(1)]))
    router.submit(CLIENT2, "bob", "s2", m.Submit("ep", [task(2)]))
    router.drain()
    router.endpoint_results(
        EP_ID,
        [
            m.result_record(tid(2), "succeeded", b"\x01\x02", None, [1.0, 2.0], ["hi\n", None]),
            m.result_record(tid(1), "failed", None, ["remote", "ValueError: x", "tb", None], [1.0, 2.0]),
        ],
    )
    out = router.drain()
    results = {ident: msg for ident, msg in by_kind(out, "client", m.Results)}
    assert set(results) == {CLIENT, CLIENT2}
    assert [r[m.R_ID] for r in results[CLIENT].results] == [tid(1)]
    assert results[CLIENT].results[0][m.R_STATE] == "failed"
    assert results[CLIENT2].results[0][m.R_PAYLOAD] == b"\x01\x02"
    assert not router.tasks and not router.endpoints["ep"].inflight
    flush(store)
    rows = store.lookup([tid(1), tid(2)])
    assert rows[tid(2)]["state"] == "succeeded" and rows[tid(2)]["result"] == b"\x01\x02"
    assert rows[tid(2)]["stdout"] == "hi\n"
    assert rows[tid(1)]["state"] == "failed"
    assert unpack_error(rows[tid(1)]["error"]) == ["remote", "ValueError: x", "tb", None]
    # results are acknowledged to the endpoint after they are committed
    assert ("endpoint", EP_ID, tid(1)) in acks.all() and ("endpoint", EP_ID, tid(2)) in acks.all()


def test_duplicate_submit_is_not_forwarded_twice(env):
    router, store, acks, _ = env
    connect(router)
    router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(1)]))
    first = by_kind(router.drain(), "endpoint", m.Tasks)
    # the client resends after a reconnect (new identity): acknowledged again, not forwarded
    router.submit(CLIENT2, "alice", "s", m.Submit("ep", [task(1), task(2)]))
    second = by_kind(router.drain(), "endpoint", m.Tasks)
    assert [r[m.T_ID] for _, msg in first for r in msg.tasks] == [tid(1)]
    assert [r[m.T_ID] for _, msg in second for r in msg.tasks] == [tid(2)]
    assert router.counters["duplicates"] == 1
    flush(store)
    assert ("client-again", CLIENT2, tid(1)) in acks.all()  # a resend's ack: always sent
    # the result goes to the identity that resent it
    router.endpoint_results(EP_ID, [m.result_record(tid(1), "succeeded", b"\x01\x05")])
    assert [ident for ident, _ in by_kind(router.drain(), "client", m.Results)] == [CLIENT2]
    # a resend after the task finished is acknowledged but never runs again
    router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(1)]))
    assert by_kind(router.drain(), "endpoint", m.Tasks) == []
    flush(store)
    assert [a for a in acks.all() if a == ("client-again", CLIENT, tid(1))]


def test_duplicate_result_is_acknowledged_but_delivered_once(env):
    router, store, acks, _ = env
    connect(router)
    router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(1)]))
    router.drain()
    res = m.result_record(tid(1), "succeeded", b"\x01\x05")
    router.endpoint_results(EP_ID, [res])
    router.endpoint_results(EP_ID, [res])
    delivered = [r for _, msg in by_kind(router.drain(), "client", m.Results) for r in msg.results]
    assert delivered == [res]
    flush(store)
    assert acks.all().count(("endpoint", EP_ID, tid(1))) == 2


# ---- cancel ----------------------------------------------------------------------------------


def test_cancel_pending_task_yields_cancelled_result(env):
    router, store, _, _ = env
    router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(1), task(2)]))
    router.drain()
    router.cancel(CLIENT, [tid(1)])
    out = router.drain()
    results = [r for _, msg in by_kind(out, "client", m.Results) for r in msg.results]
    assert len(results) == 1 and results[0][m.R_ID] == tid(1)
    assert results[0][m.R_STATE] == "cancelled" and results[0][m.R_ERROR][0] == "cancelled"
    assert list(router.endpoints["ep"].pending) == [tid(2)]
    # the cancelled task is never sent when the endpoint arrives
    sent = by_kind(connect(router), "endpoint", m.Tasks)
    assert [r[m.T_ID] for _, msg in sent for r in msg.tasks] == [tid(2)]
    flush(store)
    assert store.lookup([tid(1)])[tid(1)]["state"] == "cancelled"


def test_cancel_dispatched_task_is_forwarded_and_unknown_is_refused(env):
    router, _, _, _ = env
    connect(router)
    router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(1)]))
    router.drain()
    router.cancel(CLIENT, [tid(1), tid(99)])
    out = router.drain()
    assert [(ident, msg.task_ids) for ident, msg in by_kind(out, "endpoint", m.Cancel)] == [(EP_ID, [tid(1)])]
    assert [(ident, msg.task_ids) for ident, msg in by_kind(out, "client", m.CancelRefused)] == [
        (CLIENT, [tid(99)])
    ]
    # the endpoint refuses (already running): the refusal reaches the client that submitted
    router.endpoint_cancel_refused(EP_ID, m.CancelRefused([tid(1)], "already running"))
    refused = by_kind(router.drain(), "client", m.CancelRefused)
    assert [(ident, msg.task_ids, msg.reason) for ident, msg in refused] == [
        (CLIENT, [tid(1)], "already running")
    ]


def test_cancel_of_finished_task_is_refused(env):
    router, _, _, _ = env
    connect(router)
    router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(1)]))
    router.endpoint_results(EP_ID, [m.result_record(tid(1), "succeeded", b"\x01\x05")])
    router.drain()
    router.cancel(CLIENT, [tid(1)])
    assert [msg.task_ids for _, msg in by_kind(router.drain(), "client", m.CancelRefused)] == [[tid(1)]]


# ---- endpoint liveness -----------------------------------------------------------------------


def test_tick_marks_a_silent_endpoint_disconnected(env):
    router, _, _, t = env
    connect(router)
    t[0] += 29.0
    router.tick()
    assert router.endpoints["ep"].connected
    assert router.endpoint_heartbeat(EP_ID, {"workers": 2})
    t[0] += 30.0  # exactly the timeout since the heartbeat: still alive
    router.tick()
    assert router.endpoints["ep"].connected
    t[0] += 0.5
    router.tick()
    assert not router.endpoints["ep"].connected
    assert router.status()["endpoints"]["ep"]["connected"] is False
    # while disconnected, new tasks wait instead of being sent into the void
    router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(1)]))
    assert by_kind(router.drain(), "endpoint", m.Tasks) == []
    assert router.tasks[tid(1)].state == "queued"
    # the endpoint comes back (same identity): it gets the waiting task
    sent = by_kind(connect(router), "endpoint", m.Tasks)
    assert [r[m.T_ID] for _, msg in sent for r in msg.tasks] == [tid(1)]


def test_heartbeat_from_unregistered_identity_is_rejected(env):
    router, _, _, _ = env
    assert router.endpoint_heartbeat(b"e:stranger", {}) is False


def test_reconnecting_endpoint_gets_its_inflight_tasks_again(env):
    router, _, _, _ = env
    connect(router, EP_ID, "s1")
    router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(1), task(2)]))
    router.drain()
    router.endpoint_results(EP_ID, [m.result_record(tid(1), "succeeded", b"\x01\x05")])
    router.drain()
    # the endpoint process restarted: new identity, new session
    out = connect(router, EP_ID2, "s2")
    sent = by_kind(out, "endpoint", m.Tasks)
    assert [(ident, [r[m.T_ID] for r in msg.tasks]) for ident, msg in sent] == [(EP_ID2, [tid(2)])]
    assert EP_ID not in router.endpoint_by_identity
    assert router.endpoint_by_identity[EP_ID2] == "ep"


def test_endpoint_states_update_the_task_but_never_a_finished_one(env):
    router, store, _, t = env
    connect(router)
    router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(1)]))
    router.endpoint_states(EP_ID, [[tid(1), "running", 1234.5], [tid(77), "running", 1.0]])
    assert router.task_records([tid(1)])[0]["state"] == "running"
    flush(store)
    assert store.lookup([tid(1)])[tid(1)]["t_started"] == 1234.5
    router.endpoint_results(
        EP_ID, [m.result_record(tid(1), "succeeded", b"\x01\x05", None, [1234.5, 1235.0])]
    )
    router.endpoint_states(EP_ID, [[tid(1), "running", 1236.0]])  # late update: ignored
    flush(store)
    # and the store itself never moves a terminal row back
    store.update([(tid(1), {"state": "running"})])
    flush(store)
    assert store.lookup([tid(1)])[tid(1)]["state"] == "succeeded"


# ---- store ----------------------------------------------------------------------------------


def test_store_persists_rows_and_unfinished_returns_open_tasks(env):
    router, store, _, t = env
    connect(router)
    router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(1), task(2, payload=b"\x01big"), task(3)]))
    router.endpoint_results(EP_ID, [m.result_record(tid(1), "succeeded", b"\x01\x05")])
    flush(store)
    unfinished = store.unfinished()
    assert [r["task_id"] for r in unfinished] == [tid(2), tid(3)]
    assert unfinished[0]["payload"] == b"\x01big" and unfinished[0]["function"] == "sha256:f"
    assert unfinished[0]["endpoint"] == "ep" and unfinished[0]["state"] == "dispatched"
    # a finished task's payload is dropped
    with sa.create_engine(store.engine.url).connect() as con:
        row = con.execute(sa.text("SELECT payload FROM tasks WHERE task_id = :t"), {"t": tid(1)}).first()
    assert row is not None and row[0] is None


def test_recover_requeues_unfinished_tasks_for_their_endpoint(env):
    router, store, acks, _ = env
    connect(router)
    router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(1), task(2)]))
    router.endpoint_results(EP_ID, [m.result_record(tid(1), "succeeded", b"\x01\x05")])
    flush(store)
    # a new router over the same store, as after a manager restart
    fresh = Router(store, clock=lambda: 2000.0)
    fresh.recover(store.unfinished())
    assert list(fresh.endpoints["ep"].pending) == [tid(2)]
    out = connect(fresh)
    sent = by_kind(out, "endpoint", m.Tasks)
    assert [r for _, msg in sent for r in msg.tasks] == [
        task(2)._replace(origin={"user": "alice", "admin": False})
    ]
    # a client that fetches the task later gets the result routed to it
    fresh.tasks[tid(2)].client = CLIENT2
    fresh.endpoint_results(EP_ID, [m.result_record(tid(2), "succeeded", b"\x01\x06")])
    assert [ident for ident, _ in by_kind(fresh.drain(), "client", m.Results)] == [CLIENT2]


def test_acks_are_delivered_only_after_commit(env):
    router, store, acks, _ = env
    connect(router)
    for n in range(1, 51):
        router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(n)]))
    router.endpoint_results(EP_ID, [m.result_record(tid(n), "succeeded", b"\x01\x05") for n in range(1, 26)])
    flush(store)
    client_acks = {a[2] for a in acks.all() if a[0] == "client"}
    endpoint_acks = {a[2] for a in acks.all() if a[0] == "endpoint"}
    assert client_acks == {tid(n) for n in range(1, 51)}
    assert endpoint_acks == {tid(n) for n in range(1, 26)}
    # every ack batch was visible in the database to another connection when it was reported
    assert acks.visible and all(acks.visible)
    assert store.commits >= 1


def test_task_records_memory_then_database(env):
    router, store, _, _ = env
    connect(router)
    router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(1), task(2)]))
    router.endpoint_results(
        EP_ID, [m.result_record(tid(1), "succeeded", b"\x01\x05", None, [1.0, 2.0], ["printed\n", None])]
    )
    records = router.task_records([tid(1), tid(2), tid(3)])
    # the finished task reads as finished at once, with its captured output
    assert records[0]["state"] == "succeeded" and records[0]["stdout"] == "printed\n"
    assert "result" not in records[0] and "payload" not in records[0]
    assert records[1] == {"task_id": tid(2), "state": "dispatched", "endpoint": "ep"}
    assert records[2] == {"task_id": tid(3), "state": "unknown"}


def test_code_is_stored_and_served_after_a_restart(env):
    router, store, _, _ = env
    router.put_code("sha256:abc", b"\x10blob")
    assert router.code_for(["sha256:abc", "sha256:missing"]) == {"sha256:abc": b"\x10blob"}
    flush(store)
    fresh = Router(store)
    assert fresh.code_for(["sha256:abc"]) == {"sha256:abc": b"\x10blob"}
    assert fresh.code_for(["sha256:missing"]) == {}
