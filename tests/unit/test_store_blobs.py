"""Large payloads and results live in a content-addressed file store, not in SQL rows (issue 15,
item 1): the row holds a short marker, every reader gets the full bytes back, a payload file is
freed once its task's terminal update has committed (unless another live task shares it), and a
restarted manager reads what the last one wrote. SQLite and PostgreSQL (the ``db_url`` fixture)."""

from __future__ import annotations

import array
import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import task_row

from dlhub.manager import store as store_mod
from dlhub.manager.store import (
    BLOB_MARKER_LEN,
    BLOB_MIN_BYTES,
    TaskStore,
    blob_marker,
    blob_path,
    make_engine,
    migrate,
    tasks_table,
)
from dlhub.protocol import messages as m

MIB = 1024 * 1024


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def row(n: int, payload) -> dict:
    return task_row(n, payload, t_received=float(n))


def finished(result=None) -> dict:
    return {"state": "succeeded", "t_finished": time.time(), "result": result, "payload": None}


def content(size: int, seed: int = 1) -> bytes:
    return (bytes([1, seed]) * (size // 2 + 1))[:size]  # starts with a serializer id (0x01)


def open_store(url: str, blob_dir: Path | None, **kwargs) -> TaskStore:
    engine = make_engine(url)
    migrate(engine)
    store = TaskStore(engine, on_commit=lambda acks: None, blob_dir=blob_dir, **kwargs)
    store.start()
    return store


def raw(store: TaskStore, n: int, column: str) -> bytes | None:
    """The column as stored, without resolving a marker."""
    col = sa.type_coerce(tasks_table.c[column], sa.LargeBinary)
    with store.engine.connect() as conn:
        value = conn.execute(sa.select(col).where(tasks_table.c.task_id == tid(n))).scalar()
    return None if value is None else bytes(value)


def file_of(blob_dir: Path, kind: str, data: bytes) -> Path:
    return blob_path(blob_dir, kind, hashlib.sha256(data).hexdigest())


@pytest.fixture
def blobs(tmp_path) -> Path:
    return tmp_path / "task-blobs"


def test_large_payload_and_result_are_files_and_every_reader_gets_the_bytes(db_url, blobs):
    payload, result = content(MIB, 1), content(MIB, 2)
    store = open_store(db_url, blobs)
    try:
        store.received([row(1, payload), row(2, payload)], [])
        assert store.flush(10)
        assert raw(store, 1, "payload") == blob_marker(hashlib.sha256(payload).hexdigest())
        assert len(raw(store, 1, "payload")) == BLOB_MARKER_LEN
        assert file_of(blobs, "payload", payload).read_bytes() == payload
        assert {r["task_id"]: r["payload"] for r in store.unfinished()} == {tid(1): payload, tid(2): payload}

        store.update([(tid(1), finished(result))])
        assert store.flush(10)
        assert raw(store, 1, "result") == blob_marker(hashlib.sha256(result).hexdigest())
        assert file_of(blobs, "result", result).read_bytes() == result
        assert store.lookup([tid(1)])[tid(1)]["result"] == result
        assert store.read([tid(1)], finished=[tid(1)])[tid(1)]["result"] == result
        with store.engine.connect() as conn:
            t = tasks_table
            assert conn.execute(sa.select(t.c.result).where(t.c.task_id == tid(1))).scalar() == result
            whole = conn.execute(sa.select(t).where(t.c.task_id == tid(2))).one()
            assert whole._mapping["payload"] == payload
        # task 2 still runs with the same content: the shared payload file stays
        assert file_of(blobs, "payload", payload).exists()
        store.update([(tid(2), finished(b"\x01small"))])
        assert store.flush(10)
        assert not file_of(blobs, "payload", payload).exists()  # the last reference is gone
        assert not file_of(blobs, "payload", payload).parent.exists()  # and its emptied folder
        assert file_of(blobs, "result", result).exists()  # results live with their rows
        assert store.lookup([tid(2)])[tid(2)]["result"] == b"\x01small"
    finally:
        store.close()


def test_the_raw_sqlite_column_holds_only_the_marker(tmp_path, blobs):
    path = tmp_path / "dlhub.db"
    payload, result = content(MIB, 3), content(MIB, 4)
    store = open_store(f"sqlite:///{path}", blobs)
    try:
        store.received([row(1, payload)], [])
        store.update([(tid(1), {"state": "running", "t_started": 2.0})])
        store.received([row(2, payload)], [])
        store.update([(tid(2), finished(result))])  # received and finished in one group commit
        assert store.flush(10)
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        stored = dict(conn.execute("SELECT task_id, length(payload) FROM tasks").fetchall())
        assert stored == {tid(1): BLOB_MARKER_LEN, tid(2): None}
        (res,) = conn.execute("SELECT result FROM tasks WHERE task_id = ?", (tid(2),)).fetchone()
        assert res == b"\x00dlhub-blob\x00" + hashlib.sha256(result).hexdigest().encode()
    finally:
        conn.close()
    assert file_of(blobs, "payload", payload).exists()  # task 1 is unfinished


def test_small_values_stay_in_the_row(db_url, blobs):
    small = content(1024, 5)
    edge = content(BLOB_MIN_BYTES - 1, 6)
    store = open_store(db_url, blobs)
    try:
        store.received([row(1, small), row(2, edge)], [])
        store.update([(tid(1), finished(small))])
        assert store.flush(10)
        assert raw(store, 1, "result") == small
        assert raw(store, 2, "payload") == edge
        assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*"))
    finally:
        store.close()


def test_memoryview_and_bytearray_values_are_written_whole(db_url, blobs):
    backing = bytearray(content(MIB + 8, 7))
    view = memoryview(backing)[8:]  # a slice, as of a received ZeroMQ frame
    doubles = memoryview(array.array("d", range(BLOB_MIN_BYTES // 8)))  # len() counts items, not bytes
    store = open_store(db_url, blobs)
    try:
        store.received([row(1, view), row(2, bytearray(content(MIB, 8)))], [])
        store.update([(tid(2), finished(doubles))])
        assert store.flush(10)
        assert {r["task_id"]: r["payload"] for r in store.unfinished()} == {tid(1): bytes(view)}
        assert store.lookup([tid(2)])[tid(2)]["result"] == doubles.tobytes()
        assert len(raw(store, 2, "result")) == BLOB_MARKER_LEN
        assert file_of(blobs, "payload", bytes(view)).stat().st_size == MIB
    finally:
        store.close()


def test_a_restarted_store_reads_results_and_payloads_and_frees_what_it_inherited(db_url, blobs):
    payload, result = content(MIB, 9), content(MIB, 10)
    store = open_store(db_url, blobs)
    try:
        store.received([row(1, payload), row(2, payload), row(3, content(MIB, 11))], [])
        store.update([(tid(3), finished(result))])
        assert store.flush(10)
    finally:
        store.close()
    assert store_mod.BLOB_DIRS.count(blobs) == 0  # the closed store unregistered its directory

    again = open_store(db_url, blobs)
    try:
        assert {r["task_id"]: r["payload"] for r in again.unfinished()} == {tid(1): payload, tid(2): payload}
        assert again.lookup([tid(3)])[tid(3)]["result"] == result
        assert not file_of(blobs, "payload", content(MIB, 11)).exists()
        # the refcount was rebuilt from the unfinished rows: freed after both, not after one
        again.update([(tid(1), finished(b"\x01"))])
        assert again.flush(10)
        assert file_of(blobs, "payload", payload).exists()
        again.update([(tid(2), finished(b"\x01"))])
        assert again.flush(10)
        assert not file_of(blobs, "payload", payload).exists()
        assert file_of(blobs, "result", result).exists()  # results live as long as their row
    finally:
        again.close()


def test_a_commit_that_fails_and_is_retried_counts_its_payload_once(tmp_path, blobs):
    path = tmp_path / "dlhub.db"
    engine = make_engine(f"sqlite:///{path}")

    @sa.event.listens_for(engine, "connect")
    def _busy_timeout(dbapi_conn, _record):
        dbapi_conn.execute("PRAGMA busy_timeout=50")

    migrate(engine)
    store = TaskStore(engine, on_commit=lambda acks: None, blob_dir=blobs)
    store.start()
    payload = content(MIB, 12)
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        store.received([row(1, payload)], [])
        deadline = time.monotonic() + 10
        while store.commit_failures < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.commit_failures >= 2
        locker.execute("ROLLBACK")
        assert store.flush(10)
        assert store.unfinished()[0]["payload"] == payload
        store.update([(tid(1), finished(b"\x01"))])
        assert store.flush(10)
        assert not file_of(blobs, "payload", payload).exists()
    finally:
        locker.close()
        store.close()


def test_the_default_blob_directory_is_beside_the_sqlite_file_and_in_memory_spills_nothing(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'dlhub.db'}", None)
    try:
        assert store.blob_dir == tmp_path.resolve() / "task-blobs"
        store.received([row(1, content(MIB, 13))], [])
        assert store.flush(10)
        assert file_of(store.blob_dir, "payload", content(MIB, 13)).exists()
    finally:
        store.close()
    memory = open_store("sqlite://", None)
    try:
        assert memory.blob_dir is None
    finally:
        memory.close()


def test_old_unreferenced_payload_files_are_swept_at_start(tmp_path, blobs):
    url = f"sqlite:///{tmp_path / 'dlhub.db'}"
    live = content(MIB, 14)
    store = open_store(url, blobs)
    try:
        store.received([row(1, live)], [])
        assert store.flush(10)
    finally:
        store.close()
    orphan, fresh = content(100, 15), content(100, 16)
    for data in (orphan, fresh):
        path = file_of(blobs, "payload", data)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    old = time.time() - store_mod.ORPHAN_AGE_S - 60
    os.utime(file_of(blobs, "payload", orphan), (old, old))
    os.utime(file_of(blobs, "payload", live), (old, old))
    again = open_store(url, blobs)
    try:
        assert not file_of(blobs, "payload", orphan).exists()  # a kill's leftover
        kept = {file_of(blobs, "payload", d).parent for d in (fresh, live)}
        assert file_of(blobs, "payload", orphan).parent not in kept  # (the contents are fixed)
        assert not file_of(blobs, "payload", orphan).parent.exists()  # its folder went with it
        assert all(folder.exists() for folder in kept)
        assert file_of(blobs, "payload", fresh).exists()  # maybe a commit still on its way
        assert file_of(blobs, "payload", live).exists()  # task 1 refers to it
    finally:
        again.close()


def test_a_marker_whose_file_is_gone_reads_as_none_and_a_malformed_one_as_itself(db_url, blobs, caplog):
    payload = content(MIB, 17)
    store = open_store(db_url, blobs)
    try:
        store.received([row(1, payload)], [])
        assert store.flush(10)
        file_of(blobs, "payload", payload).unlink()
        assert store.unfinished()[0]["payload"] is None
        assert "missing" in caplog.text
        bad = b"\x00dlhub-blob\x00" + b"../" * 21 + b"x"  # marker-sized, not a digest
        assert len(bad) == BLOB_MARKER_LEN
        with store.engine.begin() as conn:
            conn.execute(tasks_table.update().where(tasks_table.c.task_id == tid(1)).values(payload=bad))
        assert store.unfinished()[0]["payload"] == bad
    finally:
        store.close()


def test_a_strided_view_is_stored_and_a_short_file_of_the_same_content_is_rewritten(db_url, blobs):
    whole = content(2 * MIB, 18)
    strided = memoryview(whole)[::2]  # not contiguous: copied once, not retried forever
    payload = content(MIB, 19)
    short = file_of(blobs, "payload", payload)
    short.parent.mkdir(parents=True)
    short.write_bytes(payload[:100])  # as a power loss may leave it
    store = open_store(db_url, blobs)
    try:
        store.received([row(1, strided), row(2, payload)], [])
        assert store.flush(10)
        assert {r["task_id"]: r["payload"] for r in store.unfinished()} == {
            tid(1): strided.tobytes(),
            tid(2): payload,
        }
        assert short.stat().st_size == MIB
    finally:
        store.close()
