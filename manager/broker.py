"""The manager's broker loop: moves frames between clients, endpoints and the task store.

    clients (DEALER) --tcp--> [client ROUTER] --\\
                                                 +--> Router (sans-IO) --> outbox --> sockets
    endpoints (DEALER) -tcp-> [endpoint ROUTER] -/            |
                                                        TaskStore.enqueue --> writer thread
    writer thread --eventfd--> loop: send Accepted for what was committed

    client frame --> Manager._on_client (.clients: a Submit a slice at a time, the rest in the
                     client backlog; Query/Fetch rows read off the loop) --> events --> Router
    Hello --> .sessions (admission, revocation, connections that end)

One thread owns both sockets. Each wake-up drains every waiting frame before it sends, so
results and tasks that arrive together leave together (batching between hops, no timers on the
latency path). User payloads stay opaque bytes: nothing here unpickles them.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import queue
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from dlhub.protocol import ProtocolError
from dlhub.protocol import messages as m
from dlhub.protocol.curve import is_loopback, publish_local_key, split_tcp, unpublish_local_key
from dlhub.protocol.loopgc import LoopGC
from dlhub.protocol.serialize import runtime_versions

from . import events as ev
from .acks import CommitAcks
from .api import ApiServer
from .auth import Authenticator, backfill_curve_key, ensure_admin, users_without_curve_key
from .client_backlog import ClientBacklog
from .clients import SUBMIT_SLICE as SUBMIT_SLICE  # re-exported: tests import it from here
from .clients import ClientsMixin
from .config import ManagerConfig, write_manager_info
from .connections import ConnectionTracker, raise_open_file_limit
from .fair_share import LOAD_SAMPLE_S
from .repository import Repository
from .result_cache import ResultCache
from .routing import Router
from .services import ServableService
from .sessions import ClientSession, SessionsMixin
from .store import TaskStore, make_engine, migrate
from .zap import ZAP_DOMAIN, UserAuthenticator, load_or_create_keypair

_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)

log = logging.getLogger("dlhub.manager")

DRAIN_LIMIT = 1000  # frames read from one socket before the loop looks at the others
# ... or this long: a turn is bounded by work, so one user's flood of frames delays another's
# frame (and every result waiting to go out at Flush) by a few ms, not by the whole flood
DRAIN_BUDGET_S = 0.002  # client submissions read in one turn (results: RESULTS_BUDGET_S)
RESULTS_BUDGET_S = 0.01  # results read in one turn before they go out (Flush) and others are read
# ... and a frame is not a unit of work: a Submit is taken SUBMIT_SLICE tasks at a time (.clients)


_FLUSH = ev.Flush()  # immutable: one instance serves every loop turn
# what may go to an identity with no session: refusals, and the Welcome that opens a session
_SESSIONLESS = (m.Refused, m.Welcome)


class Manager(ClientsMixin, SessionsMixin):
    """Run with :meth:`start` then :meth:`run` (blocking) or :meth:`start_thread`. What client
    messages do (Submit, PutCode, Cancel, Query, Fetch, status) is in :mod:`.clients`; sessions
    (admission, revocation, connections that end) in :mod:`.sessions`; acknowledgements after
    commit in :mod:`.acks`."""

    def __init__(self, config: ManagerConfig):
        self.config = config
        self.home = Path(config.home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.session = secrets.token_hex(8)
        self._stop = threading.Event()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()  # work for the loop from other threads
        # reads that may wait on the database or the disk (Fetch, Query, code): never on the loop
        self._io = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="dlhub-io")
        self._ack_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.clients: dict[bytes, ClientSession] = {}
        # the rest of Submits taken SUBMIT_SLICE tasks at a time, and their clients' later frames
        self._backlog = ClientBacklog()
        self.endpoint_users: dict[bytes, str] = {}  # endpoint identity -> the user of its token
        self._endpoint_owners: dict[str, str] = {}  # endpoint name -> the user who owns it (cache)
        # connections to close: (when, users, their client IPs, their endpoint IPs)
        self._closing: list[tuple[float, frozenset[str], set[str], set[str]]] = []
        self.acks = CommitAcks(
            functools.partial(os.eventfd_write, self._ack_fd, 1),  # wakes the loop
            self._send_on,
            self.endpoint_users,
            self._check_connections,
        )
        self.client_url = self.endpoint_url = ""
        self._thread: threading.Thread | None = None
        self._loop_thread: int | None = None  # the loop's thread id while run() runs

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        raise_open_file_limit()  # one descriptor per connected endpoint and client
        engine = make_engine(self.config.database_url)
        migrate(engine)
        ensure_admin(engine, self.config.admin_user, self.home / "admin.token")
        self._backfill_keys(engine)
        self.auth = Authenticator(engine, refresh_s=None)  # refreshed by _watch_users
        self.store = TaskStore(engine, self.acks.committed, blob_dir=self.home / "task-blobs")
        self.repository = Repository(engine, self.home / "blobs")
        interrupted = self.repository.fail_interrupted()
        if interrupted:
            log.warning("%d publish(es) interrupted by the last stop were marked failed", interrupted)
        self.servables = ServableService(self, self.repository)
        self.router = Router(
            self.store,
            endpoint_timeout_s=self.config.endpoint_timeout_s,
            resolve=self.servables.resolve,
            packages=self.repository.package,
            result_cache=self._result_cache(),
            deterministic=self.servables.deterministic,
            known_endpoints=self.store.endpoint_names(),
            principal=self._principal,
            servable_owner=self.servables.owner_of,
            max_open_tasks_per_user=self.config.max_open_tasks_per_user,
            max_inflight_per_user=self.config.max_inflight_per_user,
            emit=True,  # writes and callbacks come back as instructions, carried out by route()
            event_log=os.environ.get("DLHUB_ROUTER_EVENT_LOG") or None,  # replay: events.replay
        )
        unfinished = self.store.unfinished()
        self.router.recover(unfinished)
        if unfinished:
            log.info("re-queued %d unfinished tasks from the database", len(unfinished))
        self.store.start()
        self.api: ApiServer | None = None
        if self.config.rest_port is not None:
            from .api import create_app

            self.api = ApiServer(
                lambda: create_app(engine, self.repository, Authenticator(engine), self.servables),
                self.config.host,
                self.config.rest_port,
                (self.config.tls_cert, self.config.tls_key) if self.config.tls_cert else None,
            )
            self.api.start()

        self.ctx = zmq.Context()
        self.curve_public_key: str | None = None
        if not self.config.insecure_loopback:
            public, self._curve_secret = load_or_create_keypair(self.home / "curve.key")
            self.curve_public_key = public.decode("ascii")
        self.zap = UserAuthenticator(self.ctx, engine)  # before bind: no handshake goes unchecked
        self.zap.start()
        self.client_sock, self.client_conns = self._router_socket(self.config.client_port)
        self.endpoint_sock, self.endpoint_conns = self._router_socket(self.config.endpoint_port)
        # both links' connection monitors, for one zmq_poll before each send (_check_connections)
        self._monitors = [(self.client_conns.monitor, _POLLIN), (self.endpoint_conns.monitor, _POLLIN)]
        self.client_url = self.client_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.endpoint_url = self.endpoint_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        info = {
            "client_url": self.client_url,
            "endpoint_url": self.endpoint_url,
            "rest_url": self.api.url if self.api else None,
            "curve_public_key": self.curve_public_key,  # clients and endpoints pin it
            "pid": os.getpid(),
            "session": self.session,
            "started": time.time(),
        }
        write_manager_info(self.home, info)
        if is_loopback(self.config.host):
            for url in (self.client_url, self.endpoint_url):  # found by clients of this user here
                if self.curve_public_key:
                    publish_local_key(split_tcp(url)[1], self.curve_public_key)
                else:  # a key left by a killed CURVE manager on this port would mislead clients
                    unpublish_local_key(split_tcp(url)[1], any_pid=True)
        log.info("manager listening: clients %s, endpoints %s", self.client_url, self.endpoint_url)
        self._users_watcher = threading.Thread(target=self._watch_users, name="dlhub-users", daemon=True)
        self._users_watcher.start()

    def _principal(self, user: str) -> tuple[bool, frozenset[str]]:
        """Whether ``user`` is an admin, and its groups: what endpoint policies check (cached
        for a second by the servable service, which asks the same for visibility)."""
        viewer = self.servables.viewer(user)
        return viewer.admin, viewer.groups

    def _result_cache(self) -> ResultCache | None:
        cfg = self.config
        if not cfg.result_cache_mb:
            return None
        cache = ResultCache(
            int(cfg.result_cache_mb * 1024 * 1024),
            cfg.result_cache_ttl_s,
            persist=self.store.put_cached if cfg.persist_result_cache else None,
        )
        if cfg.persist_result_cache:
            not_before = time.time() - cfg.result_cache_ttl_s if cfg.result_cache_ttl_s else 0.0
            rows = self.store.load_cached(cache.max_bytes, not_before)
            for key, payload, created in reversed(rows):  # oldest first: newest end up most recent
                cache.put(key, payload, created, persist=False)
            log.info("result cache: %d entries restored (%d bytes)", len(cache.entries), cache.bytes)
        return cache

    def _backfill_keys(self, engine) -> None:
        """Tokens made before CURVE keys were stored: the admin's is known (admin.token); others
        must be re-issued, which the log says."""
        try:
            token = (self.home / "admin.token").read_text().strip()
        except OSError:
            token = ""
        if token and backfill_curve_key(engine, token):
            log.info("stored the CURVE key of the admin token in %s", self.home / "admin.token")
        self.users_without_keys = users_without_curve_key(engine)
        if self.users_without_keys and not self.config.insecure_loopback:
            log.warning(
                "user(s) %s have tokens from before CURVE and cannot connect until re-issued: "
                "dlhub-manager create-user NAME",
                ", ".join(self.users_without_keys),
            )

    def _router_socket(self, port: int) -> tuple[zmq.Socket, ConnectionTracker]:
        sock = self.ctx.socket(zmq.ROUTER)
        conns = ConnectionTracker(sock)  # before bind: every accepted connection is seen
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise, never vanish
        # no ROUTER_HANDOVER: a second connection cannot take over a live connection's identity;
        # ZMTP heartbeats close dead connections, so a reconnecting peer gets its identity back
        sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30000)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        if self.curve_public_key:
            sock.curve_server = True
            sock.curve_secretkey = self._curve_secret
        else:  # --insecure-loopback: PLAIN, the token is the password (still checked by ZAP)
            sock.plain_server = True
        sock.setsockopt(zmq.SNDHWM, 0)  # batches keep message counts small; no silent drops
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.payload_limit_bytes + 16 * 1024 * 1024)
        if port:
            sock.bind(f"tcp://{self.config.host}:{port}")
        else:
            sock.bind_to_random_port(f"tcp://{self.config.host}")
        conns.port = split_tcp(sock.getsockopt_string(zmq.LAST_ENDPOINT))[1]
        return sock, conns

    def start_thread(self) -> None:
        self.start()
        self._thread = threading.Thread(target=self.run, name="dlhub-manager", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler, and more than once): it wakes at once."""
        self._stop.set()
        try:
            os.eventfd_write(self._ack_fd, 1)
        except OSError:  # already stopped: the descriptor is closed
            pass

    def _status(self) -> dict[str, Any]:
        info = self.router.status()
        info["manager"] = {
            "session": self.session,
            "versions": runtime_versions(),
            "default_endpoint": self.config.default_endpoint,
        }
        # the task store's writer: a stalled database is shown here, not felt by the loop
        info["database"] = self.store.health()
        return info

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The status snapshot, from any thread (computed on the loop, which owns the Router)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.call_soon(lambda: future.set_result(self._status()))
        return future.result(timeout)

    def endpoints_connected(self, timeout: float = 5.0) -> dict[str, bool]:
        """Endpoint name -> connected; from another thread, asked of the loop (which owns the
        Router), on the loop or before it runs, read directly."""

        return self.ask(lambda: {name: ep.connected for name, ep in self.router.endpoints.items()}, timeout)

    def task_standing(self, task_id: bytes, owner: str, timeout: float = 5.0) -> str | None:
        """What the Router knows of a task whose row a REST caller did not find committed, in one
        ask of the loop: ``"finished"`` when it saw the task end lately (the result goes out
        before the group commit: its row is on its way; says nothing of whose task it is, the
        row says that), ``"pending"`` when ``owner``'s task is known though perhaps not yet
        committed (a caller polls the moment its task id is answered), else None."""

        def read() -> str | None:
            if task_id in self.router.finished:
                return "finished"
            entry = self.router.tasks.get(task_id)
            return "pending" if entry is not None and entry.owner == owner else None

        return self.ask(read, timeout)

    def ask(self, read, timeout: float = 5.0):
        """``read()`` of Router state from any thread: asked of the loop, which owns the Router
        (read directly on the loop, or before it runs)."""
        if self._loop_thread in (None, threading.get_ident()):
            return read()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.call_soon(lambda: future.set_result(read()))
        return future.result(timeout)

    def call_soon(self, fn) -> None:
        """Run ``fn()`` on the loop thread (the only one that touches the Router), soon."""
        self._calls.put(fn)
        try:
            os.eventfd_write(self._ack_fd, 1)
        except OSError:  # stopped
            pass

    def off_loop(self, work, then) -> None:
        """Run ``work()`` on the I/O pool, then ``then(result)`` back on the loop. For reads that
        may wait (a busy database, a large package on disk) so the loop never does."""

        def done(fut: concurrent.futures.Future) -> None:
            try:
                value = fut.result()
            except Exception:
                log.exception("error in I/O work off the loop")
                return
            self.call_soon(lambda: then(value))

        try:
            self._io.submit(work).add_done_callback(done)
        except RuntimeError:  # shutting down
            pass

    def stop(self, timeout: float = 10.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        self._loop_thread = threading.get_ident()
        poller = zmq.Poller()
        poller.register(self.client_sock, zmq.POLLIN)
        poller.register(self.endpoint_sock, zmq.POLLIN)
        poller.register(self._ack_fd, zmq.POLLIN)
        for conns in (self.client_conns, self.endpoint_conns):
            poller.register(conns.monitor, zmq.POLLIN)
        next_tick = time.monotonic() + 1.0
        # the loop's busy fraction (wall time in turns, not in poll), told to the Router every
        # LOAD_SAMPLE_S: it sizes each user's fair share of an endpoint while users compete
        busy_s, load_since = 0.0, time.monotonic()
        loop_gc = LoopGC()  # full collections between turns, not 0.2-1 s pauses inside them
        try:
            while not self._stop.is_set():
                # client work waits: no sleeping; tasks held for fair share: a load sample (and
                # their release) at least every LOAD_SAMPLE_S, every 1 ms while they go at a rate
                router = self.router
                backlog = self._backlog.size  # pieces of client work waiting (an int: read every turn)
                wait_ms = 0 if backlog else 1 if router.paced() else 100 if router.holding() else 1000
                due = self.acks.endpoint_due
                if due is not None:  # wake for the acks that wait
                    wait_ms = max(0, min(wait_ms, int((due - time.monotonic()) * 1000) + 1))
                events = dict(poller.poll(wait_ms))
                turn_start = time.monotonic()
                if turn_start - load_since >= LOAD_SAMPLE_S:
                    self.route(ev.LoopLoad(busy_s / (turn_start - load_since), time.time()))
                    busy_s, load_since = 0.0, turn_start
                loop_gc.tick(idle=not events)
                # results first (they end work; submissions add it), then submissions for at
                # most DRAIN_BUDGET_S: under a flood the backlog waits in the flooding client's
                # own pipe, which ZeroMQ serves fairly against other clients' pipes
                if self.endpoint_sock in events:
                    self._drain(self.endpoint_sock, self._on_endpoint, self._admit_endpoint, RESULTS_BUDGET_S)
                if self.client_sock in events or backlog:
                    self._submit_rest(time.monotonic() + DRAIN_BUDGET_S)  # client by client
                    self._drain(self.client_sock, self._on_client, self._admit_client, DRAIN_BUDGET_S)
                if self._ack_fd in events:
                    self._send_acks()
                if self.acks.endpoint_due is not None and time.monotonic() >= self.acks.endpoint_due:
                    self.acks.send_endpoint_acks()
                if self.client_conns.monitor in events or self.endpoint_conns.monitor in events:
                    self._connections_ended()
                if self._closing and time.monotonic() >= self._closing[0][0]:
                    self._close_connections()
                if time.monotonic() >= next_tick:
                    self.route(ev.Tick(time.time()))
                    next_tick = time.monotonic() + 1.0
                self._flush()
                busy_s += time.monotonic() - turn_start
        finally:
            loop_gc.close()
            self._loop_thread = None
            self._shutdown()

    def _shutdown(self) -> None:
        self._users_watcher.join(5)
        if self.api is not None:
            self.api.stop()
        self.servables.close()
        self._io.shutdown(wait=True, cancel_futures=True)
        if self.acks.endpoint_waiting:  # what was committed need not come again after the restart
            self.acks.send_endpoint_acks()
        self.store.flush()
        self.store.close()
        self.client_conns.close()
        self.endpoint_conns.close()
        self.client_sock.close(0)
        self.endpoint_sock.close(0)
        self.zap.stop()
        self.ctx.term()
        if self.curve_public_key and is_loopback(self.config.host):
            for url in (self.client_url, self.endpoint_url):
                unpublish_local_key(split_tcp(url)[1])
        os.close(self._ack_fd)
        try:
            (self.home / "manager.json").unlink()
        except FileNotFoundError:
            pass

    def _drain(self, sock: zmq.Socket, handler, admit, budget_s: float) -> None:
        """Read waiting frames (at most ``DRAIN_LIMIT``, or until ``budget_s`` have passed; the
        rest next turn); each one's user is the one ZAP authenticated for its connection (the
        ``User-Id`` frame property), which ``admit`` checks against the identity's session."""
        deadline = time.monotonic() + budget_s
        backlog = self._backlog if sock is self.client_sock else None  # client work waiting
        for _ in range(DRAIN_LIMIT):
            if not sock.get(_EVENTS) & _POLLIN or time.monotonic() > deadline:
                return  # (EVENTS: cheaper than a raised zmq.Again)
            if backlog is not None and backlog.full():
                return  # the rest stays in the socket until the backlog shrinks
            frames = m.recv_frames(sock, _NOBLOCK)
            if len(frames) < 2:
                log.warning("dropping a message of %d frames (expected 2 or more)", len(frames))
                continue
            identity, frame = frames[0].bytes, frames[1]
            user = frame.get("User-Id")
            try:  # frames past the second: large payloads, each in its own frame (no copies)
                msg = m.unpack(frame.buffer, extra=frames[2:])
            except ProtocolError as exc:
                log.warning("bad frame from %r (user %s): %s", identity[:16], user, exc)
                self._send(sock, identity, m.Refused("protocol", str(exc)))
                continue
            if isinstance(msg, m.Hello):
                self._hello_frame(sock, identity, user, frame, msg, handler, admit)
                continue
            try:
                if admit(sock, identity, user, msg):
                    handler(identity, msg)
            except Exception:  # a bug must not take the broker down
                log.exception("error handling %s", type(msg).__name__)

    def _flush(self) -> None:
        """Send what the Router holds. A turn with nothing to send (most turns of a serial
        caller) skips the Flush event and the connection check, unless events are being logged
        for replay, where each turn's Flush is part of the record."""
        if self.router.sends_waiting() or self.router.event_log is not None:
            self._check_connections()  # sends leave at Flush: none to a session whose connection ended
            self.route(ev.Flush(time.time()) if self.router.paced() else _FLUSH)

    def route(self, *events: ev.Event) -> None:
        """On the loop: hand ``events`` to the Router and carry out what it says."""
        for instruction in self.router.handle(*events):
            kind = type(instruction)  # a type test per instruction: cheaper than a match
            if kind is ev.Send:
                sock = self.client_sock if instruction.link == "client" else self.endpoint_sock
                self._send(sock, instruction.identity, instruction.msg)
            elif kind is ev.Notify:
                try:
                    instruction.callback(instruction.result)
                except Exception:  # an internal task's owner must not take the loop down
                    log.exception("error in an internal task's callback")
            else:  # PersistReceived, PersistUpdates, PersistCode
                instruction.apply(self.store)  # enqueues for the writer thread

    def _send(self, sock: zmq.Socket, identity: bytes, msg: m.Message) -> None:
        """Send ``msg`` to ``identity``; anything but a refusal or a Welcome goes only to a live
        session: ZeroMQ routes by identity, and after a session's connection ended another
        connection (another user) may hold it."""
        if not isinstance(msg, _SESSIONLESS):
            if identity not in (self.clients if sock is self.client_sock else self.endpoint_users):
                log.debug("not sending %s to %r: no session", type(msg).__name__, identity[:16])
                return
        try:
            m.send_frames(sock, [identity, *m.pack_frames(msg)], _NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone: results stay in the store for Fetch
            log.debug("cannot send %s to %r: %s", type(msg).__name__, identity[:16], exc)

    def _send_on(self, link: str, identity: bytes, msg: m.Message) -> None:
        """:meth:`_send` on the ``"client"`` or the ``"endpoint"`` link (how acks are sent)."""
        self._send(self.client_sock if link == "client" else self.endpoint_sock, identity, msg)

    def _send_acks(self) -> None:
        """The eventfd woke the loop: run the calls from other threads, then send the acks of
        what the task store committed (:class:`.acks.CommitAcks`)."""
        try:
            os.eventfd_read(self._ack_fd)
        except BlockingIOError:
            pass
        self._check_connections()
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            try:
                call()
            except Exception:  # a bug must not take the broker down
                log.exception("error in a call from another thread")
        self.acks.send(self.router.finished)

    # ---- endpoints -------------------------------------------------------------------------

    def _on_endpoint(self, identity: bytes, msg: m.Message) -> None:
        if isinstance(msg, m.Hello):
            self._endpoint_hello(identity, msg)
            return
        if identity not in self.router.endpoint_by_identity:
            self._send(self.endpoint_sock, identity, m.Refused("not-registered", "say Hello first"))
            return
        if isinstance(msg, m.Results):
            flagged = m.uncacheable_ids(msg.info)  # results naming an output stored for their caller
            self.route(ev.EndpointResultsArrived(identity, msg.results, time.time(), flagged))
        elif isinstance(msg, m.States):
            self.route(ev.EndpointStatesArrived(identity, msg.updates))
        elif isinstance(msg, m.Heartbeat):
            self.route(ev.EndpointHeartbeat(identity, msg.info, time.time()))
            self._send(self.endpoint_sock, identity, m.Heartbeat({}))
        elif isinstance(msg, m.CodeRequest):
            blobs, missing = self.router.code_in_memory(msg.digests, identity)
            if not missing:
                self._send(self.endpoint_sock, identity, m.Code(self._checked_code(blobs)))
                return

            def send(loaded: dict[str, bytes]) -> None:  # back on the loop
                self.route(ev.CodeLoaded(loaded))
                self._send(self.endpoint_sock, identity, m.Code({**self._checked_code(blobs), **loaded}))

            self.off_loop(lambda: self._checked_code(self.router.load_code(missing)), send)
        elif isinstance(msg, m.CancelRefused):
            self.route(ev.EndpointCancelRefused(identity, msg))
        elif isinstance(msg, m.Shutdown):  # a clean stop: disconnected now, not after the timeout
            self.route(ev.EndpointLeft(identity))
        else:
            self._send(
                self.endpoint_sock,
                identity,
                m.Refused("unexpected", f"{type(msg).__name__} is not an endpoint message"),
            )
