"""The manager's broker loop: moves frames between clients, endpoints and the task store.

    clients (DEALER) --tcp--> [client ROUTER] --\\
                                                 +--> Router (sans-IO) --> outbox --> sockets
    endpoints (DEALER) -tcp-> [endpoint ROUTER] -/            |
                                                        TaskStore.enqueue --> writer thread
    writer thread --eventfd--> loop: send Accepted for what was committed

One thread owns both sockets. Each wake-up drains every waiting frame before it sends, so
results and tasks that arrive together leave together (batching between hops, no timers on the
latency path). User payloads stay opaque bytes: nothing here unpickles them.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from dlhub.protocol import PROTOCOL_VERSION, ProtocolError
from dlhub.protocol import messages as m
from dlhub.protocol.curve import is_loopback, publish_local_key, split_tcp, unpublish_local_key
from dlhub.protocol.errors import RAISE_MANAGER_LIMIT, infra_error
from dlhub.protocol.loopgc import LoopGC
from dlhub.protocol.serialize import runtime_versions

from . import events as ev
from .api import ApiServer
from .auth import (
    Authenticator,
    backfill_curve_key,
    ensure_admin,
    users_generation,
    users_without_curve_key,
)
from .connections import ConnectionTracker, raise_open_file_limit
from .memory import release_free_memory
from .repository import Repository
from .result_cache import ResultCache
from .routing import MAX_OPEN_TASKS_PER_USER, Router, code_matches, may_see
from .services import ServableService
from .store import TaskStore, claim_endpoint, endpoint_owner, make_engine, migrate
from .zap import ZAP_DOMAIN, UserAuthenticator, load_or_create_keypair

_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)

log = logging.getLogger("dlhub.manager")

TRIM_EVERY_S = 2.0  # how often freed heap memory goes back to the system
USERS_POLL_S = 0.2  # how often the manager looks for user changes (revocations, new tokens)
CLOSE_AFTER_S = 0.3  # a revoked user's sessions get their refusal, then their connections close
DRAIN_LIMIT = 1000  # frames read from one socket before the loop looks at the others
# An endpoint's results are acknowledged (Accepted, after the commit) at most this late, or at
# once when this many wait: one message, and one endpoint wake-up, per many results rather than
# per result (a serial caller's results came one commit, one Accepted each). The endpoint keeps
# a result until its ack, so an ack sent later only keeps a copy there a little longer.
ENDPOINT_ACK_DELAY_S = 0.05
ENDPOINT_ACK_BATCH = 1000
# ... or this long: a turn is bounded by work, so one user's flood of frames delays another's
# frame (and every result waiting to go out at Flush) by a few ms, not by the whole flood
DRAIN_BUDGET_S = 0.002  # client submissions read in one turn (results: RESULTS_BUDGET_S)
RESULTS_BUDGET_S = 0.01  # results read in one turn before they go out (Flush) and others are read
ENDPOINT_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # as an endpoint's config.yaml requires


_FLUSH = ev.Flush()  # immutable: one instance serves every loop turn
# what may go to an identity with no session: refusals, and the Welcome that opens a session
_SESSIONLESS = (m.Refused, m.Welcome)


@dataclass(frozen=True)
class ManagerConfig:
    home: Path
    db_url: str | None = None  # default: SQLite file under home
    host: str = "127.0.0.1"
    client_port: int = 0  # 0: pick a free port (written to manager.json)
    endpoint_port: int = 0
    payload_limit_bytes: int = 256 * 1024 * 1024
    endpoint_timeout_s: float = 30.0
    admin_user: str = "admin"
    rest_port: int | None = 0  # REST API port (0: any free port; None: no REST API)
    result_cache_mb: float = 256.0  # results of deterministic servables (0: no cache)
    result_cache_ttl_s: float | None = None  # None: entries live until evicted
    persist_result_cache: bool = False  # keep the result cache across restarts (in the database)
    default_endpoint: str | None = None  # for publishes and REST runs that name no endpoint
    # ZeroMQ PLAIN (token as password, no encryption) instead of CURVE: only on a loopback host
    insecure_loopback: bool = False
    tls_cert: str | None = None  # REST over HTTPS: certificate and key files (PEM) for uvicorn
    tls_key: str | None = None
    max_open_tasks_per_user: int = MAX_OPEN_TASKS_PER_USER  # quota: queued + running, admins exempt

    def __post_init__(self) -> None:
        if self.insecure_loopback and not is_loopback(self.host):
            raise ValueError(
                f"binding {self.host} without CURVE is refused: links off this host must be encrypted; "
                "drop --insecure-loopback (CURVE is the default) or bind 127.0.0.1"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both (PEM files) or neither")
        for key in ("client_port", "endpoint_port"):
            value = getattr(self, key)
            if not isinstance(value, int) or not 0 <= value < 65536:
                raise ValueError(f"{key} must be a port number 0-65535, got {value!r}")
        if self.payload_limit_bytes <= 0:
            raise ValueError(f"payload_limit_bytes must be positive, got {self.payload_limit_bytes!r}")
        if not isinstance(self.max_open_tasks_per_user, int) or self.max_open_tasks_per_user < 1:
            raise ValueError(
                f"max_open_tasks_per_user must be a positive integer, got {self.max_open_tasks_per_user!r}"
            )
        if self.endpoint_timeout_s <= 0:
            raise ValueError(f"endpoint_timeout_s must be positive, got {self.endpoint_timeout_s}")
        if self.result_cache_mb < 0:
            raise ValueError(f"result_cache_mb must not be negative, got {self.result_cache_mb}")
        if self.result_cache_ttl_s is not None and self.result_cache_ttl_s <= 0:
            raise ValueError(f"result_cache_ttl_s must be positive, got {self.result_cache_ttl_s}")
        if self.default_endpoint is not None and not re.fullmatch(ENDPOINT_NAME, self.default_endpoint):
            raise ValueError(
                f"default_endpoint must be an endpoint name like 'local', got {self.default_endpoint!r}"
            )

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{Path(self.home) / 'dlhub.db'}"


@dataclass
class _Client:
    user: str
    session: str
    role: str = "user"

    @property
    def viewer(self) -> str | None:
        """Whose tasks this client may see, fetch and cancel: its own (None: an admin's, all)."""
        return None if self.role == "admin" else self.user


class Manager:
    """Run with :meth:`start` then :meth:`run` (blocking) or :meth:`start_thread`."""

    def __init__(self, config: ManagerConfig):
        self.config = config
        self.home = Path(config.home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.session = secrets.token_hex(8)
        self._stop = threading.Event()
        self._acks: queue.SimpleQueue = queue.SimpleQueue()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()  # work for the loop from other threads
        # reads that may wait on the database or the disk (Fetch, Query, code): never on the loop
        self._io = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="dlhub-io")
        self._ack_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # results' acks waiting to go to endpoints: identity -> (its session's user, task ids)
        self._endpoint_acks: dict[bytes, tuple[str, list[bytes]]] = {}
        self._endpoint_acks_due: float | None = None
        self.clients: dict[bytes, _Client] = {}
        self.endpoint_users: dict[bytes, str] = {}  # endpoint identity -> the user of its token
        self._endpoint_owners: dict[str, str] = {}  # endpoint name -> the user who owns it (cache)
        # connections to close: (when, users, their client IPs, their endpoint IPs)
        self._closing: list[tuple[float, frozenset[str], set[str], set[str]]] = []
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
        self.store = TaskStore(engine, self._on_commit, blob_dir=self.home / "task-blobs")
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
        tmp = self.home / "manager.json.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(self.home / "manager.json")
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

    def task_pending(self, task_id: bytes, owner: str, timeout: float = 5.0) -> bool:
        """Whether ``owner``'s task is known to the Router though perhaps not yet committed (a
        REST caller polls the moment its task id is answered, before the group commit)."""

        def read() -> bool:
            entry = self.router.tasks.get(task_id)
            return entry is not None and entry.owner == owner

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
        loop_gc = LoopGC()  # full collections between turns, not 0.2-1 s pauses inside them
        try:
            while not self._stop.is_set():
                wait_ms = 1000
                due = self._endpoint_acks_due
                if due is not None:  # wake for the acks that wait
                    wait_ms = max(0, min(wait_ms, int((due - time.monotonic()) * 1000) + 1))
                events = dict(poller.poll(wait_ms))
                loop_gc.tick(idle=not events)
                # results first (they end work; submissions add it), then submissions for at
                # most DRAIN_BUDGET_S: under a flood the backlog waits in the flooding client's
                # own pipe, which ZeroMQ serves fairly against other clients' pipes
                if self.endpoint_sock in events:
                    self._drain(self.endpoint_sock, self._on_endpoint, self._admit_endpoint, RESULTS_BUDGET_S)
                if self.client_sock in events:
                    self._drain(self.client_sock, self._on_client, self._admit_client, DRAIN_BUDGET_S)
                if self._ack_fd in events:
                    self._send_acks()
                if self._endpoint_acks_due is not None and time.monotonic() >= self._endpoint_acks_due:
                    self._send_endpoint_acks()
                if self.client_conns.monitor in events or self.endpoint_conns.monitor in events:
                    self._connections_ended()
                if self._closing and time.monotonic() >= self._closing[0][0]:
                    self._close_connections()
                if time.monotonic() >= next_tick:
                    self.route(ev.Tick(time.time()))
                    next_tick = time.monotonic() + 1.0
                self._flush()
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
        if self._endpoint_acks:  # what was committed need not come again after the restart
            self._send_endpoint_acks()
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
        for _ in range(DRAIN_LIMIT):
            if not sock.get(_EVENTS) & _POLLIN or time.monotonic() > deadline:
                return  # (EVENTS: cheaper than a raised zmq.Again)
            frames = sock.recv_multipart(_NOBLOCK, copy=False)
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

    def _hello_frame(self, sock, identity: bytes, user, frame, msg: m.Hello, handler, admit) -> None:
        """A Hello opens a session on ``identity`` bound to the connection that carried it: when
        that connection ends the session is forgotten (:meth:`_connections_ended`), so a peer
        that later connects with the same identity gets nothing sent for the session. A Hello
        read after its connection ended opens nothing."""
        client = sock is self.client_sock
        conns = self.client_conns if client else self.endpoint_conns
        fd = frame.get(zmq.SRCFD)
        if not conns.live(fd):
            log.info("ignored a Hello from %r (user %s): its connection has ended", identity[:24], user)
            return
        conns.saw(identity, user, frame.get("Peer-Address"))  # where it connects from (revocation)
        try:
            if admit(sock, identity, user, msg):
                handler(identity, msg)
                if identity in (self.clients if client else self.endpoint_users):
                    conns.bind(identity, fd)
        except Exception:  # a bug must not take the broker down
            log.exception("error handling Hello")

    def _connections_ended(self) -> None:
        """Forget the sessions whose connection ended (read from the socket monitors)."""
        links = ((self.client_conns, self._drop_client), (self.endpoint_conns, self._drop_endpoint))
        for conns, drop in links:
            conns.poll()
            for identity in conns.take_ended():
                if drop(identity):
                    log.info("session %r ended with its connection", identity[:24])

    def _flush(self) -> None:
        """Send what the Router holds. A turn with nothing to send (most turns of a serial
        caller) skips the Flush event and the connection check, unless events are being logged
        for replay, where each turn's Flush is part of the record."""
        if self.router.sends_waiting() or self.router.event_log is not None:
            self._check_connections()  # sends leave at Flush: none to a session whose connection ended
            self.route(_FLUSH)

    def _check_connections(self) -> None:
        """Read waiting connection events before sending (cheap when none wait)."""
        if (
            self.client_conns.monitor.get(_EVENTS) & _POLLIN
            or self.endpoint_conns.monitor.get(_EVENTS) & _POLLIN
        ):
            self._connections_ended()

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

    # ---- the connection's user against the session's ---------------------------------------

    def _hello_user_ok(self, sock: zmq.Socket, identity: bytes, user: str, token: str) -> bool:
        """Hello's token is a second check: it must name the user the connection authenticated as."""
        who = self.auth.check(token)
        if who is not None and who[0] != user:
            log.warning("refused a Hello with %s's token on a connection of %s", who[0], user)
            self._send(
                sock,
                identity,
                m.Refused("access-denied", "the token names another user than the connection's key"),
            )
            return False
        return True

    def _refuse_identity(self, sock: zmq.Socket, identity: bytes, user: str, owner: str) -> bool:
        log.warning(
            "refused a frame from user %s on routing identity %r of user %s", user, identity[:24], owner
        )
        self._send(
            sock, identity, m.Refused("access-denied", "this routing identity belongs to another session")
        )
        return False

    def _admit_client(self, sock: zmq.Socket, identity: bytes, user: str, msg: m.Message) -> bool:
        client = self.clients.get(identity)
        if client is not None and client.user != user:  # an identity stays with its first user
            return self._refuse_identity(sock, identity, user, client.user)
        if isinstance(msg, m.Hello):
            return self._hello_user_ok(sock, identity, user, msg.token)
        return True

    def _admit_endpoint(self, sock: zmq.Socket, identity: bytes, user: str, msg: m.Message) -> bool:
        owner = self.endpoint_users.get(identity)
        if owner is not None and owner != user:
            return self._refuse_identity(sock, identity, user, owner)
        if isinstance(msg, m.Hello):
            return self._hello_user_ok(sock, identity, user, msg.token)
        return True

    # ---- clients ---------------------------------------------------------------------------

    def _on_client(self, identity: bytes, msg: m.Message) -> None:
        if isinstance(msg, m.Hello):
            self._client_hello(identity, msg)
            return
        client = self.clients.get(identity)
        if client is None:
            self._send(self.client_sock, identity, m.Refused("not-registered", "say Hello first"))
            return
        if isinstance(msg, m.Submit):
            self._check_sizes(identity, msg)
            self.route(ev.ClientSubmitted(identity, client.user, client.session, msg, time.time()))
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

    def _client_hello(self, identity: bytes, hello: m.Hello) -> None:
        if hello.role != "client":  # e.g. an endpoint configured with the client URL
            self._send(
                self.client_sock,
                identity,
                m.Refused(
                    "wrong-port",
                    f"this is the manager's client port; {hello.role}s connect to its endpoint port "
                    f"({self.endpoint_url})",
                ),
            )
            return
        who = self.auth.check(hello.token)
        if who is None:
            self._send(self.client_sock, identity, m.Refused("access-denied", "token refused"))
            return
        if hello.versions.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            self._send(
                self.client_sock,
                identity,
                m.Refused("protocol", f"manager speaks protocol {PROTOCOL_VERSION}"),
            )
            return
        if who[1] == "endpoint":
            self._send(
                self.client_sock,
                identity,
                m.Refused(
                    "access-denied",
                    f"{who[0]} has an endpoint token: endpoint tokens only register endpoints; "
                    "submit with a user token",
                ),
            )
            return
        self.clients[identity] = _Client(who[0], hello.session, who[1])
        endpoints = {
            name: {"connected": ep.connected, "versions": ep.versions}
            for name, ep in self.router.endpoints.items()
        }
        self._send(
            self.client_sock,
            identity,
            m.Welcome(
                self.session,
                {"user": who[0], "endpoints": endpoints, "default_endpoint": self.config.default_endpoint},
            ),
        )

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

    def _put_code(self, client: _Client, msg: m.PutCode) -> None:
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

    # ---- endpoints -------------------------------------------------------------------------

    def _on_endpoint(self, identity: bytes, msg: m.Message) -> None:
        if isinstance(msg, m.Hello) and msg.role == "check":  # `dlhub-endpoint check`: no session
            who = self.auth.check(msg.token)
            refusal = "token refused" if who is None else self._endpoint_refusal(who, msg.name, claim=False)
            reply = m.Welcome(self.session, {}) if refusal is None else m.Refused("access-denied", refusal)
            self._send(self.endpoint_sock, identity, reply)
            return
        if isinstance(msg, m.Hello):
            who = self.auth.check(msg.token)
            if who is None or msg.role != "endpoint":
                self._send(self.endpoint_sock, identity, m.Refused("access-denied", "token refused"))
                return
            refusal = self._endpoint_refusal(who, msg.name, claim=True)
            if refusal is not None:
                log.warning("refused endpoint %r of %s: %s", str(msg.name)[:64], who[0], refusal)
                self._send(self.endpoint_sock, identity, m.Refused("access-denied", refusal))
                return
            log.info("endpoint %r registered (session %s)", msg.name, msg.session)
            self.endpoint_users[identity] = who[0]
            self.route(ev.EndpointRegistered(identity, msg, who[0], time.time()))  # owner: policy default
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

    def _endpoint_refusal(self, who: tuple[str, str], name: str, claim: bool) -> str | None:
        """Why ``who`` may not register endpoint ``name`` (None: it may). Only endpoint and admin
        tokens register endpoints, and a name belongs to the user who registered it first
        (``claim``: this registration makes it theirs when nobody owns it yet); admins may
        register any name."""
        user, role = who
        if role not in ("endpoint", "admin"):
            return f"{user} has a {role} token: only endpoint or admin tokens register endpoints"
        if not isinstance(name, str) or not re.fullmatch(ENDPOINT_NAME, name):
            return f"endpoint name {str(name)[:80]!r} is not valid (letters, digits, _ . -; at most 64)"
        owner = self._endpoint_owners.get(name)
        if owner is None:
            engine = self.auth.engine
            owner = claim_endpoint(engine, name, user) if claim else endpoint_owner(engine, name)
            if owner is not None:
                self._endpoint_owners[name] = owner
        if owner is not None and owner != user and role != "admin":
            return f"endpoint name {name!r} belongs to {owner}; register under another name"
        return None

    # ---- users: revocation and new tokens take effect at once ------------------------------

    def _watch_users(self) -> None:
        """Off the loop: read the users generation (one tiny query) every USERS_POLL_S and wake the
        loop only when it changed, so a revocation costs the hot path nothing. Also hands freed
        heap memory back to the system every TRIM_EVERY_S (see :func:`release_free_memory`)."""
        seen = self.auth.generation
        next_trim = time.monotonic() + TRIM_EVERY_S
        while not self._stop.wait(USERS_POLL_S):
            if time.monotonic() >= next_trim:
                release_free_memory()
                next_trim = time.monotonic() + TRIM_EVERY_S
            try:
                generation = users_generation(self.auth.engine)
            except Exception as exc:  # database briefly unavailable: try again next time
                log.warning("cannot read the users generation: %s", exc)
                continue
            if generation != seen:
                seen = generation
                self.call_soon(self._users_changed)

    def _users_changed(self) -> None:
        """On the loop: drop the token caches, then the sessions of users whose token changed.
        Users whose token no longer works (revoked or replaced) are told so at once, and their
        connections are closed CLOSE_AFTER_S later (time for the refusal to leave)."""
        changed = self.auth.refresh()
        if not changed:
            return
        denied = self.auth.lost_token & changed
        if denied:
            refusal = m.Refused("access-denied", "the token was revoked or replaced")
            for identity, client in self.clients.items():
                if client.user in denied:
                    self._send(self.client_sock, identity, refusal)
            for identity, user in self.endpoint_users.items():
                if user in denied:
                    self._send(self.endpoint_sock, identity, refusal)
            ips = (self.client_conns.ips_of(denied), self.endpoint_conns.ips_of(denied))
            self._closing.append((time.monotonic() + CLOSE_AFTER_S, denied, *ips))
        dropped = self.drop_sessions(changed)
        log.info("users changed: %s; %d session(s) closed", ", ".join(sorted(changed)), dropped)

    def _close_connections(self) -> None:
        """Close the TCP connections of users whose token no longer works (see
        :mod:`.connections`); the sessions of others behind the same addresses are dropped too,
        so they say Hello again and resend or fetch what was in flight."""
        now, users, client_ips, endpoint_ips = time.monotonic(), set(), set(), set()
        while self._closing and self._closing[0][0] <= now:
            _, who, to_clients, to_endpoints = self._closing.pop(0)
            users |= who
            client_ips |= to_clients
            endpoint_ips |= to_endpoints
        for conns, drop, ips in (
            (self.client_conns, self._drop_client, client_ips),
            (self.endpoint_conns, self._drop_endpoint, endpoint_ips),
        ):
            if not ips:
                continue
            closed = conns.close_from(ips)
            moved = sum(drop(identity) for identity in conns.sessions_from(ips))
            log.info(
                "closed %d connection(s) from %s of %s (%d other session(s) there say Hello again)",
                closed,
                ", ".join(sorted(ips)),
                ", ".join(sorted(users)),
                moved,
            )

    def drop_sessions(self, users: frozenset[str] | set[str]) -> int:
        """Forget every ZeroMQ session (client or endpoint) of ``users``: their next frame gets
        ``not-registered``, and the Hello that follows is checked against the current tokens
        (refused for a revoked or replaced token). Their endpoints' tasks wait, as when an
        endpoint disconnects. Returns how many sessions were closed."""
        dropped = 0
        for identity, client in list(self.clients.items()):
            if client.user in users:
                dropped += self._drop_client(identity)
        for identity, user in list(self.endpoint_users.items()):
            if identity not in self.router.endpoint_by_identity:  # re-registered under another identity
                del self.endpoint_users[identity]
                continue
            if user in users:
                dropped += self._drop_endpoint(identity)
        return dropped

    def _drop_client(self, identity: bytes) -> bool:
        self.client_conns.forget(identity)
        return self.clients.pop(identity, None) is not None

    def _drop_endpoint(self, identity: bytes) -> bool:
        """Forget an endpoint's session: it shows disconnected, its tasks wait for its next Hello."""
        self.endpoint_conns.forget(identity)
        if self.endpoint_users.pop(identity, None) is None:
            return False
        name = self.router.endpoint_by_identity.pop(identity, None)
        ep = self.router.endpoints.get(name) if name is not None else None
        if ep is not None and ep.identity == identity:
            ep.connected, ep.identity = False, None
        return True

    # ---- acknowledgements after commit -----------------------------------------------------

    def _on_commit(self, acks: list[tuple[str, bytes, bytes]]) -> None:
        """Called on the writer thread: hand committed ids to the loop."""
        self._acks.put(acks)
        os.eventfd_write(self._ack_fd, 1)

    def _send_acks(self) -> None:
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
        grouped: dict[tuple[str, bytes], list[bytes]] = {}
        # A client forgets a task once its result arrives: no Accepted for a task whose result
        # has gone (a serial caller's tasks usually have), so no wake-up of the client for it.
        # A result lost with its connection is found again: the client resends what it kept
        # and asks for its pending results after reconnecting; a resend's ack ("client-again")
        # is always sent.
        finished = self.router.finished
        while True:
            try:
                acks = self._acks.get_nowait()
            except queue.Empty:
                break
            for link, identity, task_id in acks:
                if link == "client" and task_id in finished:
                    continue
                grouped.setdefault((link, identity), []).append(task_id)
        for (link, identity), ids in grouped.items():
            if link != "endpoint":  # "client", "client-again"
                self._send(self.client_sock, identity, m.Accepted(ids))
                continue
            user = self.endpoint_users.get(identity)
            if user is None:  # its session ended: it resends them after its next Hello
                continue
            waiting = self._endpoint_acks.get(identity)
            if waiting is None or waiting[0] != user:
                waiting = self._endpoint_acks[identity] = (user, [])
            waiting[1].extend(ids)
        if self._endpoint_acks and self._endpoint_acks_due is None:
            self._endpoint_acks_due = time.monotonic() + ENDPOINT_ACK_DELAY_S
        if sum(len(ids) for _, ids in self._endpoint_acks.values()) >= ENDPOINT_ACK_BATCH:
            self._send_endpoint_acks()

    def _send_endpoint_acks(self) -> None:
        """Send the results' acks that wait, each only to the session of the user it was for."""
        waiting, self._endpoint_acks = self._endpoint_acks, {}
        self._endpoint_acks_due = None
        self._check_connections()
        for identity, (user, ids) in waiting.items():
            if self.endpoint_users.get(identity) == user:
                self._send(self.endpoint_sock, identity, m.Accepted(ids))


def _unknown_task(task_id: bytes) -> list:
    """Fetch's answer for an id that does not exist, or that belongs to another user."""
    return m.result_record(
        task_id, "lost", error=infra_error("lost", f"task {task_id.hex()} is unknown to this manager")
    )


def read_manager_info(home: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(home) / "manager.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
