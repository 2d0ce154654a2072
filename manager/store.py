"""The task store: every task's state, timestamps, payload and result, in a SQL database.

    broker loop --enqueue(op)--> [queue] --> writer thread: merge ops, one transaction,
                                                commit, then on_commit(acks) --> broker loop

Writes are group-committed off the hot path: the writer drains whatever is queued, folds updates
into inserts of the same batch (a task that is received and finished within one batch is written
once), commits, and only then reports the committed task ids so the broker can acknowledge them.
Reads (queries by task id, recovery at start) use their own connection. The writer's queue
carries small frozen commands (``_Insert``, ``_Update``, ``_PutCode``, ``_PutCached``, ``_Flush``);
``health()`` says, from any thread, whether a group commit is stuck (failing and retrying, or
blocked on another process's lock for over ``STALL_S``), since when and how much waits behind it.
SQLite in WAL mode is the default; the SQL is plain SQLAlchemy Core so PostgreSQL can follow.

Large values live in files, not rows (issue 15): a ``payload`` or ``result`` of at least
``BLOB_MIN_BYTES`` is written by the writer thread, before its transaction commits, to
``<blob_dir>/<payload|result>/<sha256[:2]>/<sha256[2:]>`` (content-addressed: an existing file is
reused; written under a temporary name, then renamed), and the column holds a 76-byte marker
(``schema.blob_marker``) that every SQLAlchemy read turns back into the bytes
(``schema.SpilledBinary``). SQL stays small and SQLite spends no CPU copying megabytes.

    freed when   a payload file: once the update that ends its task (payload set to NULL) has
                 committed and no other unfinished task refers to the same content (a refcount per
                 digest, kept by the writer, rebuilt from the unfinished rows at start). A result
                 file: never, like its row (there is no task purge).
    left over    a kill between a file's write and its commit, or between a commit and the unlink,
                 leaves an unreferenced file: payload files no unfinished row refers to and older
                 than ``ORPHAN_AGE_S`` are removed at the next start; result files stay.
    durable      as the database is: files are not fsynced, as SQLite in WAL mode with
                 synchronous=NORMAL does not fsync each commit. A killed process loses nothing;
                 a power loss may lose the last commits and files the OS had not written out yet
                 (such a value reads as missing: None, logged; a short file is rewritten when the
                 same content comes again).

``blob_dir`` defaults to ``task-blobs`` beside a SQLite file (the broker passes
``<home>/task-blobs``, also for PostgreSQL); without one (an in-memory database) nothing is
spilled. Managers sharing one database must share it, as they share the repository's blobs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import sqlalchemy as sa

from .schema import (  # noqa: F401 - re-exported: callers import these from the store
    BLOB_DIRS,
    BLOB_MARKER_LEN,
    MIGRATIONS,
    SCHEMA_VERSION,
    TERMINAL,
    blob_digest,
    blob_marker,
    blob_path,
    code_table,
    endpoint_owners_table,
    group_members_table,
    groups_table,
    make_engine,
    meta_table,
    metadata,
    migrate,
    result_cache_table,
    tasks_table,
    users_table,
)

log = logging.getLogger(__name__)

BLOB_MIN_BYTES = 64 * 1024  # a payload or result this large goes to a file, the row holds a marker
ORPHAN_AGE_S = 3600.0  # an unreferenced payload file older than this is removed at start


def endpoint_owner(engine: sa.Engine, name: str) -> str | None:
    """The user who owns endpoint name ``name``, or None when nobody registered it yet."""
    t = endpoint_owners_table
    with engine.connect() as conn:
        return conn.execute(sa.select(t.c.owner).where(t.c.name == name)).scalar()


def claim_endpoint(engine: sa.Engine, name: str, user: str) -> str:
    """Make ``user`` the owner of endpoint name ``name`` unless someone owns it; returns the owner."""
    owner = endpoint_owner(engine, name)
    if owner is not None:
        return owner
    try:
        with engine.begin() as conn:
            conn.execute(endpoint_owners_table.insert().values(name=name, owner=user, created=time.time()))
    except sa.exc.IntegrityError:  # claimed at the same moment through another manager
        return endpoint_owner(engine, name) or user
    return user


# ---- what the loop queues for the writer thread ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Insert:
    rows: list[dict[str, Any]]
    acks: list[tuple[str, bytes, bytes]]


@dataclass(frozen=True, slots=True)
class _Update:
    changes: list[tuple[bytes, dict[str, Any]]]
    acks: list[tuple[str, bytes, bytes]]


@dataclass(frozen=True, slots=True)
class _PutCode:
    digest: str
    blob: bytes


@dataclass(frozen=True, slots=True)
class _PutCached:
    key: str
    payload: bytes
    created: float


@dataclass(frozen=True, slots=True)
class _Flush:
    done: threading.Event


@dataclass(frozen=True, slots=True)
class _AfterCommit:
    """Call ``fn()`` on the writer thread once everything queued before it is committed."""

    fn: Callable[[], None]

    def set(self) -> None:  # run where a _Flush's event is set
        try:
            self.fn()
        except Exception:  # a caller's bug must not stop the writer
            log.exception("error in an after-commit callback")


_Command = _Insert | _Update | _PutCode | _PutCached | _Flush | _AfterCommit

STALL_S = 1.0  # a group commit running longer than this counts as stalled while it runs


@dataclass
class _Batch:
    inserts: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    updates: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    code: dict[str, bytes] = field(default_factory=dict)
    cached: dict[str, tuple[bytes, float]] = field(default_factory=dict)  # result cache rows
    acks: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # (kind, ident, task_id)
    freed: list[str] = field(default_factory=list)  # payload digests to release once committed


# The group commit's window: writes wait up to this long after the last commit. Tasks and results
# go on before they are committed, so it delays only the acknowledgements (how long a client or an
# endpoint keeps its copy), never a call. 20 ms, not 5: a serial caller's calls (~1 ms each) share
# one commit, one writer wake-up and one client ack per ~20 instead of per ~3, which took 7 % off
# its p50 and 30 us of manager CPU off each call (benchmarks/README.md, issue 11).
COMMIT_INTERVAL_S = 0.02


class TaskStore:
    """Asynchronous, group-committed writes plus synchronous reads."""

    def __init__(
        self,
        engine: sa.Engine,
        on_commit: Callable[[list], None],
        commit_interval_s: float = COMMIT_INTERVAL_S,
        blob_dir: Path | str | None = None,
    ):
        self.engine = engine
        self.blob_dir = Path(blob_dir) if blob_dir is not None else _default_blob_dir(engine)
        if self.blob_dir is not None:
            BLOB_DIRS.append(self.blob_dir)  # readers resolve markers there (until close)
        # the writer's: live tasks' payload files by task id, and how many live tasks share each
        self._payload_of: dict[bytes, str] = {}
        self._payload_refs: dict[str, int] = {}
        self.commit_interval_s = commit_interval_s
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._local = threading.local()  # each reading thread (the loop, the I/O pool) its own
        self._readers: list[sa.Connection] = []
        self._readers_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dlhub-store-writer", daemon=True)
        self._raw = None  # the writer thread's own DBAPI connection
        self._sql = _Dialect(engine)
        self.commits = 0
        self.rows_written = 0
        self.commit_failures = 0  # failed attempts, each retried until the commit landed
        # for health(), written by the writer thread only, each in one assignment:
        # (monotonic start, commands in the batch, failed attempts, last error) while writing
        self._writing: tuple[float, int, int, str | None] | None = None
        self._last_commit = time.monotonic()  # the last commit that landed (or the start)

    def start(self) -> None:
        if self.blob_dir is not None:
            self._load_payload_refs()
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        if self._raw is not None:
            self._raw.close()
        if self.blob_dir is not None and self.blob_dir in BLOB_DIRS:
            BLOB_DIRS.remove(self.blob_dir)
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        self.engine.dispose()

    @property
    def _reader(self) -> sa.Connection:
        """This thread's read connection (a connection is not to be shared between threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.engine.connect()
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    # ---- writes (called from the broker loop; never block) -------------------------------

    def received(self, rows: list[dict[str, Any]], acks: Iterable[tuple[str, bytes, bytes]]):
        self._queue.put(_Insert(rows, list(acks)))

    def update(self, changes: list[tuple[bytes, dict[str, Any]]], acks=()) -> None:
        """Apply column changes to tasks; a terminal state is never overwritten."""
        self._queue.put(_Update(changes, list(acks)))

    def put_code(self, digest: str, blob: bytes) -> None:
        self._queue.put(_PutCode(digest, blob))

    def put_cached(self, key: str, payload: bytes, created: float) -> None:
        """Persist a result-cache entry (when the manager keeps its cache across restarts)."""
        self._queue.put(_PutCached(key, payload, created))

    def load_cached(self, max_bytes: int, not_before: float) -> list[tuple[str, bytes, float]]:
        """Result-cache entries, newest first, within ``max_bytes`` and newer than ``not_before``;
        the rest are deleted (the table never outgrows the cache)."""
        t = result_cache_table
        out, total = [], 0
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(t.c.key, t.c.payload, t.c.created).order_by(t.c.created.desc()))
            drop = []
            for row in rows:
                if row.created < not_before or total + len(row.payload) > max_bytes:
                    drop.append(row.key)
                    continue
                total += len(row.payload)
                out.append((row.key, row.payload, row.created))
            for i in range(0, len(drop), 500):
                conn.execute(t.delete().where(t.c.key.in_(drop[i : i + 500])))
        return out

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything enqueued so far is committed (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(_Flush(done))
        return done.wait(timeout)

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once every write enqueued so far is committed (on the writer thread,
        after that group commit; keep it short and non-blocking). Never blocks the caller. The
        Globus Compute API publishes each result to AMQP this way: only once it is durable."""
        self._queue.put(_AfterCommit(fn))

    def health(self) -> dict[str, Any]:
        """The writer's state, cheap and from any thread: ``state`` "ok" or "stalled" (a group
        commit has failed and is being retried, or has run over ``STALL_S``: a commit blocked on
        another process's lock waits rather than fails), ``stalled_for_s`` (since that commit
        began), ``pending_writes`` (write commands not yet committed: the stuck batch's and those
        queued behind it), ``last_commit_age_s`` and ``last_error`` (of the stuck commit)."""
        now = time.monotonic()
        writing, last_commit = self._writing, self._last_commit
        queued = self._queue.qsize()
        stalled_for, in_batch, failures, error = None, 0, 0, None
        if writing is not None:
            started, in_batch, failures, error = writing
            if failures or now - started > STALL_S:
                stalled_for = round(now - started, 3)
        return {
            "state": "ok" if stalled_for is None else "stalled",
            "stalled_for_s": stalled_for,
            "pending_writes": in_batch + queued,
            "failed_attempts": failures,
            "last_commit_age_s": round(max(0.0, now - last_commit), 3),
            "last_error": error,
        }

    # ---- reads -----------------------------------------------------------------------------

    def read(self, task_ids: list[bytes], finished: Iterable[bytes] = ()) -> dict[bytes, dict[str, Any]]:
        """:meth:`lookup`; for ids the Router knows ``finished`` whose row does not say so yet
        (a result moments ago), wait for the queued writes to land and read those again. It may
        wait for the database: never on the loop."""
        rows = self.lookup(task_ids)
        behind = [t for t in finished if t not in rows or rows[t]["state"] not in TERMINAL]
        if behind:
            self.flush()
            rows.update(self.lookup(behind))
        return rows

    def lookup(self, task_ids: list[bytes]) -> dict[bytes, dict[str, Any]]:
        if not task_ids:
            return {}
        t = tasks_table
        cols = [c for c in t.c if c.name != "payload"]
        out = {}
        for chunk_start in range(0, len(task_ids), 500):
            chunk = task_ids[chunk_start : chunk_start + 500]
            rows = self._reader.execute(sa.select(*cols).where(t.c.task_id.in_(chunk)))
            out.update({r.task_id: dict(r._mapping) for r in rows})
        self._reader.rollback()
        return out

    def endpoint_names(self) -> list[str]:
        """Endpoints that ever had a task here: known again at once after a restart, so calls
        and publishes for them queue (instead of "unknown endpoint") until they re-register."""
        t = tasks_table
        names = [r[0] for r in self._reader.execute(sa.select(t.c.endpoint).distinct())]
        self._reader.rollback()
        return sorted(names)

    def unfinished(self) -> list[dict[str, Any]]:
        """Tasks that were committed but never finished: re-queued when the manager restarts."""
        t = tasks_table
        rows = self._reader.execute(sa.select(t).where(t.c.state.not_in(TERMINAL)).order_by(t.c.t_received))
        out = [dict(r._mapping) for r in rows]
        self._reader.rollback()
        return out

    def recently_finished(self, limit: int) -> list[tuple[bytes, str]]:
        """The ``limit`` most recently finished tasks, (id, state), oldest first: a restarted
        manager remembers them so a client's resend of one is answered from the store (its
        Fetch reads the stored result) instead of running the task again."""
        t = tasks_table
        rows = self._reader.execute(
            sa.select(t.c.task_id, t.c.state)
            .where(t.c.state.in_(TERMINAL))
            .order_by(t.c.t_finished.desc())
            .limit(limit)
        ).all()
        self._reader.rollback()
        return [(r.task_id, r.state) for r in reversed(rows)]

    def get_code(self, digest: str) -> bytes | None:
        row = self._reader.execute(sa.select(code_table.c.blob).where(code_table.c.digest == digest)).first()
        self._reader.rollback()
        return row[0] if row else None

    # ---- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        stop, last_commit = False, 0.0
        while not stop:
            items = [self._queue.get()]
            # Group commit: gather for up to commit_interval_s since the last commit. Tasks and
            # results are forwarded before they are committed, so this window delays only the
            # acknowledgements (how long senders keep a copy), never a result.
            # Sleep through the window rather than waking for each item: every wake-up would
            # take the GIL from the broker loop.
            if items[-1] is not None and type(items[-1]) is not _Flush:
                remaining = last_commit + self.commit_interval_s - time.monotonic()
                if remaining > 0:
                    time.sleep(remaining)
            while len(items) < 20000:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            last_commit = time.monotonic()
            batch, flushes = _Batch(), []
            for item in items:
                if item is None:
                    stop = True
                else:
                    self._fold(batch, item, flushes)
            writes = len(items) - len(flushes) - stop
            self._writing = (last_commit, writes, 0, None) if writes else None
            self._write_until_it_lands(batch)
            self._writing = None
            if batch.freed:
                self._release(batch.freed)
            if batch.acks:
                self._on_commit(batch.acks)
            for ev in flushes:
                ev.set()

    def _write_until_it_lands(self, batch: _Batch) -> None:
        """Commit ``batch``, retrying with backoff (0.05 s doubling to 2 s) on any failure: the
        database locked by another process, a dropped connection. A group commit is never
        dropped: its tasks and results would be missing from the store while their senders,
        once acknowledged, no longer keep a copy. Acks wait until it lands; later items queue."""
        delay, failures, first_failure = 0.05, 0, 0.0
        while True:
            try:
                self._write(batch)
                self._last_commit = time.monotonic()
            except Exception as exc:
                failures += 1
                self.commit_failures += 1
                if failures == 1:
                    first_failure = time.monotonic()
                writing = self._writing
                if writing is not None:
                    self._writing = (writing[0], writing[1], failures, f"{type(exc).__name__}: {exc}"[:300])
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "task store commit failed (%s: %s); retrying (attempt %d, %d acks waiting)",
                        type(exc).__name__,
                        exc,
                        failures,
                        len(batch.acks),
                    )
                self._reconnect()
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if failures:
                log.warning(
                    "task store commit landed after %d failed attempt(s), %.1f s",
                    failures,
                    time.monotonic() - first_failure,
                )
            return

    def _reconnect(self) -> None:
        """Drop the writer's connection after a failure (it may be dead); the next try opens one."""
        raw, self._raw = self._raw, None
        if raw is None:
            return
        try:
            raw.invalidate()
        except Exception:  # pragma: no cover - a dead connection may fail to close
            log.debug("closing the failed writer connection", exc_info=True)

    @staticmethod
    def _fold(batch: _Batch, item: _Command, flushes: list) -> None:
        cls = type(item)
        if cls is _Insert:
            for row in item.rows:
                batch.inserts[row["task_id"]] = row
            batch.acks.extend(item.acks)
        elif cls is _Update:
            for task_id, changes in item.changes:
                row = batch.inserts.get(task_id)
                target = row if row is not None else batch.updates.setdefault(task_id, {})
                if target.get("state") in TERMINAL and changes.get("state") not in TERMINAL:
                    changes = {k: v for k, v in changes.items() if k != "state"}
                target.update(changes)
            batch.acks.extend(item.acks)
        elif cls is _PutCode:
            batch.code[item.digest] = item.blob
        elif cls is _PutCached:
            batch.cached[item.key] = (item.payload, item.created)
        elif cls is _Flush:
            flushes.append(item.done)
        elif cls is _AfterCommit:
            flushes.append(item)

    def _write(self, batch: _Batch) -> None:
        """One transaction on the raw DBAPI connection (SQLAlchemy's per-call cost, ~100 us,
        would sit on the broker's GIL for every group commit)."""
        if not (batch.inserts or batch.updates or batch.code or batch.cached):
            return
        if self.blob_dir is not None:
            self._spill(batch)  # again on a retry: what is spilled already is a small marker
        if self._raw is None:
            self._raw = self.engine.raw_connection()
        cur = self._raw.cursor()
        try:
            if batch.code:
                rows = [{"digest": d, "blob": b, "created": time.time()} for d, b in batch.code.items()]
                cur.executemany(*self._sql.insert_ignore("code", ["digest", "blob", "created"], rows))
            if batch.cached:
                rows = [{"key": k, "payload": p, "created": c} for k, (p, c) in batch.cached.items()]
                cur.executemany(*self._sql.insert_ignore("result_cache", ["key", "payload", "created"], rows))
            if batch.inserts:
                rows = [_full_row(r) for r in batch.inserts.values()]
                cur.executemany(*self._sql.insert_ignore("tasks", _TASK_COLUMNS, rows))
            if batch.updates:
                # group by the set of changed columns so each group is one executemany
                groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
                for task_id, changes in batch.updates.items():
                    groups.setdefault(tuple(sorted(changes)), []).append({"tid": task_id, **changes})
                for cols, params in groups.items():
                    final = bool(set(cols) & {"result", "error"})
                    cur.executemany(*self._sql.update_task(cols, params, final))
            self._raw.commit()
        except Exception:
            try:
                self._raw.rollback()
            except Exception:  # a dropped connection cannot roll back: _reconnect replaces it
                log.debug("rollback after a failed commit", exc_info=True)
            raise
        finally:
            cur.close()
        self.commits += 1
        self.rows_written += len(batch.inserts) + len(batch.updates)

    # ---- large values in files (the writer thread; the refcounts are its alone) ------------

    def _spill(self, batch: _Batch) -> None:
        """Write this batch's large payloads and results to files and put markers in their place;
        note the payload files its updates release (in ``batch.freed``, unlinked after commit)."""
        for task_id, row in batch.inserts.items():
            spilled = self._spill_values(task_id, row)
            if spilled is not None:
                batch.inserts[task_id] = {**row, **spilled}  # the caller's dict stays as it was
        for task_id, changes in batch.updates.items():
            if "payload" in changes:
                old = self._payload_of.pop(task_id, None)
                if old is not None:
                    batch.freed.append(old)
            spilled = self._spill_values(task_id, changes)
            if spilled is not None:
                changes.update(spilled)

    def _spill_values(self, task_id: bytes, cols: dict[str, Any]) -> dict[str, bytes] | None:
        out = None
        for kind in ("payload", "result"):
            value = cols.get(kind)
            if value is None or _nbytes(value) < BLOB_MIN_BYTES:
                continue
            digest = self._put_file(kind, value)
            if out is None:
                out = {}
            out[kind] = blob_marker(digest)
            if kind == "payload" and self._payload_of.get(task_id) != digest:
                old = self._payload_of.get(task_id)
                if old is not None:  # a payload replaced before the commit (not done today)
                    self._release([old])
                self._payload_of[task_id] = digest
                self._payload_refs[digest] = self._payload_refs.get(digest, 0) + 1
        return out

    def _put_file(self, kind: str, value: bytes | bytearray | memoryview) -> str:
        """Store ``value`` under its sha256 (reusing an existing file); returns the hex digest."""
        if isinstance(value, memoryview) and not value.c_contiguous:  # not from a frame: copy once
            value = value.tobytes()
        digest = hashlib.sha256(value).hexdigest()
        path = blob_path(self.blob_dir, kind, digest)
        try:
            if path.stat().st_size == _nbytes(value):  # not one cut short by a power loss
                return digest
        except FileNotFoundError:
            pass
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        for attempt in (1, 2):  # a second time when another manager removed the emptied folder
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        with open(fd, "wb") as f:
            f.write(value)  # the buffer itself: no join, no copy
        os.replace(tmp, path)
        return digest

    def _release(self, digests: list[str]) -> None:
        """Drop one reference to each payload file; unlink a file nobody refers to any more."""
        for digest in digests:
            left = self._payload_refs.get(digest, 0) - 1
            if left > 0:
                self._payload_refs[digest] = left
                continue
            self._payload_refs.pop(digest, None)
            path = blob_path(self.blob_dir, "payload", digest)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # left for the sweep at the next start
                log.warning("could not remove payload file %s: %s", digest, exc)
                continue
            _remove_if_empty(path.parent)

    def _load_payload_refs(self) -> None:
        """Rebuild the payload refcounts from the unfinished rows' markers (before the writer
        starts), then remove old payload files none of them refers to: left by a kill."""
        t = tasks_table
        marker = sa.type_coerce(t.c.payload, sa.LargeBinary).label("marker")  # the raw column
        query = sa.select(t.c.task_id, marker).where(
            t.c.state.not_in(TERMINAL), sa.func.length(t.c.payload) == BLOB_MARKER_LEN
        )
        with self.engine.connect() as conn:
            for task_id, value in conn.execute(query):
                digest = blob_digest(value)
                if digest is not None:
                    self._payload_of[task_id] = digest
                    self._payload_refs[digest] = self._payload_refs.get(digest, 0) + 1
        root = self.blob_dir / "payload"
        if not root.is_dir():
            return
        cutoff = time.time() - ORPHAN_AGE_S
        for path in root.glob("*/*"):
            name = path.parent.name + path.name
            if name in self._payload_refs:
                continue
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    log.info("removed an unreferenced payload file %s", path.name)
            except OSError:  # gone already, or not ours to remove
                continue
        for folder in root.iterdir():  # and the folders that emptied (files are removed one by one)
            _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    """Remove a blob folder (``<kind>/<sha256[:2]>``) that no file is left in; keep it otherwise."""
    try:
        folder.rmdir()
    except OSError:  # not empty (ENOTEMPTY), gone already, or not a folder
        pass


