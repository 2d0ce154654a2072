"""Exactly once across restarts, at the manager's store and router: a resent task whose result is
stored is never sent to an endpoint again, and a group commit that fails is retried until it lands."""

from __future__ import annotations

import sqlite3
import threading
import time

import sqlalchemy as sa
from conftest import fresh_pg_database, task_row

from dlhub.manager.routing import Router
from dlhub.manager.store import TaskStore, make_engine, migrate
from dlhub.protocol import messages as m

EP_ID = b"e:ep:s1"
CLIENT = b"c:client-1"


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def task(n: int) -> list:
    return m.task_record(tid(n), "sha256:f", b"\x01\x90", None, "auto")


def hello(session: str = "s1") -> m.Hello:
    return m.Hello("endpoint", "ep", "tok", session, {"python": "3.11.7"}, {"pid": 1})


class Acks:
    def __init__(self):
        self.got: list = []
        self.lock = threading.Lock()

    def __call__(self, acks: list) -> None:
        with self.lock:
            self.got.extend(acks)

    def ids(self, kind: str) -> set[bytes]:
        with self.lock:
            return {t for k, _, t in self.got if k == kind}


def sent_to_endpoint(out) -> list[bytes]:
    return [
        r[m.T_ID]
        for link, _, msg in out
        if link == "endpoint" and isinstance(msg, m.Tasks)
        for r in msg.tasks
    ]


def test_resent_tasks_whose_result_is_stored_are_not_run_again(db_url):
    """The manager is killed after it committed results it had not yet delivered (nor acked the
    submissions): the client resends those tasks to the restarted manager, which must recognise
    them from the store instead of dispatching them again."""
    engine = make_engine(db_url)
    migrate(engine)
    store = TaskStore(engine, on_commit=Acks())
    store.start()
    try:
        router = Router(store, clock=lambda: 1000.0, known_endpoints=["ep"])
        router.endpoint_hello(EP_ID, hello())
        router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(n) for n in range(1, 6)]))
        router.endpoint_results(EP_ID, [m.result_record(tid(n), "succeeded", b"\x01\x05") for n in (1, 2, 3)])
        assert store.flush(10)
        # a new router over the same store, as after kill -9 and a restart
        acks = Acks()
        store._on_commit = acks
        fresh = Router(store, clock=lambda: 2000.0, known_endpoints=store.endpoint_names())
        fresh.recover(store.unfinished())
        fresh.endpoint_hello(EP_ID, hello("s2"))
        assert sorted(sent_to_endpoint(fresh.drain())) == [tid(4), tid(5)]  # re-queued, unfinished
        # the client resends all five (it holds no ack for any of them)
        fresh.submit(CLIENT, "alice", "s", m.Submit("ep", [task(n) for n in range(1, 6)]))
        assert sent_to_endpoint(fresh.drain()) == []  # nothing runs again
        assert store.flush(10)
        # each is acknowledged again, tagged as a resend (the broker never skips those acks)
        assert acks.ids("client-again") == {tid(n) for n in range(1, 6)}
        assert fresh.counters["duplicates"] == 5
        # and the stored results are untouched (the client's Fetch reads them)
        rows = store.lookup([tid(n) for n in (1, 2, 3)])
        assert all(r["state"] == "succeeded" and r["result"] == b"\x01\x05" for r in rows.values())
    finally:
        store.close()


def test_recently_finished_is_bounded_and_newest_last(db_url):
    engine = make_engine(db_url)
    migrate(engine)
    store = TaskStore(engine, on_commit=Acks())
    store.start()
    try:
        t = [1000.0]
        router = Router(store, clock=lambda: t[0], known_endpoints=["ep"])
        router.endpoint_hello(EP_ID, hello())
        router.submit(CLIENT, "alice", "s", m.Submit("ep", [task(n) for n in range(1, 6)]))
        for n in range(1, 5):
            t[0] += 1
            router.endpoint_results(EP_ID, [m.result_record(tid(n), "failed" if n == 2 else "succeeded")])
        assert store.flush(10)
        assert store.recently_finished(3) == [
            (tid(2), "failed"),
            (tid(3), "succeeded"),
            (tid(4), "succeeded"),
        ]
    finally:
        store.close()


def test_a_group_commit_blocked_by_a_database_lock_is_retried_until_it_lands(tmp_path):
    """Another process holds the SQLite database locked past the writer's busy timeout: the
    commit fails, is retried, and lands once the lock is released; nothing is dropped and
    the acks come only after it landed."""
    path = tmp_path / "dlhub.db"
    engine = make_engine(f"sqlite:///{path}")

    @sa.event.listens_for(engine, "connect")
    def _short_busy_timeout(dbapi_conn, _record):  # fail fast instead of waiting 5 s per try
        dbapi_conn.execute("PRAGMA busy_timeout=50")

    migrate(engine)
    acks = Acks()
    store = TaskStore(engine, on_commit=acks)
    store.start()
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # a real lock held by another connection
        rows = [task_row(n) for n in range(1, 61)]
        store.received(rows, [("client", CLIENT, tid(n)) for n in range(1, 61)])
        time.sleep(1.0)
        assert store.commit_failures >= 1, "the lock did not make the commit fail"
        assert acks.ids("client") == set(), "acknowledged before the rows were committed"
        locker.execute("ROLLBACK")
        assert store.flush(10)
        assert acks.ids("client") == {tid(n) for n in range(1, 61)}
        assert len(store.lookup([tid(n) for n in range(1, 61)])) == 60
    finally:
        locker.close()
        store.close()


def test_a_group_commit_on_a_dropped_connection_is_retried_on_a_new_one(tmp_path):
    """PostgreSQL: every backend of the database is terminated under the writer (a restarted
    server, a dropped link); its next commit fails, and it lands on a fresh connection."""
    with fresh_pg_database("t_") as url:
        engine = make_engine(url)
        migrate(engine)
        acks = Acks()
        store = TaskStore(engine, on_commit=acks)
        store.start()
        try:
            store.received([task_row(1)], [("client", CLIENT, tid(1))])
            assert store.flush(10) and acks.ids("client") == {tid(1)}  # the writer has a connection
            killer = sa.create_engine(url)
            with killer.connect() as con:
                n = con.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar()
            assert n >= 1
            store.received([task_row(2)], [("client", CLIENT, tid(2))])
            assert store.flush(10)
            assert acks.ids("client") == {tid(1), tid(2)}
            assert store.commit_failures >= 1, "the dropped connection did not make the commit fail"
            with killer.connect() as con:
                count = con.execute(sa.text("SELECT count(*) FROM tasks")).scalar()
            assert count == 2
            killer.dispose()
        finally:
            store.close()
