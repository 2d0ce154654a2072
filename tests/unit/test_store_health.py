"""The task store says when its writer is stuck (issue 11, item 3: "the stall is reported, not
felt"): ``TaskStore.health()`` against a real SQLite database locked by another connection."""

from __future__ import annotations

import sqlite3
import time

import sqlalchemy as sa
from conftest import task_row

from dlhub.manager.store import STALL_S, TaskStore, make_engine, migrate
from dlhub.protocol import messages as m


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def row(n: int) -> dict:
    return task_row(n)


def store_on(path, busy_timeout_ms: int | None = None) -> TaskStore:
    engine = make_engine(f"sqlite:///{path}")
    if busy_timeout_ms is not None:

        @sa.event.listens_for(engine, "connect")
        def _busy_timeout(dbapi_conn, _record):
            dbapi_conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")

    migrate(engine)
    store = TaskStore(engine, on_commit=lambda acks: None)
    store.start()
    return store


def wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_failing_commit_is_reported_stalled_with_its_error_and_ok_once_it_lands(tmp_path):
    store = store_on(tmp_path / "dlhub.db", busy_timeout_ms=50)  # each try fails fast
    locker = sqlite3.connect(tmp_path / "dlhub.db", isolation_level=None)
    try:
        idle = store.health()
        assert idle["state"] == "ok" and idle["pending_writes"] == 0 and idle["stalled_for_s"] is None
        locker.execute("BEGIN EXCLUSIVE")
        store.received([row(1)], [])
        assert wait_for(lambda: store.health()["failed_attempts"] >= 1, 5)
        store.update([(tid(1), {"state": "running"})])  # queued behind the stuck batch
        health = store.health()
        assert health["state"] == "stalled", health
        assert health["stalled_for_s"] > 0
        assert health["pending_writes"] >= 2, health
        assert "locked" in health["last_error"], health
        time.sleep(0.3)
        assert store.health()["last_commit_age_s"] >= 0.3
        locker.execute("ROLLBACK")
        assert store.flush(10)
        health = store.health()
        assert health["state"] == "ok" and health["last_error"] is None, health
        assert health["pending_writes"] == 0 and health["last_commit_age_s"] < 5, health
        assert store.lookup([tid(1)])[tid(1)]["state"] == "running"
    finally:
        locker.close()
        store.close()


def test_a_commit_blocked_on_a_lock_counts_as_stalled_while_it_waits(tmp_path):
    """A commit waiting in SQLite's busy handler has not failed: it is stalled all the same once
    it has run over STALL_S."""
    store = store_on(tmp_path / "dlhub.db")  # the default busy timeout: 5 s of waiting per try
    locker = sqlite3.connect(tmp_path / "dlhub.db", isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        store.received([row(1)], [])
        time.sleep(STALL_S / 2)
        assert store.health()["state"] == "ok"  # a short wait is not a stall
        assert wait_for(lambda: store.health()["state"] == "stalled", STALL_S + 2)
        health = store.health()
        assert health["failed_attempts"] == 0 and health["last_error"] is None, health
        assert health["stalled_for_s"] >= STALL_S and health["pending_writes"] == 1, health
        locker.execute("ROLLBACK")
        assert store.flush(10)
        assert store.health()["state"] == "ok"
    finally:
        locker.close()
        store.close()
