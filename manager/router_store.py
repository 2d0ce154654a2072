"""What the Router reads back from its store: code blobs, tasks at a restart, Query's rows.

    PutCode --> put_code: stored (PersistCode) and kept by the code book
    GetCode --> code_in_memory (only code its tasks named) --> load_code (off the loop)
              --> CodeLoaded --> remember_code
    the manager starts --> recover(the store's unfinished rows): re-queued, recent finishes known
    Query --> stored_ids (not in memory: read off the loop) --> task_records (memory, then rows)

Apart from routing.py because this is the Router's side of what outlives its memory: blobs and
rows the broker reads from the store on its I/O pool (code, Query's rows) or before its loop
starts (recover), and hands back as events or arguments; a task's own way (submit, results,
Flush) calls nothing here. The blobs are kept by ``.code_book.CodeBook``, which the Router
composes; these are the methods the broker and the tests call. :class:`StoreMixin` is mixed
into the ``Router`` like ``.endpoints.EndpointsMixin``, under the same sans-I/O rules: no clock,
no socket, and the store comes in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dlhub.protocol import messages as m

from . import events as ev
from .endpoints import EndpointState
from .task_rows import may_see

if TYPE_CHECKING:
    from collections import OrderedDict

    from .code_book import CodeBook
    from .routing import TaskEntry

FINISHED_MEMORY = 200_000  # recently finished task ids kept to recognise late resends


class StoreMixin:
    """The Router's reads of its store (see the module docstring). Works on the Router's state;
    these are the attributes it uses:"""

    store: Any
    tasks: dict[bytes, TaskEntry]
    finished: OrderedDict[bytes, str]
    endpoints: dict[str, EndpointState]
    code_book: CodeBook
    _task_entry: type[TaskEntry]  # routing.TaskEntry (this module does not import routing.py)
    _write: Callable[[ev.Persist], None]
    _endpoint: Callable[[bytes], EndpointState | None]
    _origin: Callable[[str, str, str, dict[str | None, dict]], dict]
    _remember_finished: Callable[[bytes, str], None]

    # ---- code (kept by the code book) ---------------------------------------------------------

    def put_code(self, digest: str, blob: bytes) -> None:
        if digest not in self.code_book:
            self._write(ev.PersistCode(digest, blob))
        self.code_book.keep(digest, blob)

    def code_for(self, digests: list[str], identity: bytes | None = None) -> dict[str, bytes]:
        """The blobs of ``digests`` we have (reading the store and packages here: callers
        without an I/O pool; the broker uses :meth:`code_in_memory` and :meth:`load_code`)."""
        out, missing = self.code_in_memory(digests, identity)
        loaded = self.load_code(missing)
        self.remember_code(loaded)
        return {**out, **loaded}

    def code_in_memory(
        self, digests: list[str], identity: bytes | None = None
    ) -> tuple[dict[str, bytes], list[str]]:
        """The blobs of ``digests`` held in memory, and the digests still to load. Asked by an
        endpoint (``identity``): only the code of tasks sent to it, so an endpoint cannot read
        other users' functions or private servables by guessing or learning a digest; the rest
        it is told are missing."""
        if identity is None:
            return self.code_book.in_memory(digests)
        ep = self._endpoint(identity)
        if ep is None:  # not a registered endpoint: no task named any code to it
            return self.code_book.in_memory(digests, {}, identity[:16])
        return self.code_book.in_memory(digests, ep.code_sent, ep.name)

    def load_code(self, digests: list[str]) -> dict[str, bytes]:
        """Read code blobs and servable packages (on the broker's I/O pool: touches no Router
        state); :meth:`remember_code` keeps them after."""
        return self.code_book.load(digests)

    def remember_code(self, blobs: dict[str, bytes]) -> None:
        self.code_book.remember(blobs)

    def recover(self, rows: list[dict[str, Any]]) -> None:
        """Re-queue tasks that were committed but unfinished when the manager stopped, and
        remember the most recently finished ones: after a kill, clients resend every task they
        hold no acknowledgement for, including tasks that finished and were committed while
        their result and ack were still unsent. Those are recognised (acknowledged again; the
        client's Fetch is answered from the store), never run a second time.

        Re-queued tasks go to their endpoint when it says Hello again. The Welcome goes out
        first, on the same ordered link: the endpoint answers it by resending every result it
        still holds unacknowledged, and answers a re-sent task it has a result for with that
        result (a task it still runs or queues is dropped as held), so nothing it ran runs again.
        """
        finished = getattr(self.store, "recently_finished", None)
        if finished is not None:
            for task_id, state in finished(FINISHED_MEMORY):
                self._remember_finished(task_id, state)
        origins: dict[str, dict] = {}  # user -> its origins by servable owner
        for row in rows:
            ep = self.endpoints.setdefault(row["endpoint"], EndpointState(row["endpoint"]))
            user = row.get("owner") or ""
            origin = self._origin(user, row["function"], row["function"], origins.setdefault(user, {}))
            rec = m.task_record(
                row["task_id"],
                row["function"],
                row["payload"] or b"",
                row["timeout_s"],
                row["result_serializer"],
                json.loads(row["resources"]) if row.get("resources") else None,
                json.loads(row["options"]) if row.get("options") else None,
                origin,
            )
            self.tasks[row["task_id"]] = self._task_entry(
                rec, row["endpoint"], b"", "queued", owner=row.get("owner") or ""
            )
            ep.pending[row["task_id"]] = None

    # ---- tasks not in memory: Query's rows ---------------------------------------------------

    def stored_ids(self, task_ids: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        """What ``Query``/``Fetch`` must read from the store (ids not in memory), and which of
        those we know finished (their row may still be on its way: see ``TaskStore.read``).
        The broker reads off the loop."""
        wanted = [t for t in task_ids if t not in self.tasks]
        return wanted, [t for t in wanted if t in self.finished]

    def task_records(
        self, task_ids: list[bytes], user: str | None = None, stored: dict[bytes, dict] | None = None
    ) -> list[dict[str, Any]]:
        """Task states for ``Query``: memory first (newest), then ``stored`` (the rows of
        :meth:`stored_ids`, read by the caller; None: read here, for callers without an I/O
        pool). ``user``: the caller (None: an admin, who sees all); another user's task reads
        as unknown."""
        if stored is None:
            stored = self.store.read(*self.stored_ids(task_ids))
        out = []
        for task_id in task_ids:
            entry = self.tasks.get(task_id)
            if entry is not None and may_see(user, entry.owner):
                out.append({"task_id": task_id, "state": entry.state, "endpoint": entry.endpoint})
            elif entry is None and task_id in stored and may_see(user, stored[task_id]["owner"]):
                row = stored[task_id]
                row.pop("result", None)
                row.pop("error", None)
                out.append(row)
            else:
                out.append({"task_id": task_id, "state": "unknown"})
        return out