def _nbytes(value: bytes | bytearray | memoryview) -> int:
    return value.nbytes if isinstance(value, memoryview) else len(value)


def _default_blob_dir(engine: sa.Engine) -> Path | None:
    """``task-blobs`` beside a SQLite file; None (nothing spilled) for anything else."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    return Path(database).resolve().parent / "task-blobs"


_TASK_COLUMNS = [c.name for c in tasks_table.c]


class _Dialect:
    """Plain SQL for the writer's hot path, in the driver's own parameter style."""

    def __init__(self, engine: sa.Engine):
        self.name = engine.dialect.name
        self.positional = engine.dialect.paramstyle in ("qmark", "format", "numeric")
        self.mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._cache: dict[tuple, str] = {}

    def _param(self, name: str) -> str:
        return self.mark if self.positional else f"%({name})s"

    def _bind(self, names: list[str], rows: list[dict[str, Any]]) -> list:
        if self.positional:
            return [tuple(r[n] for n in names) for r in rows]
        return rows

    def insert_ignore(self, table: str, cols: list[str], rows: list[dict[str, Any]]):
        key = ("insert", table, tuple(cols))
        sql = self._cache.get(key)
        if sql is None:
            values = ", ".join(self._param(c) for c in cols)
            verb = "INSERT OR IGNORE INTO" if self.name == "sqlite" else "INSERT INTO"
            tail = "" if self.name == "sqlite" else " ON CONFLICT DO NOTHING"
            sql = self._cache[key] = f"{verb} {table} ({', '.join(cols)}) VALUES ({values}){tail}"
        return sql, self._bind(cols, rows)

    def update_task(self, cols: tuple[str, ...], rows: list[dict[str, Any]], final: bool):
        """Set ``cols``; a non-final update never overwrites a terminal state."""
        key = ("update", cols, final)
        sql = self._cache.get(key)
        if sql is None:
            sets = ", ".join(f"{c} = {self._param(c)}" for c in cols)
            guard = (
                ""
                if final or "state" not in cols
                else f" AND state NOT IN ({', '.join(repr(state) for state in TERMINAL)})"
            )
            sql = self._cache[key] = f"UPDATE tasks SET {sets} WHERE task_id = {self._param('tid')}{guard}"
        return sql, self._bind([*cols, "tid"], rows)


_DEFAULTS = {c.name: None for c in tasks_table.c}


def _full_row(row: dict[str, Any]) -> dict[str, Any]:
    """executemany needs every row to name the same columns."""
    full = dict(_DEFAULTS)
    full.update(row)
    return full


def pack_error(record: list | None) -> bytes | None:
    return None if record is None else msgpack.packb(record, use_bin_type=True)


def unpack_error(blob: bytes | None) -> list | None:
    return None if blob is None else msgpack.unpackb(blob, raw=False)
