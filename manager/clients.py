"""Clients: what the manager does with a client's frames once its session is admitted.

    client frame --> _on_client --(earlier work waits)--> ClientBacklog.defer
                         |                                      |
                         v                                      v  (_submit_rest, in turn)
                  _handle_client --Submit--> _check_sizes --> _submit --> ClientSubmitted --> Router
                         |                                   (past SUBMIT_SLICE: backlog.put_rest)
                         +--PutCode / Cancel--> events --> Router
                         +--Query / Fetch--> Router's memory, stored rows read off_loop --> reply

Apart from the broker loop because this is the client protocol (what each client message means)
rather than the moving of frames. :class:`ClientsMixin` is mixed into the broker's ``Manager``
like :class:`.sessions.SessionsMixin`: it works on the Manager's session state, backlog and
sockets, which the loop reads every turn, so they stay attributes of the Manager. Nothing here
unpickles a payload.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from dlhub.protocol import messages as m
from dlhub.protocol.errors import RAISE_MANAGER_LIMIT, infra_error

from . import events as ev
from .routing import code_matches, may_see

if TYPE_CHECKING:
    import zmq

    from .client_backlog import ClientBacklog
    from .config import ManagerConfig
    from .routing import Router
    from .services import ServableService
    from .sessions import ClientSession
    from .store import TaskStore

log = logging.getLogger("dlhub.manager")

# A frame is not a unit of work: one Submit may carry a client's 1,024 tasks (tens of ms on a
# busy manager). The Router takes a Submit this many tasks at a time; the rest waits in the
# client backlog (.client_backlog) with that client's later frames behind it (nothing of a client
# overtakes its own frames), and clients take turns there while other clients' frames are read.
# (Re-exported by .broker; a test that changes it patches this module's name.)
SUBMIT_SLICE = 256


class ClientsMixin:
    """The client half of the broker's ``Manager`` (see the module's docstring). The Manager
    provides the attributes below, ``_send(sock, identity, msg)``, ``route(*events)``,
    ``off_loop(work, then)`` and ``_status()``; :class:`.sessions.SessionsMixin` provides
    ``_client_hello(identity, hello)``."""

    clients: dict[bytes, ClientSession]
    _backlog: ClientBacklog  # the rest of Submits past SUBMIT_SLICE, and their clients' later frames
    config: ManagerConfig
    router: Router
    store: TaskStore
    servables: ServableService
    client_sock: zmq.Socket

    def _on_client(self, identity: bytes, msg: m.Message) -> None:
        if isinstance(msg, m.Hello):
            self._client_hello(identity, msg)
            return
        client = self.clients.get(identity)
        if client is None:
            self._send(self.client_sock, identity, m.Refused("not-registered", "say Hello first"))
            return
        if self._backlog.waiting(identity):  # its earlier work waits: this frame goes behind it
            self._backlog.defer(identity, client, msg)
            return
        self._handle_client(identity, client, msg)

    def _handle_client(self, identity: bytes, client: ClientSession, msg: m.Message) -> None:
        if isinstance(msg, m.Submit):
            self._check_sizes(identity, msg)
            self._submit(identity, client, msg)
        elif isinstance(msg, m.PutCode):
            self._put_code(client, msg)
        elif isinstance(msg, m.Cancel):
            self.route(ev.ClientCancelled(identity, msg.task_ids, client.viewer))
        elif isinstance(msg, m.Fetch):
            self._fetch(identity, msg.task_ids, client.viewer)
        elif isinstance(msg, m.Query):
            self._query(identity, msg, client.viewer)
        elif isinstance(msg, m.StatusRequest):  # per-servable figures only of what the caller may see
            status = self.servables.visible_status(self._status(), client.user)
            self._send(self.client_sock, identity, m.Status(msg.request_id, status))
        elif isinstance(msg, m.Heartbeat):
            self._send(self.client_sock, identity, m.Heartbeat({}))
        else:
            self._send(
                self.client_sock,
                identity,
                m.Refused("unexpected", f"{type(msg).__name__} is not a client message"),
            )

    def _submit(self, identity: bytes, client: ClientSession, msg: m.Submit) -> None:
        """Route the first ``SUBMIT_SLICE`` tasks; the rest goes first in this client's backlog."""
        if len(msg.tasks) > SUBMIT_SLICE:
            self._backlog.put_rest(identity, client, m.Submit(msg.endpoint, msg.tasks[SUBMIT_SLICE:]))
            msg = m.Submit(msg.endpoint, msg.tasks[:SUBMIT_SLICE])
        self.route(ev.ClientSubmitted(identity, client.user, client.session, msg, time.time()))

    def _submit_rest(self, deadline: float) -> bool:
        """Handle what waits in the client backlog, a piece per client in turn, until
        ``deadline``; True when none is left. A piece whose session ended (disconnected, revoked)
        is dropped: nothing of it was acknowledged, so the client sends it again after its next
        Hello."""
        pieces = self._backlog.take()
        while self._backlog.size:
            if time.monotonic() > deadline:
                return False
            identity, client, msg, rest = next(pieces)
            if self.clients.get(identity) is not client:
                continue
            try:
                if rest:
                    self._submit(identity, client, msg)
                else:
                    self._handle_client(identity, client, msg)
            except Exception:  # a bug must not take the broker down
                log.exception("error handling %s", type(msg).__name__)
        return True

    def _check_sizes(self, identity: bytes, msg: m.Submit) -> None:
        limit = self.config.payload_limit_bytes
        too_big = [t for t in msg.tasks if len(t[m.T_PAYLOAD]) > limit]
        if not too_big:
            return
        results = [
            m.result_record(
                t[m.T_ID],
                "failed",
                error=infra_error(
                    "payload-too-large",
                    f"payload of {len(t[m.T_PAYLOAD]):,} bytes exceeds the limit of {limit:,} bytes; "
                    f"{RAISE_MANAGER_LIMIT}",
                ),
            )
            for t in too_big
        ]
        msg.tasks[:] = [t for t in msg.tasks if len(t[m.T_PAYLOAD]) <= limit]
        self._send(self.client_sock, identity, m.Results(results))

    def _put_code(self, client: ClientSession, msg: m.PutCode) -> None:
        """Store a function's code only under its own digest (sha256 of the blob)."""
        if not code_matches(msg.digest, msg.blob):
            log.warning(
                "refused PutCode from %s: digest %s is not the sha256 of its %d-byte blob",
                client.user,
                str(msg.digest)[:80],
                len(msg.blob),
            )
            return
        self.route(ev.CodePut(msg.digest, msg.blob))

    @staticmethod
    def _checked_code(blobs: dict[str, bytes]) -> dict[str, bytes]:
        """Function code goes to endpoints only under its own digest (a blob stored under another
        one, e.g. by a manager from before digests were checked, is withheld and logged)."""
        out = {}
        for digest, blob in blobs.items():
            if m.package_key(digest) is None and not code_matches(digest, blob):
                log.warning("withheld code %s from an endpoint: the stored blob does not match it", digest)
                continue
            out[digest] = blob
        return out

    def _query(self, identity: bytes, msg: m.Query, user: str | None) -> None:
        """Task states: from memory, and (read off the loop) from the store."""

        def reply(stored: dict[bytes, dict]) -> None:
            records = self.router.task_records(msg.task_ids, user, stored)
            self._send(self.client_sock, identity, m.TaskInfo(msg.request_id, records))

        wanted, finished = self.router.stored_ids(msg.task_ids)
        if wanted:
            self.off_loop(lambda: self.store.read(wanted, finished), reply)
        else:
            reply({})

    def _fetch(self, identity: bytes, task_ids: list[bytes], user: str | None = None) -> None:
        """Resend stored results; tasks still running will be routed to this client. ``user``:
        the caller (None: an admin); another user's task is answered as an unknown id, and a
        running one keeps going to its submitter (an admin's fetch gets a copy). Stored rows
        are read off the loop."""
        results, missing = [], []
        for task_id in task_ids:
            entry = self.router.tasks.get(task_id)
            if entry is not None and may_see(user, entry.owner):
                me = self.clients.get(identity)
                if me is not None and me.user != entry.owner and entry.client in self.clients:
                    entry.watchers.append(identity)  # an admin looks; the submitter still gets it
                else:
                    entry.client = identity
            elif entry is None:
                missing.append(task_id)
            else:
                results.append(_unknown_task(task_id))
        if results:
            self._send(self.client_sock, identity, m.Results(results))
        if missing:
            finished = [t for t in missing if t in self.router.finished]
            self.off_loop(
                lambda: self.store.read(missing, finished),
                lambda rows: self._fetched(identity, missing, user, rows),
            )

    def _fetched(self, identity: bytes, missing: list[bytes], user: str | None, rows: dict) -> None:
        from .store import unpack_error

        results = []
        stored = {t: row for t, row in rows.items() if may_see(user, row["owner"])}
        for task_id in missing:
            if task_id not in stored:
                results.append(_unknown_task(task_id))
        for task_id, row in stored.items():
            if row["state"] in m.TERMINAL_STATES:
                output = [row["stdout"], row["stderr"]] if row["stdout"] or row["stderr"] else None
                results.append(
                    m.result_record(
                        task_id,
                        row["state"],
                        row["result"],
                        unpack_error(row["error"]),
                        [row["t_started"], row["t_finished"]],
                        output,
                    )
                )
        if results:
            self._send(self.client_sock, identity, m.Results(results))


def _unknown_task(task_id: bytes) -> list:
    """Fetch's answer for an id that does not exist, or that belongs to another user."""
    return m.result_record(
        task_id, "lost", error=infra_error("lost", f"task {task_id.hex()} is unknown to this manager")
    )
