"""``TaskStore.after_commit``: a callback runs only once every write queued before it is committed
(the Globus Compute API publishes results to AMQP this way, issue 13), and waits while the commit
is blocked by another connection's lock."""

from __future__ import annotations

import sqlite3
import threading

from test_store_health import row, store_on, tid


def state_of(path, n: int) -> str | None:
    conn = sqlite3.connect(path)
    try:
        found = conn.execute("SELECT state FROM tasks WHERE task_id = ?", (tid(n),)).fetchone()
        return found[0] if found else None
    finally:
        conn.close()


def test_after_commit_runs_once_the_writes_before_it_are_durable(tmp_path):
    path = tmp_path / "dlhub.db"
    store = store_on(path, busy_timeout_ms=50)
    locker = sqlite3.connect(path, isolation_level=None)
    seen: list[str | None] = []
    ran = threading.Event()
    try:
        store.received([row(1)], [])
        assert store.flush(10)
        locker.execute("BEGIN EXCLUSIVE")  # the next commit cannot land
        store.update([(tid(1), {"state": "succeeded", "result": b"49", "payload": None})])
        store.after_commit(lambda: (seen.append(state_of(path, 1)), ran.set()))
        assert not ran.wait(0.5)  # not while the result is uncommitted
        locker.execute("ROLLBACK")
        assert ran.wait(10)
        assert seen == ["succeeded"]  # another connection reads the committed result
    finally:
        locker.close()
        store.close()


def test_a_failing_after_commit_callback_does_not_stop_the_writer(tmp_path):
    store = store_on(tmp_path / "dlhub.db")
    try:
        store.after_commit(lambda: 1 / 0)
        store.received([row(2)], [])
        assert store.flush(10)
        assert store.lookup([tid(2)])[tid(2)]["state"] == "dispatched"
    finally:
        store.close()
