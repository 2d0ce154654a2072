"""The client's link to the manager: one I/O thread owns the socket.

    submit() / put_code() / cancel() / query()  --deque + wake-up-->  [I/O thread]  --DEALER-->  manager
    futures resolved  <--on_results/on_states--  [I/O thread]  <--Results/States/Accepted/...--  manager

The wake-up is an eventfd on Linux, a socket pair elsewhere (``_wakeup.py``; ``$DLHUB_WAKEUP``).

The short path: ``submit()`` sends a task from the user's thread straight to the socket when no
task is in flight (unacknowledged), nothing is queued before it and the socket's lock is free
(``_sock_lock``: the I/O thread holds it for each turn, between polls); otherwise it queues, as
every other command does (a burst is batched by the I/O thread). So a serial call costs no
hand-off on its way out. ZeroMQ sockets are not thread-safe: the lock makes every use exclusive,
and the I/O thread polls the socket's ``FD`` (a hint, edge-triggered) rather than the socket,
reading ``EVENTS`` after every use before it sleeps; a user-thread send that finds a
frame waiting wakes it. The short path is opt-in (``$DLHUB_CLIENT_SEND=direct``): it saves the
client ~60 us of CPU per serial call, but on a quiet machine its p50 was ~20% higher than the
hand-off's (the default, ``thread``).

The I/O thread wakes when work is queued or a frame arrives, takes everything that is waiting
(small frozen ``Send*`` commands, dispatched by type) and sends it as few messages as possible
(one ``Submit`` per endpoint per wake-up, up to ``batch_size`` tasks): no timer on the latency
path. Tasks stay in ``unacked`` until the manager has committed them; after the manager restarts
(it answers ``not-registered``) the thread says Hello again, resends them, and asks for the
results of everything still pending.

``close(wait=False)`` only asks the thread to stop: it sends what is still queued (cancels of a
``shutdown``), closes its sockets and the wake-up itself; a later ``send`` is dropped, never
written to a closed descriptor. The thread holds no reference to the Executor (its callbacks
are weak), so an Executor dropped without ``shutdown()`` stops it from a finalizer.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zmq

from dlhub.protocol import AccessDenied, ManagerUnreachable, ProtocolError
from dlhub.protocol import messages as m
from dlhub.protocol.curve import HandshakeWatch, check_plain_allowed, secure_dealer
from dlhub.protocol.serialize import runtime_versions

from ._wakeup import make_wakeup

_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
SEND_MODES = ("direct", "thread")  # $DLHUB_CLIENT_SEND: user threads may send tasks, or only the I/O thread

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
HEARTBEAT_S = 2.0
CLOSE_LINGER_MS = 500  # at close: time for the last messages (cancels) to leave; 0 after a refusal


# ---- what user threads queue for the I/O thread (one small frozen object per command) ---------


@dataclass(frozen=True, slots=True)
class SendTask:
    """One task record for ``endpoint``; ``claim()`` (on the I/O thread) False drops it unsent."""

    endpoint: str
    claim: Callable[[], bool]
    rec: Any  # a task record (m.T_* positions)


# The hot path makes one SendTask per submitted task: built without the dataclass __init__
# (a frozen one sets each field through object.__setattr__): ~0.25 us instead of ~0.45 us.
_new_object = object.__new__
_set_endpoint, _set_claim, _set_rec = SendTask.endpoint.__set__, SendTask.claim.__set__, SendTask.rec.__set__


def _send_task(endpoint: str, claim: Callable[[], bool], rec: Any) -> SendTask:
    """``SendTask(endpoint, claim, rec)``, cheaper."""
    item = _new_object(SendTask)
    _set_endpoint(item, endpoint)
    _set_claim(item, claim)
    _set_rec(item, rec)
    return item


@dataclass(frozen=True, slots=True)
class SendCode:
    digest: str
    blob: bytes


@dataclass(frozen=True, slots=True)
class SendCancel:
    task_ids: list[bytes]


@dataclass(frozen=True, slots=True)
class SendFetch:
    task_ids: list[bytes]


@dataclass(frozen=True, slots=True)
class SendQuery:
    request_id: int
    task_ids: list[bytes]


@dataclass(frozen=True, slots=True)
class SendStatus:
    request_id: int


Command = SendTask | SendCode | SendCancel | SendFetch | SendQuery | SendStatus

# the tuple forms ``send`` took before, ``(kind, *fields)``: still accepted
_TUPLE_KINDS: dict[str, type] = {
    "task": SendTask,
    "code": SendCode,
    "cancel": SendCancel,
    "fetch": SendFetch,
    "query": SendQuery,
    "status": SendStatus,
}


class Connection:
    def __init__(
        self,
        address: str,
        token: str,
        on_results: Callable[[list[list]], None],
        on_cancel_refused: Callable[[list[bytes]], None] = lambda ids: None,
        pending_ids: Callable[[], list[bytes]] = list,
        batch_size: int = 1024,
        connect_timeout_s: float = 10.0,
        manager_timeout_s: float = 120.0,
        on_manager_lost: Callable[[str], None] = lambda why: None,
        on_access_denied: Callable[[AccessDenied], None] = lambda error: None,
        server_key: str | None = None,
        on_states: Callable[[list[list]], None] = lambda updates: None,
        wakeup: str | None = None,
    ):
        """``server_key``: the manager's CURVE public key, pinned (None: a manager on this host in
        ``--insecure-loopback`` mode, PLAIN with the token as password). ``wakeup``: ``"eventfd"``
        or ``"socketpair"`` (default: ``$DLHUB_WAKEUP``, else eventfd where the OS has one)."""
        self.address, self.token = address, token
        self.server_key = server_key
        if not server_key:
            check_plain_allowed(address)
        self.on_results, self.on_cancel_refused = on_results, on_cancel_refused
        self.pending_ids = pending_ids
        self.batch_size = batch_size
        self.manager_timeout_s = manager_timeout_s
        self.on_manager_lost = on_manager_lost
        self.on_access_denied = on_access_denied
        self.on_states = on_states
        self.session = secrets.token_hex(8)
        self.outgoing: deque[Command] = deque()
        self.unacked: dict[bytes, tuple[str, list]] = {}
        self.welcome: dict[str, Any] = {}
        self.code_sent: dict[str, bytes] = {}  # resent after a manager restart
        self._requests: dict[int, Future] = {}
        self._request_ids = itertools.count(1)
        # "thread" by default: on a quiet machine a serial call's p50 was ~20% lower than with
        # the short path (benchmarks/README.md, issue 15 item 2); "direct" saves client CPU
        send_mode = os.environ.get("DLHUB_CLIENT_SEND") or "thread"
        if send_mode not in SEND_MODES:
            raise ValueError(f"DLHUB_CLIENT_SEND must be one of {', '.join(SEND_MODES)}, got {send_mode!r}")
        _check_address(address, connect_timeout_s)
        self._wakeup = make_wakeup(wakeup)
        self._allow_direct = send_mode == "direct"
        # held by whichever thread uses the socket: the I/O thread for each turn, a user thread for
        # a direct send (which only tries it: a busy I/O thread means queue instead)
        self._sock_lock = threading.Lock()
        self._direct = False  # set by the I/O thread, under the lock, once connected and ready
        self.direct_sends = 0  # tasks a user thread sent itself (the short path)
        self.sock: zmq.Socket | None = None
        self._ready = threading.Event()
        self._watch: HandshakeWatch | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dlhub-executor-io", daemon=True)
        self._thread.start()
        if not self._ready.wait(connect_timeout_s):
            self.close()
            hint = self._watch.timeout_hint() if self._watch is not None else ""
            raise ManagerUnreachable(
                f"no dlhub manager answered at {address} within {connect_timeout_s:g} s"
                + (hint or " (is it running? start one with `dlhub up`)")
            )
        if self._error is not None:
            self.close()
            raise self._error

    # ---- called from user threads --------------------------------------------------------

    @property
    def wakeup_kind(self) -> str:
        return self._wakeup.kind

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called (or the thread stopped on a refusal)."""
        return self._stop.is_set()

    def submit(self, endpoint: str, rec: list, claim: Callable[[], bool]) -> None:
        """Queue one task record. ``claim()`` runs on the I/O thread just before the record is
        sent: False (the future was cancelled meanwhile) drops it unsent."""
        if self._stop.is_set():  # as send(), without its check for the older tuple form
            return
        # the short path: straight to the socket when nothing waits before this task and nothing
        # is in flight (a burst goes through the queue, where the I/O thread batches it)
        if self._direct and not self.unacked and not self.outgoing and self._sock_lock.acquire(False):
            try:
                if self._direct and not self.outgoing and self._send_direct(endpoint, rec, claim):
                    return
            finally:
                self._sock_lock.release()
        self.outgoing.append(_send_task(endpoint, claim, rec))
        self._wakeup.wake()

    def _send_direct(self, endpoint: str, rec: Any, claim: Callable[[], bool]) -> bool:
        """Under ``_sock_lock``, on a user thread: send one task now; False: queue it instead."""
        sock = self.sock
        if claim():
            task_id = rec[m.T_ID]
            self.unacked[task_id] = (endpoint, rec)
            try:
                m.send_message(sock, m.Submit(endpoint, [rec]), _NOBLOCK)
            except zmq.ZMQError:  # no connection right now: the I/O thread sends it (claim again)
                self.unacked.pop(task_id, None)
                return False
            self.direct_sends += 1
        # the send may have taken the socket's signal for a frame that waits: pass it on
        if sock.get(_EVENTS) & _POLLIN:
            self._wakeup.wake()
        return True

    def put_code(self, digest: str, blob: bytes) -> None:
        """Queue a function's code (also resent after a manager restart)."""
        self.send(SendCode(digest, blob))

    def cancel(self, task_ids: list[bytes]) -> None:
        """Ask the manager to cancel these tasks; it answers with ``cancelled`` results or
        ``CancelRefused`` (``on_cancel_refused``)."""
        self.send(SendCancel(list(task_ids)))

    def fetch(self, task_ids: list[bytes]) -> None:
        """Ask for the results of tasks submitted earlier (they arrive as ``on_results``)."""
        self.send(SendFetch(list(task_ids)))

    def query(self, task_ids: list[bytes]) -> Future:
        """A future of the manager's task records (state, timestamps, output) for these ids."""
        return self.request("query", list(task_ids))

    def status(self) -> Future:
        """A future of the manager's status view."""
        return self.request("status")

    def forget_unacked(self) -> None:
        """Stop resending what the manager has not acknowledged (its futures have failed)."""
        self.unacked.clear()

    def send(self, item: Command | tuple) -> None:
        """Queue a command (``SendTask``, ``SendCode``, ...; or the older tuple form
        ``(kind, *fields)``) for the I/O thread. After ``close`` it is dropped (a late cancel of
        a shut-down Executor has nothing left to cancel)."""
        if self._stop.is_set():
            return
        if type(item) is tuple:
            item = _TUPLE_KINDS[item[0]](*item[1:])
        self.outgoing.append(item)
        self._wakeup.wake()

    def request(self, kind: str, *args: Any) -> Future:
        """A future of the manager's answer to ``kind`` (``"query"`` with task ids, ``"status"``)."""
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(
                ManagerUnreachable(f"the connection to the manager at {self.address} is closed (shutdown)")
            )
            return fut
        rid = next(self._request_ids)
        self._requests[rid] = fut
        self.send(_TUPLE_KINDS[kind](rid, *args))
        return fut

    def close(self, timeout: float = 5.0, wait: bool = True) -> None:
        """Stop the I/O thread after it sends what is queued; ``wait``: join it (``timeout``)."""
        self._stop.set()
        self._wakeup.wake()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the I/O thread to end; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- the I/O thread --------------------------------------------------------------------

    def _hello(self) -> bytes:
        versions = {**runtime_versions(), "protocol": m.PROTOCOL_VERSION}
        return m.pack(m.Hello("client", "", self.token, self.session, versions, {}))

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"c:{self.session}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        mechanism = secure_dealer(sock, self.address, self.token, self.server_key)
        watch = self._watch = HandshakeWatch(sock, self.address, mechanism)
        sock.connect(self.address)
        hello_sent = self._send_hello_nowait(sock)
        self.sock = sock
        poller = zmq.Poller()
        # the socket's FD, not the socket: zmq_poll would use the socket, which a user thread
        # may be sending on; the FD only hints, so each turn reads EVENTS (in _drain_socket) last
        sock_fd = sock.get(zmq.FD)
        poller.register(sock_fd, zmq.POLLIN)
        wake_fd = self._wakeup.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        poller.register(watch.monitor, zmq.POLLIN)
        last_heard = last_beat = time.monotonic()
        linger = 0
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100 if watch is not None else int(HEARTBEAT_S * 1000)))
                with self._sock_lock:
                    watch, hello_sent, last_heard, last_beat = self._turn(
                        sock, poller, events, watch, mechanism, hello_sent, last_heard, last_beat, wake_fd
                    )
                if watch is False:
                    break
            with self._sock_lock:
                self._direct = False
                if self._ready.is_set() and self._error is None:
                    if self.outgoing:
                        self._send_outgoing(sock)  # e.g. the cancels of shutdown(cancel_futures=True)
                    linger = CLOSE_LINGER_MS  # what was just sent leaves before the socket goes
        finally:
            with self._sock_lock:
                self._direct = False
                self._stop.set()
                for fut in list(self._requests.values()):
                    if not fut.done():
                        fut.set_exception(ManagerUnreachable("connection closed"))
                self._requests.clear()
                if watch:
                    watch.close()
                sock.close(linger)
                ctx.term()
                self._wakeup.close()

    def _turn(self, sock, poller, events, watch, mechanism, hello_sent, last_heard, last_beat, wake_fd):
        """One turn of the I/O thread, under ``_sock_lock``; ``watch`` False: stop (refused)."""
        if watch is not None:  # until the manager answers: a refused handshake fails at once
            refused = watch.poll()
            if refused is None and watch.failures >= 3:
                # closed during the handshake again and again (a busy manager may close before
                # it names the mismatch): a wrong pinned key, or no key for a CURVE manager
                refused = (
                    f"the manager at {self.address} closed the connection during the CURVE "
                    f"handshake {watch.failures} times: the pinned manager key "
                    f"{self.server_key} is probably not this manager's (or the token was refused)"
                    if mechanism == "curve"
                    else f"the manager at {self.address} closed the connection during the handshake "
                    f"{watch.failures} times: {watch.mismatch()}"
                )
            if refused is not None and not self._ready.is_set():
                self._error = AccessDenied(refused)
                self._ready.set()
                self._stop.set()
                poller.unregister(watch.monitor)
                watch.close()
                return False, hello_sent, last_heard, last_beat
            if not hello_sent:  # a failed handshake left no pipe; a new one may have one
                hello_sent = self._send_hello_nowait(sock)
            if self._ready.is_set():
                poller.unregister(watch.monitor)
                watch.close()
                watch = None
        if wake_fd in events:
            self._wakeup.drain()
        if self._drain_socket(sock):
            last_heard = time.monotonic()
        sent = False  # a send may take the FD's signal for a frame that waits: then drain again
        if self._ready.is_set() and self.outgoing:
            self._send_outgoing(sock)
            sent = True
        now = time.monotonic()
        if self._ready.is_set() and now - last_heard > self.manager_timeout_s:
            sent = True  # (what it calls may send)
            if self.unacked or self.pending_ids():
                self.on_manager_lost(
                    f"no answer from the manager at {self.address} for "
                    f"{self.manager_timeout_s:g} s; the tasks may still run: look them up "
                    "later with Executor.fetch(task_ids)"
                )
            last_heard = now  # keep trying; new tasks get a fresh period
        if now - last_beat >= HEARTBEAT_S and (self.unacked or self.pending_ids()):
            # a restarted manager answers "not-registered": we then resync
            sock.send(m.pack(m.Heartbeat({})) if now - last_heard < 30 else self._hello())
            last_beat, sent = now, True
        if sent and self._drain_socket(sock):  # the sends may have taken the FD's signal: EVENTS last
            last_heard = time.monotonic()
        # user threads may send tasks themselves from now on (not before the handshake)
        self._direct = (
            self._allow_direct and watch is None and self._ready.is_set() and not self._stop.is_set()
        )
        return watch, hello_sent, last_heard, last_beat

    def _send_hello_nowait(self, sock: zmq.Socket) -> bool:
        """Hello without waiting: after a failed handshake there is no pipe and a send would block
        (the handshake watch then says why)."""
        try:
            sock.send(self._hello(), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _drain_socket(self, sock: zmq.Socket) -> bool:
        """Handle every waiting frame (ending on a read of EVENTS); whether there was one."""
        got = False
        while True:
            if not sock.get(_EVENTS) & _POLLIN:  # cheaper than a raised zmq.Again
                return got
            got = True
            frame = sock.recv(zmq.NOBLOCK)
            try:  # a large result comes as a frame of its own: its buffer, not a copy
                msg = m.unpack(frame, extra=m.recv_rest(sock))
            except ProtocolError:
                continue
            self._handle(sock, msg)

    def _handle(self, sock: zmq.Socket, msg: m.Message) -> None:
        if isinstance(msg, m.Results):
            for res in msg.results:  # a result says the manager had the task: no resend needed
                self.unacked.pop(res[m.R_ID], None)
            self.on_results(msg.results)
        elif isinstance(msg, m.Accepted):
            for task_id in msg.task_ids:
                self.unacked.pop(task_id, None)
        elif isinstance(msg, m.Welcome):
            first = not self._ready.is_set()
            self.welcome = msg.info
            self._ready.set()
            if not first:
                self._resync(sock)
        elif isinstance(msg, m.Refused):
            if msg.code == "not-registered":
                sock.send(self._hello())
            elif not self._ready.is_set():
                cls = AccessDenied if msg.code == "access-denied" else ProtocolError
                self._error = cls(f"manager refused the connection: {msg.message}")
                self._ready.set()
                self._stop.set()
            elif msg.code == "access-denied":  # the token was revoked or replaced while connected
                self.unacked.clear()
                self.on_access_denied(
                    AccessDenied(
                        f"the manager no longer accepts this token ({msg.message}): it was revoked or "
                        "replaced; ask the hub's admin for a new one"
                    )
                )
        elif isinstance(msg, m.CancelRefused):
            self.on_cancel_refused(msg.task_ids)
        elif isinstance(msg, m.States):  # progress of our tasks, where the manager forwards it
            self.on_states(msg.updates)
        elif isinstance(msg, (m.TaskInfo, m.Status)):
            fut = self._requests.pop(msg.request_id, None)
            if fut is not None:
                fut.set_result(msg.records if isinstance(msg, m.TaskInfo) else msg.info)

    def _resync(self, sock: zmq.Socket) -> None:
        """After a manager restart: resend unacknowledged tasks, fetch pending results."""
        by_endpoint: dict[str, list] = {}
        for endpoint, rec in self.unacked.values():
            by_endpoint.setdefault(endpoint, []).append(rec)
        for digest, blob in self.code_sent.items():
            sock.send(m.pack(m.PutCode(digest, blob)))
        for endpoint, recs in by_endpoint.items():
            for i in range(0, len(recs), self.batch_size):
                m.send_message(sock, m.Submit(endpoint, recs[i : i + self.batch_size]))
        pending = self.pending_ids()
        if pending:
            sock.send(m.pack(m.Fetch(pending)))

    def _send_outgoing(self, sock: zmq.Socket) -> None:
        batches: dict[str, list] = {}
        sizes: dict[str, int] = {}

        def flush_tasks() -> None:  # keep the user's order: nothing overtakes a task
            for endpoint, batch in batches.items():
                if batch:
                    m.send_message(sock, m.Submit(endpoint, batch))
            batches.clear()
            sizes.clear()

        while self.outgoing:
            item = self.outgoing.popleft()
            cls = type(item)
            if cls is SendTask:
                if not item.claim():
                    continue
                rec, endpoint = item.rec, item.endpoint
                self.unacked[rec[m.T_ID]] = (endpoint, rec)
                batch = batches.setdefault(endpoint, [])
                batch.append(rec)
                sizes[endpoint] = sizes.get(endpoint, 0) + len(rec[m.T_PAYLOAD])
                if len(batch) >= self.batch_size or sizes[endpoint] >= MAX_MESSAGE_BYTES:
                    m.send_message(sock, m.Submit(endpoint, batch))
                    batches[endpoint], sizes[endpoint] = [], 0
                continue
            flush_tasks()
            if cls is SendCode:
                self.code_sent[item.digest] = item.blob
                sock.send(m.pack(m.PutCode(item.digest, item.blob)), copy=False)
            elif cls is SendCancel:
                sock.send(m.pack(m.Cancel(item.task_ids)))
            elif cls is SendQuery:
                sock.send(m.pack(m.Query(item.request_id, item.task_ids)))
            elif cls is SendFetch:
                sock.send(m.pack(m.Fetch(item.task_ids)))
            elif cls is SendStatus:
                sock.send(m.pack(m.StatusRequest(item.request_id)))
        flush_tasks()


def _check_address(address: str, timeout_s: float) -> None:
    """Fail at once on a malformed address, or when nothing listens there (ZeroMQ would retry
    silently until the handshake times out)."""
    scheme, _, rest = address.partition("://")
    if scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise ValueError(f"manager address {address!r} must look like tcp://host:port")
    if scheme != "tcp":
        return
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"manager address {address!r} must look like tcp://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout_s, 5.0)).close()
    except OSError as exc:
        raise ManagerUnreachable(
            f"no dlhub manager listens at {address} ({exc.strerror or exc}); start one with `dlhub up`"
        ) from None
