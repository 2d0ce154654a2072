"""The endpoint daemon: dials out to the manager, runs tasks on Parsl-provisioned pools.

    manager ROUTER <--tcp-- DEALER [endpoint loop] ROUTER <--tcp-- pools (control)
                                        |                  <--tcp-- workers (data)
                                 events |  ^ instructions
                                    Scheduler (sans-IO): queue, prefetch credits, failures
                        Parsl JobStatusPoller thread: PoolExecutor blocks via the provider
                              (reads only the snapshot the loop publishes: ``_published``)
                        OffLoop thread per pool: provider status queries -> outcomes -> loop

Each wake-up drains the manager and the workers, turning each message into an event, hands the
turn's events to ``Scheduler.handle`` (which dispatches once), and carries out the instructions:
one ``Results`` and one ``States`` message to the manager, one ``Tasks`` message per worker.
Nothing here waits: sends are NOBLOCK, provider commands run off the loop. Results
are kept until the manager acknowledges them (it commits first), and are re-sent after the link
comes back; the manager re-sends tasks the same way, and ids already held are ignored.

Beside it, in their own modules: the watch over its Parsl blocks (``blocks.py``: provider
answers, blocks that ended) and servables' container images (``servable_images.py``: checked at
verification, fetched off the loop), each an object the Endpoint owns and calls only on its loop;
and the files its pools start from (``pool_config.py``: written once at start-up).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from dlhub.protocol import ProtocolError
from dlhub.protocol import messages as m
from dlhub.protocol.curve import (
    HandshakeWatch,
    find_server_key,
    new_link_keys,
    secure_dealer,
    secure_link_server,
    start_link_authenticator,
)
from dlhub.protocol.loopgc import LoopGC
from dlhub.protocol.private import write_private
from dlhub.protocol.serialize import runtime_versions

from . import events as ev
from .blocks import BlockWatch
from .config import EndpointConfig
from .offloop import OffLoop
from .packages import PackageCache
from .pool_config import write_pool_configs
from .scheduler import Scheduler
from .servable_images import ServableImages
from .tasklog import TaskLog, describe_function

_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
PUBLISH_SETTLE_S = 0.1  # work that only ended reaches Parsl's scaling view within this (_publish)

log = logging.getLogger("dlhub.endpoint")

DRAIN_LIMIT = 1000
# The manager link is read for at most this long a turn (what was read is handled, and results go
# out, before more is read): a flood of one user's tasks delays a worker's result by a few ms, not
# by the whole flood. Workers' results are read without a budget: they end work.
MANAGER_DRAIN_BUDGET_S = 0.002
# Results go to the manager at most this many in a message: the manager handles a message at once,
# so a smaller one keeps its turn short (and another user's result in the next message waits less)
RESULTS_PER_MESSAGE = 256
MAX_HELD_IN_HELLO = 500_000  # task ids a Hello lists (8 MB); more: the manager resends all


class EndpointRefused(RuntimeError):
    """The manager refused this endpoint (bad token or protocol)."""


class Endpoint:
    def __init__(self, config: EndpointConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)
        self.session = secrets.token_hex(8)
        self.started = time.time()
        self.pool_token = secrets.token_urlsafe(24)
        self.scheduler = Scheduler(
            clock=None,  # time comes with the events
            wall_clock=None,
            prefetch_target_ms=config.pool.prefetch_target_ms,
            min_prefetch=config.pool.min_prefetch,
            max_prefetch=config.pool.max_prefetch,
            no_prefetch_above_ms=config.pool.no_prefetch_above_ms,
            heartbeat_threshold_s=config.heartbeat_threshold_s,
            max_retries=config.max_retries,
            pool_offers={name: _offers(named) for name, named in config.all_pools().items()},
        )
        self.scheduler.bare_pools = {  # a servable's image cannot run on these pools' workers
            name for name, named in config.all_pools().items() if named.pool.container.type == "none"
        }
        log_path = os.environ.get("DLHUB_SCHEDULER_LOG")
        if log_path:  # every event the Scheduler handles, to replay a bug (events.replay)
            self.scheduler.event_log = ev.EventLog(log_path)
        self._events: list[ev.Event] = []  # what happened since the last _pump
        # until the manager's Welcome names the owner, only admins and listed users pass
        self.scheduler.apply(ev.PolicyChanged(time.monotonic(), config.policy.to_policy(config.name)))
        self.packages = PackageCache(self.run_dir / "servables", config.batching)
        self.scheduler.failures = []  # drained into the log by _pump
        self.tasklog = TaskLog(
            log, lambda function: describe_function(function, self.scheduler.labels, self.scheduler.code)
        )
        self.unacked: dict[bytes, list] = {}
        self.unacked_uncacheable: set[bytes] = set()  # those among them resent with the flag
        self.registered = False
        self.manager_state = "connecting"
        self.last_heard_manager = time.monotonic()
        self._last_hello = 0.0
        self._send_blocked = False  # the last send to the manager found no connection
        self._draining_since: float | None = None
        self.version_warnings: list[str] = []  # shown in status
        self._stop = threading.Event()
        self.poller = None
        self.executors: dict[str, Any] = {}  # pool name -> PoolExecutor
        self.blocks = BlockWatch(config, self.scheduler, self.executors, self._write_status)
        self.images = ServableImages(config, self.run_dir)  # servables' images (at verification)
        # what Parsl's poller thread reads (scaling): replaced whole by the loop, never changed in place
        self._published: tuple[dict[str, int], frozenset[str]] = ({}, frozenset())
        self._published_at: tuple = ()
        self._publish_due = 0.0  # when a change that only ended work is published at the latest

    # ---- start-up ----------------------------------------------------------------------------

    def start(self, register_timeout_s: float = 15.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ctx = zmq.Context()
        self.manager_sock = self.ctx.socket(zmq.DEALER)
        self.manager_sock.setsockopt(zmq.IDENTITY, f"e:{self.config.name}:{self.session}".encode())
        self.manager_sock.setsockopt(zmq.LINGER, 0)
        self.manager_sock.setsockopt(zmq.SNDHWM, 0)
        self.manager_sock.setsockopt(zmq.RCVHWM, 0)
        link = self.config.manager
        try:  # CURVE with the manager's pinned key (PLAIN only for a --insecure-loopback manager here)
            mechanism = secure_dealer(
                self.manager_sock, link.address, link.token, find_server_key(link.address, link.key)
            )
        except ValueError as exc:
            raise EndpointRefused(str(exc)) from None
        self._handshake = HandshakeWatch(self.manager_sock, link.address, mechanism)
        self.manager_sock.connect(link.address)
        self.worker_sock = self.ctx.socket(zmq.ROUTER)
        self.worker_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.worker_sock.setsockopt(zmq.SNDHWM, 0)
        self.worker_sock.setsockopt(zmq.RCVHWM, 0)
        self.worker_sock.setsockopt(zmq.LINGER, 0)
        # CurveZMQ to pools and workers too: a key pair per session, the client half in pool.json
        # (worker_link: plain, loopback only: PLAIN with the client secret as the password)
        self.link_keys = new_link_keys()
        plain = self.config.worker_link == "plain"
        password = self.link_keys["client_secret"] if plain else None
        self._link_auth = start_link_authenticator(self.ctx, self.link_keys["client_public"], password)
        secure_link_server(self.worker_sock, self.link_keys, plain)
        addr = self.config.pool.worker_address
        if self.config.pool.worker_port:
            self.worker_sock.bind(f"tcp://{addr}:{self.config.pool.worker_port}")
        else:
            self.worker_sock.bind_to_random_port(f"tcp://{addr}")
        self.worker_url = self.worker_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pool_config_paths = write_pool_configs(
            self.config, self.run_dir, self.worker_url, self.pool_token, self.link_keys
        )
        self._register(register_timeout_s)
        self._start_pools()

    def _hello(self) -> m.Hello:
        return m.Hello(
            "endpoint",
            self.config.name,
            self.config.manager.token,
            self.session,
            {**runtime_versions(), "protocol": m.PROTOCOL_VERSION},
            {
                "pid": os.getpid(),
                "workers_per_node": self.config.pool.workers_per_node,
                "policy": self.config.policy.model_dump(mode="json"),  # the manager mirrors it
                "held": self._held_ids(),  # the manager resends only tasks not among them
            },
        )

    def _held_ids(self) -> bytes:
        """Ids of every task this endpoint holds (queued, running, arrived but not yet handed to
        the Scheduler, or finished with the result unacknowledged), concatenated; empty above
        MAX_HELD_IN_HELLO (the manager then resends all it has in flight here: a burst, no loss)."""
        ids = set(self.scheduler.tasks)
        ids.update(self.unacked)
        for event in self._events:
            if type(event) is ev.TasksArrived:
                ids.update(rec[m.T_ID] for rec in event.records)
        return b"".join(ids) if len(ids) <= MAX_HELD_IN_HELLO else b""

    def _say_hello(self) -> None:
        """Register again (at most once a second: every queued message may answer not-registered)."""
        now = time.monotonic()
        if now - self._last_hello >= 1.0:
            self._last_hello = now
            self._to_manager(self._hello())

    def _register(self, timeout_s: float) -> None:
        """Say Hello and wait for the answer, so a bad token fails the start at once."""
        try:  # no wait: once a handshake has failed there is no pipe, and a send would block
            self.manager_sock.send(m.pack(self._hello()), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the handshake watch reports why
        deadline = time.monotonic() + timeout_s
        watch, self._handshake = self._handshake, None
        try:
            while time.monotonic() < deadline:
                refused = watch.poll()  # a refused handshake fails the start at once
                if refused is None and watch.failures >= 3 and watch.mechanism == "curve":
                    refused = (
                        f"the manager at {watch.address} closed the connection during the CURVE "
                        f"handshake {watch.failures} times: the manager key pinned in config.yaml "
                        "(manager.key) is probably not this manager's (or the token was refused)"
                    )
                if refused is not None:
                    raise EndpointRefused(refused)
                if self.manager_sock.poll(100):
                    frame = self.manager_sock.recv()
                    msg = m.unpack(frame, extra=m.recv_rest(self.manager_sock))
                    if isinstance(msg, m.Welcome):
                        self.registered, self.manager_state = True, "running"
                        self.last_heard_manager = time.monotonic()
                        self._on_manager(msg)
                        log.info("registered with manager %s", self.config.manager.address)
                        return
                    if isinstance(msg, m.Refused):
                        raise EndpointRefused(f"manager refused endpoint: {msg.code}: {msg.message}")
                    self._on_manager(msg)
        finally:
            watch.close()
        self.manager_state = "disconnected"
        log.warning("manager at %s did not answer; will keep trying", self.config.manager.address)

    def _start_pools(self) -> None:
        from .engine import PoolExecutor, build_provider, start_scaling

        for name, named in self.config.all_pools().items():
            self.executors[name] = PoolExecutor(
                build_provider(named.provider),
                self.pool_config_paths[name],
                named.pool.workers_per_node,
                outstanding=lambda name=name: self._published[0].get(name, 0),
                idle_blocks=lambda name=name: self._idle_blocks(name),
                python=named.pool.python,
                label=f"dlhub-{name}",
                pool_name=name,
            )
            self.blocks.provider_io[name] = OffLoop(f"dlhub-provider-{name}")
        self._publish(force=True)
        self.poller = start_scaling(list(self.executors.values()), self.run_dir, self.config)

    def _publish(self, force: bool = False) -> None:
        """Publish what Parsl's poller thread reads to scale (tasks held per pool, blocks whose
        workers hold tasks) as one immutable value: that thread never reads the Scheduler,
        which only this loop changes. Skipped when nothing came or went. Work that arrived or
        moved (tasks received or requeued, workers and pools come or gone) is published at once:
        a block must never look idle while it holds tasks. Work that only ended is published
        within PUBLISH_SETTLE_S: until then the block looks busy a little longer, which only
        delays a scale-in, and a serial caller's finished calls do not each pay for it."""
        s = self.scheduler
        c = s.counters
        grown = (c["received"], c["requeued"], c["worker_lost"], len(s.workers), len(s.pools))
        mark = (grown, c["completed"], len(s.tasks))
        if not force and mark == self._published_at:
            return
        now = time.monotonic()
        if not force and self._published_at and grown == self._published_at[0] and now < self._publish_due:
            return
        self._published_at, self._publish_due = mark, now + PUBLISH_SETTLE_S
        busy = {w.pool_id for w in s.workers.values() if w.assigned}
        blocks = frozenset(p.block_id for p in s.pools.values() if p.pool_id in busy)
        self._published = ({name: n for name, n in s.held_by_pool.items() if n}, blocks)

    def _idle_blocks(self, pool_name: str) -> list[str]:
        """This pool's blocks with no task at any of their workers (safe to cancel); runs on
        Parsl's poller thread, so it reads only what the loop published."""
        ex = self.executors.get(pool_name)
        if ex is None:
            return []
        busy = self._published[1]
        return [b for b in list(ex._status) if f"{pool_name}/{b}" not in busy]

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.manager_sock, zmq.POLLIN)
        poller.register(self.worker_sock, zmq.POLLIN)
        next_beat = 0.0
        loop_gc = LoopGC()  # full collections between turns, not pauses inside them
        try:
            while not self._stop.is_set():
                wait_ms = max(1, min(250, int(self.config.heartbeat_s * 1000)))
                due = self.scheduler.next_batch_deadline()
                if due is not None:  # a batch delay ends sooner: wake for it
                    wait_ms = max(1, min(wait_ms, int((due - time.monotonic()) * 1000) + 1))
                events = dict(poller.poll(wait_ms))
                loop_gc.tick(idle=not events)
                if not events:  # idle: tell the manager which tasks are running (off the hot path)
                    self._events.append(ev.Idle(time.monotonic(), time.time()))
                if self.manager_sock in events:
                    self._drain(self.manager_sock, None, MANAGER_DRAIN_BUDGET_S)
                if self.worker_sock in events:
                    self._drain(self.worker_sock, True)
                self.blocks.answers()
                self.images.answers(self._events)
                now = time.monotonic()
                if self._draining_since is not None and (
                    not any(w.assigned for w in self.scheduler.workers.values())
                    or now - self._draining_since > self.config.drain_timeout_s
                ):
                    self._stop.set()
                if now >= next_beat:
                    self._periodic(now)
                    next_beat = now + self.config.heartbeat_s
                self._pump()
        finally:
            loop_gc.close()
            self._shutdown()

    def stop(self, drain: bool = False) -> None:
        """Stop now, or drain first: dispatch nothing new and wait (up to ``drain_timeout_s``)
        for running tasks; tasks still queued here are re-sent by the manager next time."""
        if drain and self._draining_since is None:
            log.info(
                "draining: no new work; waiting up to %.0f s for running tasks", self.config.drain_timeout_s
            )
            self._draining_since = time.monotonic()
            self.scheduler.apply(ev.Paused(self._draining_since))
        else:
            self._stop.set()

    def _drain(self, sock: zmq.Socket, routed: bool | None, budget_s: float | None = None) -> None:
        """Read waiting frames: at most ``DRAIN_LIMIT``, and when ``budget_s`` is given, no more
        once it has passed (at least one: every turn makes progress; the rest next turn, as
        zmq_poll is level-triggered)."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        for i in range(DRAIN_LIMIT):
            if not sock.get(_EVENTS) & _POLLIN:  # cheaper than a raised zmq.Again
                return
            if i and deadline is not None and time.monotonic() > deadline:
                return
            first = sock.recv(zmq.NOBLOCK)
            identity, frame = (first, sock.recv()) if routed else (b"", first)
            extra = m.recv_rest(sock)  # large payloads, a frame each: kept as ZeroMQ's buffers
            try:
                msg = m.unpack(frame, self.config.payload_limit_bytes + 16 * 1024 * 1024, extra)
            except ProtocolError as exc:
                log.warning("bad frame on %s link: %s", "worker" if routed else "manager", exc)
                continue
            try:
                if routed:
                    self._on_worker(identity, msg)
                else:
                    self._on_manager(msg)
            except Exception:
                log.exception("error handling %s", type(msg).__name__)

    def _pump(self) -> None:
        """Hand the Scheduler what happened since the last turn, and carry out what it says."""
        events, self._events = self._events, []
        self._carry_out(self.scheduler.handle(*events))
        self._publish()

    def _carry_out(self, instructions: list[ev.Instruction]) -> None:
        """The I/O the Scheduler asks for: messages to workers, pools and the manager, logs."""
        for ins in instructions:
            kind = type(ins)
            if kind is ev.SendToWorker:
                try:
                    m.send_frames(self.worker_sock, [ins.identity, *m.pack_frames(ins.message)], _NOBLOCK)
                except zmq.ZMQError as exc:  # the worker vanished: the pool reports the death
                    log.warning("cannot reach worker %r: %s", ins.identity, exc)
            elif kind is ev.SendResults:
                for res in ins.results:
                    self.unacked[res[m.R_ID]] = res
                self.unacked_uncacheable |= m.uncacheable_ids(ins.info)
                self._results_to_manager(ins.results, ins.info)
            elif kind is ev.SendStates:
                self._to_manager(m.States(ins.updates))
            elif kind is ev.RequestCode:
                now = time.monotonic()
                found, learned = self.packages.from_disk(ins.digests, now)
                if found:  # kept on disk from an earlier fetch: no need to ask
                    checks = self.images.checks(found, now)
                    self._carry_out(self.scheduler.handle(*learned, *checks, ev.CodeFound(now, found)))
                rest = [d for d in ins.digests if d not in found]
                if rest:
                    self._to_manager(m.CodeRequest(rest))
            elif kind is ev.LogFailures:
                self.tasklog.failures(ins.failures)
            elif kind is ev.RefuseCancel:
                self._to_manager(m.CancelRefused(ins.task_ids, ins.reason))
            elif kind is ev.KillWorker:
                log.warning("killing worker %s: %s", ins.worker_id, ins.reason)
                self._send_worker(ins.pool_identity, m.KillWorker(ins.worker_id, ins.reason))
            elif kind is ev.PoolDropped:
                log.warning("pool %s lost (missed heartbeats); its tasks were re-queued", ins.pool_id)

    def _to_manager(self, msg: m.Message) -> None:
        """Send without ever blocking. With no connection to the manager (its handshake refused
        us, e.g. a ZAP denial after it restarted with new keys) a plain send would block the loop
        forever; the message is dropped instead, and said once per outage. Nothing is lost for
        good: results stay unacknowledged and code still waiting is asked again after the next
        Welcome, and the manager re-sends its tasks."""
        try:
            m.send_message(self.manager_sock, msg, _NOBLOCK)
        except zmq.Again:
            if not self._send_blocked:
                log.warning(
                    "no connection to the manager at %s (refused at the handshake, or down): %s "
                    "and what follows are dropped until it is back",
                    self.config.manager.address,
                    type(msg).__name__,
                )
            self._send_blocked = True
            return
        if self._send_blocked:
            log.info("the connection to the manager is back: sending again")
        self._send_blocked = False

    def _periodic(self, now: float) -> None:
        self._events.append(ev.Tick(now, time.time()))  # running states, lost pools, overrun tasks
        self._pump()
        snapshot = self._snapshot()
        self._to_manager(m.Heartbeat({**snapshot, **self._troubles()}))
        self.tasklog.tick(
            snapshot["completed"],
            snapshot["failed"],
            idle=not snapshot["outstanding"],
            state=f"now {snapshot['queued']} queued, {snapshot['on_workers']} on workers, "
            f"{snapshot['workers']} worker{'' if snapshot['workers'] == 1 else 's'}",
        )
        if now - self.last_heard_manager > self.config.heartbeat_threshold_s:
            if self.manager_state != "disconnected":
                log.warning("manager silent for %.0f s: disconnected", now - self.last_heard_manager)
            self.manager_state = "disconnected"
            self._say_hello()
        self.blocks.watch()
        self.blocks.forget_scaled_in()
        self._publish(force=True)
        self._write_status()

    # ---- messages from the manager -------------------------------------------------------------

    def _resend_results(self, results: list) -> None:
        """Results the manager has not acknowledged, again, with the flag of those that name an
        output stored for their caller (the manager must not cache or share them)."""
        flagged = [r[m.R_ID].hex() for r in results if r[m.R_ID] in self.unacked_uncacheable]
        self._results_to_manager(results, {"uncacheable": flagged} if flagged else {})

    def _results_to_manager(self, results: list, info: dict) -> None:
        """At most ``RESULTS_PER_MESSAGE`` results a message, each part with ``info`` (the flags
        name task ids; the manager applies them to the results of the message they came with)."""
        for i in range(0, len(results), RESULTS_PER_MESSAGE):
            self._to_manager(m.Results(results[i : i + RESULTS_PER_MESSAGE], info))

    def _on_manager(self, msg: m.Message) -> None:
        now = self.last_heard_manager = time.monotonic()
        if isinstance(msg, m.Tasks):
            fresh, done = [], []
            for rec in msg.tasks:  # a resent task we already finished: resend its result
                res = self.unacked.get(rec[m.T_ID])
                (fresh if res is None else done).append(rec if res is None else res)
            if done:
                self._resend_results(done)
            self._events.append(ev.TasksArrived(now, fresh))
        elif isinstance(msg, m.Code):
            self._events += self.packages.keep(msg.blobs, now)  # servables' policies first
            self._events += self.images.checks(msg.blobs, now)  # images before tasks are queued
            self._events.append(ev.CodeArrived(now, msg.blobs))
        elif isinstance(msg, m.Accepted):
            for task_id in msg.task_ids:
                if self.unacked.pop(task_id, None) is not None and self.unacked_uncacheable:
                    self.unacked_uncacheable.discard(task_id)
        elif isinstance(msg, m.Cancel):
            self._events.append(ev.CancelRequested(now, msg.task_ids))
        elif isinstance(msg, m.Welcome):
            owner = msg.info.get("owner")
            if isinstance(owner, str) and owner != self.scheduler.policy.owner:
                policy = self.config.policy.to_policy(self.config.name, owner)
                self.scheduler.apply(ev.PolicyChanged(now, policy))
                log.info("owner %s; %s", owner, policy.describe())
            if self.manager_state != "running":
                log.info("connected to the manager")
            self._events.append(ev.ManagerSession(now))  # code asked of an earlier session: asked again
            self.registered, self.manager_state = True, "running"
            if self.unacked:
                self._resend_results(list(self.unacked.values()))
        elif isinstance(msg, m.Refused):
            if msg.code == "not-registered":  # the manager restarted
                self._say_hello()
            else:
                log.error("manager refused: %s: %s", msg.code, msg.message)
        elif isinstance(msg, m.Heartbeat):
            if self.manager_state != "running" and self.registered:
                self.manager_state = "running"

    # ---- messages from pools and workers ------------------------------------------------------

    def _on_worker(self, identity: bytes, msg: m.Message) -> None:
        if isinstance(msg, m.Results):
            self._events.append(ev.WorkerResults(time.monotonic(), identity, msg.results, msg.info))
        elif isinstance(msg, m.Heartbeat):
            self._events.append(ev.PoolHeartbeat(time.monotonic(), identity, identity[2:].decode(), msg.info))
        elif isinstance(msg, m.Hello):
            self._worker_hello(identity, msg)
        elif isinstance(msg, m.WorkerDied):
            log.warning("worker %s died: %s", msg.worker_id, msg.reason)
            self._events.append(ev.WorkerDied(time.monotonic(), msg.worker_id, msg.reason))
        elif isinstance(msg, m.ImageFailed):
            log.error("servable image %s: %s", msg.image, msg.reason)
            self._events.append(ev.ImageFailed(time.monotonic(), msg.image, msg.reason))
        elif isinstance(msg, m.CancelRefused):
            self._to_manager(msg)

    def _worker_hello(self, identity: bytes, hello: m.Hello) -> None:
        if hello.token != self.pool_token:
            self._send_worker(identity, m.Refused("access-denied", "wrong pool token"))
            return
        mine, theirs = runtime_versions(), hello.versions
        if (mine["python"].rsplit(".", 1)[0], mine["dill"]) != (
            str(theirs.get("python", "")).rsplit(".", 1)[0],
            theirs.get("dill"),
        ):
            warning = (
                f"{hello.role}s of pool {hello.info.get('pool_name', 'default')!r} run Python "
                f"{theirs.get('python')} / dill {theirs.get('dill')} but the endpoint runs Python "
                f"{mine['python']} / dill {mine['dill']}: functions sent by value may not load "
                "(set pool.python or worker_init to a matching environment)"
            )
            if warning not in self.version_warnings:
                self.version_warnings.append(warning)
                log.warning("%s", warning)
        now = time.monotonic()
        if hello.role == "pool":
            left, drain_in = hello.info.get("walltime_left_s"), None
            if isinstance(left, (int, float)):
                named = self.config.all_pools().get(str(hello.info.get("pool_name")))
                margin = named.pool.drain_before_walltime_s if named else 60.0
                drain_in = max(0.0, left - margin)
            block = str(hello.info.get("block_id"))
            self.scheduler.apply(ev.PoolJoined(now, identity, hello.name, block, dict(hello.info), drain_in))
            log.info("pool %s registered (block %s)", hello.name, hello.info.get("block_id"))
            self.blocks.pool_registered(block, str(hello.info.get("pool_name", "default")))
            self._send_worker(identity, m.Welcome(self.session, {}))
        elif hello.role == "worker":
            pool_id, pool_name = str(hello.info.get("pool_id")), str(hello.info.get("pool_name", "default"))
            image = hello.info.get("image")  # started in a servable's image (StartWorker)
            image = image if isinstance(image, str) else None
            self.scheduler.apply(ev.WorkerJoined(now, identity, hello.name, pool_id, pool_name, image))
            # tell the manager and `dlhub up` at once rather than at the next heartbeat
            self._to_manager(m.Heartbeat(self._snapshot()))
            self._write_status()

    def _send_worker(self, identity: bytes, msg: m.Message) -> None:
        try:
            m.send_frames(self.worker_sock, [identity, *m.pack_frames(msg)], _NOBLOCK)
        except zmq.ZMQError:
            pass

    # ---- status and shutdown -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "state": self.manager_state,
            "pid": os.getpid(),
            "manager": self.config.manager.address,
            "updated": time.time(),
            "started": self.started,
            "blocks": self.blocks.block_states(),
            "block_errors": self.blocks.block_errors,
            "version_warnings": self.version_warnings,
            "failing": {pool: error[1] for pool, error in self.scheduler.refused_pools.items()},
            "provider_queries": self.blocks.slow_queries(),
            "versions": runtime_versions(),
            **self._snapshot(),
        }

    def _troubles(self) -> dict[str, Any]:
        """For the manager's endpoints page (dlhub.manager.web), with each heartbeat: the blocks
        with their scheduler job ids and states, blocks that ended before their pool ran (the
        last 5, output cut to 1,000 characters) and version warnings (the last 10)."""
        errors = list(self.blocks.block_errors.items())[-5:]
        return {
            "blocks": self.blocks.block_states(),
            "block_errors": {k: {**e, "output": (e.get("output") or "")[-1000:]} for k, e in errors},
            "version_warnings": self.version_warnings[-10:],
        }

    def _snapshot(self) -> dict[str, Any]:
        """The scheduler's counts, plus what `dlhub status` needs to explain them: tasks at
        workers (running or prefetched) and how often these numbers are refreshed."""
        snapshot = self.scheduler.snapshot()
        snapshot["on_workers"] = sum(len(w.assigned) for w in list(self.scheduler.workers.values()))
        snapshot["heartbeat_s"] = self.config.heartbeat_s
        provider = self.blocks.provider_health()  # a hung sacct shows in `dlhub status`
        if provider:
            snapshot["provider"] = provider
        return snapshot

    def _write_status(self) -> None:
        write_private(self.run_dir / "status.json", json.dumps(self.status(), default=str))  # 0600

    def _shutdown(self) -> None:
        counters = self.scheduler.counters
        self.tasklog.tick(counters["completed"], counters["failed"], idle=True, state="stopping", final=True)
        try:
            self._to_manager(m.Shutdown("endpoint stopping"))
        except zmq.ZMQError:
            pass
        for pool in list(self.scheduler.pools.values()):
            self._send_worker(pool.identity, m.Shutdown("endpoint stopping"))
        if self.poller is not None:
            try:
                self.poller.close(timeout=10)
            except Exception:
                log.exception("error while scaling in blocks")
        self.blocks.close()
        self.images.close()
        if self.scheduler.event_log is not None:
            self.scheduler.event_log.close()
        for ex in self.executors.values():
            ex.cancel_all()
        self.manager_state = "stopped"
        try:
            self._write_status()
        except OSError:
            pass
        self.manager_sock.close(0)
        self.worker_sock.close(0)
        self._link_auth.stop()
        self.ctx.term()


def _offers(named: Any) -> dict[str, Any]:
    """A worker's offer; undeclared cores come from the provider's cores per node when known."""
    offers = named.pool.offers()
    per_node = getattr(named.provider, "cores_per_node", None) or getattr(
        named.provider, "cpus_per_node", None
    )
    if offers["cores"] is None and per_node:
        offers["cores"] = per_node / named.pool.workers_per_node
    return offers


def install_signal_handlers(endpoint: Endpoint) -> None:
    """SIGTERM drains (a second one stops at once); SIGINT stops at once."""
    signal.signal(signal.SIGTERM, lambda *_: endpoint.stop(drain=True))
    signal.signal(signal.SIGINT, lambda *_: endpoint.stop(drain=False))
