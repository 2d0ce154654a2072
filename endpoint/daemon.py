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
from parsl.jobs.states import JobState

from dlhub.protocol import ProtocolError, errors
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
from .config import EndpointConfig, walltime_seconds
from .offloop import Inline, OffLoop, Outcome
from .packages import PackageCache
from .scheduler import Scheduler
from .tasklog import TaskLog, describe_function

_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
PUBLISH_SETTLE_S = 0.1  # work that only ended reaches Parsl's scaling view within this (_publish)

log = logging.getLogger("dlhub.endpoint")

DRAIN_LIMIT = 1000
UNSEEN_JOB_GRACE_S = 30.0  # accounting may learn of a new job this late on a busy cluster
MAX_EARLY_BLOCK_FAILURES = 3  # then stop scaling and fail tasks with the blocks' error
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
        self._ended_blocks: set[str] = set()
        self.version_warnings: list[str] = []  # shown in status
        self._terminal_since: dict[str, float] = {}  # block -> when a terminal status was first seen
        self._early_failures: dict[str, int] = {}  # pool -> blocks in a row that ended before registering
        self.block_errors: dict[str, dict[str, Any]] = {}  # blocks that ended before their pool ran
        self._blocks_with_pool: set[str] = set()  # blocks whose pool registered at least once
        self._stop = threading.Event()
        self.poller = None
        self.executors: dict[str, Any] = {}  # pool name -> PoolExecutor
        self.image_io: OffLoop | None = None  # servables' image pulls (at verification)
        self._images_fetched: dict[str, str | None] = {}  # image -> the fetch's error (None: ok)
        self.provider_io: dict[str, OffLoop] = {}  # pool name -> the thread its provider queries run on
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
        self._write_pool_config()
        self._register(register_timeout_s)
        self._start_pools()

    def _link_secrets(self) -> dict[str, Any]:
        """What pool.json gives pools and workers to get in: the CURVE client keys, or the PLAIN
        password (``worker_link: plain``)."""
        if self.config.worker_link == "plain":
            return {"plain": {"password": self.link_keys["client_secret"]}}
        return {"curve": {k: v for k, v in self.link_keys.items() if k != "server_secret"}}

    def _write_pool_config(self) -> None:
        """One JSON file per named pool: what its pool processes and workers need to start."""
        self.pool_config_paths: dict[str, Path] = {}
        bundle = None
        for name, named in self.config.all_pools().items():
            path = self.pool_config_paths[name] = self.run_dir / f"pool-{name}.json"
            cfg = {
                "pool_name": name,
                "endpoint_url": self.worker_url,
                "token": self.pool_token,
                **self._link_secrets(),
                "workers_per_node": named.pool.workers_per_node,
                "heartbeat_s": self.config.heartbeat_s,
                "heartbeat_threshold_s": self.config.heartbeat_threshold_s,
                "payload_limit_bytes": self.config.payload_limit_bytes,
                "output_limit_bytes": self.config.output_limit_bytes,
                "worker_cache": self.config.worker_cache.model_dump(),
                "servable_cache": str(self.run_dir / "servables" / "unpacked"),  # not a shared /tmp
                "data_cache": {  # inputs by reference (endpoint/staging.py)
                    "root": str(self.run_dir / "data"),
                    "budget_bytes": int(self.config.data_cache.budget_gb * 1e9),
                    "outputs": self.config.data_cache.outputs,
                },
                "accelerators": list(named.pool.accelerators),
                "walltime_s": None
                if named.provider.type == "local"
                else walltime_seconds(named.provider.walltime),
            }
            container = named.pool.container
            if container.type != "none":  # workers run in an image (endpoint/containers.py)
                cfg["container"] = container.model_dump(mode="json")
                if container.dlhub == "bind":  # a copy of this dlhub, bound into the image
                    if bundle is None:
                        from .containers import prepare_bundle

                        bundle = str(prepare_bundle(self.run_dir / "container"))
                    cfg["container"]["bundle"] = bundle
                from .images import is_local

                cfg["image_cache"] = {  # servables' own images (StartWorker) come from it too
                    "root": str(self.run_dir / "images"),
                    "budget_bytes": int(self.config.image_cache.budget_gb * 1e9),
                }
                if not is_local(container.image):  # a URI: fetched once into the image cache
                    cfg["container"]["image_cache"] = {
                        "root": str(self.run_dir / "images"),
                        "budget_bytes": int(self.config.image_cache.budget_gb * 1e9),
                    }
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(cfg, f)

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
            self.provider_io[name] = OffLoop(f"dlhub-provider-{name}")
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
                    self._drain(self.manager_sock, None)
                if self.worker_sock in events:
                    self._drain(self.worker_sock, True)
                self._provider_answers()
                self._image_answers()
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

    def _drain(self, sock: zmq.Socket, routed: bool | None) -> None:
        for _ in range(DRAIN_LIMIT):
            if not sock.get(_EVENTS) & _POLLIN:  # cheaper than a raised zmq.Again
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
                self._to_manager(m.Results(ins.results, ins.info))
            elif kind is ev.SendStates:
                self._to_manager(m.States(ins.updates))
            elif kind is ev.RequestCode:
                now = time.monotonic()
                found, learned = self.packages.from_disk(ins.digests, now)
                if found:  # kept on disk from an earlier fetch: no need to ask
                    checks = self._image_checks(found, now)
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

    def _image_checks(self, blobs: dict[str, bytes], now: float) -> list[ev.Event]:
        """ImageUnavailable for each servable package whose container this endpoint cannot run."""
        from dlhub.protocol.servable import PACKAGE_HEADER, unpack_package

        out: list[ev.Event] = []
        for function, blob in blobs.items():
            package = m.package_key(function)
            if package is None or not blob or blob[0] != PACKAGE_HEADER:
                continue
            try:
                record = unpack_package(blob)[0]
            except Exception:  # a bad package fails its tasks at the worker, with the reason
                continue
            container = record.container
            build = container is None and record.requirements and self.config.image_cache.build
            if container is not None or build:
                from .images import is_local, servable_build, servable_image

                if build:  # an image built from its requirements (image_cache.build): build://KEY
                    image, problem = servable_build(record.requirements, self.config, self.run_dir)
                else:
                    image, problem = servable_image(container, self.config)
                if problem is not None:
                    log.warning("servable package %s: %s", package[:12], problem)
                    out.append(ev.ImageUnavailable(now, package, problem))
                elif image is not None:  # its calls run on workers started inside this image
                    fetching = not is_local(image) and self._fetch_image(image)
                    out.append(ev.ServableImage(now, package, image, fetching))
        return out

    def _fetch_image(self, image: str) -> bool:
        """Pull a servable's image into the endpoint's image cache off the loop, when it is
        verified (so its first call does not wait for a pull); True while that fetch runs. Its
        outcome comes back as ImageFetched (a failed pull fails the servable with the reason)."""
        if self._images_fetched.get(image) is None and image in self._images_fetched:
            return False  # fetched already (a failed one is tried again)
        if self.image_io is None:
            self.image_io = OffLoop("dlhub-image-fetch")
        if not self.image_io.busy(image):
            from .images import cache_for

            runtime = next(iter(self.config.all_pools().values())).pool.container.type
            cache = cache_for(self.run_dir, self.config)
            log.info("fetching servable image %s into the image cache (%s)", image, runtime)
            self.image_io.submit(image, lambda: cache.image_for(image, runtime))
        return True

    def _image_answers(self) -> None:
        """Servable images fetched (or not) since the last look: ImageFetched events."""
        if self.image_io is None:
            return
        for outcome in self.image_io.outcomes():
            error = None
            if outcome.error is not None:
                failed = "build failed" if outcome.key.startswith("build://") else "pull failed"
                error = f"image {outcome.key}: {failed}: {outcome.error}"
                log.warning("%s", error)
            else:
                log.info("servable image %s fetched in %.1f s", outcome.key, outcome.seconds)
            self._images_fetched[outcome.key] = error
            self._events.append(ev.ImageFetched(time.monotonic(), outcome.key, error))

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
        self._watch_blocks()
        self._forget_scaled_in()
        self._publish(force=True)
        self._write_status()

    # ---- blocks -------------------------------------------------------------------------------

    def _watch_blocks(self) -> None:
        """Ask the providers now about blocks that matter now (Parsl's own polls are 5-60 s apart):
        blocks whose pool has not registered (a failing worker_init shows up here within one
        block start) and blocks whose pool went quiet (ended by walltime, scancel, node loss)."""
        by_block = {p.block_id: p for p in list(self.scheduler.pools.values())}
        now = self.scheduler.clock()
        quiet = {b for b, p in by_block.items() if now - p.last_seen > 2 * self.config.heartbeat_s}
        for name, ex in self.executors.items():
            scaled_in = {b for b, st in list(ex._status.items()) if st.state == JobState.SCALED_IN}
            watch = [
                b
                for b in list(ex.blocks_to_job_id)
                if f"{name}/{b}" not in self._ended_blocks
                and b not in scaled_in
                and (f"{name}/{b}" not in by_block or f"{name}/{b}" in quiet)
            ]
            io = self.provider_io.get(name) or self.provider_io.setdefault(name, Inline())
            if not watch or io.busy(name):
                continue  # one query per pool at a time: a slow one is shown in status, not felt
            io.submit(name, _status_query, ex, watch)
        self._provider_answers()

    def _provider_answers(self) -> None:
        """Act on the provider answers that came back since the last look (events to the loop)."""
        for name, io in list(self.provider_io.items()):
            for outcome in io.outcomes():
                self._block_statuses(name, outcome)

    def _block_statuses(self, name: str, outcome: Outcome) -> None:
        """A provider's answer (from its OffLoop thread) about blocks the loop asked after."""
        if outcome.seconds > self.config.heartbeat_s:
            log.warning("the %s provider took %.1f s to answer a status query", name, outcome.seconds)
        if outcome.error is not None:
            log.warning("cannot ask the provider about pool %s's blocks: %s", name, outcome.error)
            return
        ex = self.executors[name]
        by_block = {p.block_id: p for p in list(self.scheduler.pools.values())}
        now = self.scheduler.clock()
        watch, statuses = outcome.value
        for block_id, st in zip(watch, statuses):
            key = f"{name}/{block_id}"
            pool = by_block.get(key)
            if key in self._ended_blocks or (
                pool is not None and now - pool.last_seen <= 2 * self.config.heartbeat_s
            ):
                continue  # settled, or its pool spoke up while the query ran
            if st is None or not st.terminal:
                self._terminal_since.pop(key, None)
                continue
            # Confirm before acting: the state must hold across queries a while apart. A
            # block whose pool never registered and that reads COMPLETED may just be
            # unknown to sacct yet (Parsl reads "missing" as COMPLETED): give it longer.
            first = self._terminal_since.setdefault(key, now)
            grace = max(2.0, 2 * self.config.heartbeat_s)
            if key not in by_block and st.state == JobState.COMPLETED:
                grace = max(grace, UNSEEN_JOB_GRACE_S)
            if now - first >= grace:
                self._block_ended(ex, name, block_id, st, by_block.get(key))
                self._write_status()  # the log and `dlhub status` name it together

    def _forget_scaled_in(self) -> None:
        """Pools of blocks we cancelled as idle are expected to go: drop them quietly."""
        scaled_in = {
            f"{name}/{b}"
            for name, ex in self.executors.items()
            for b, st in list(ex._status.items())
            if st.state == JobState.SCALED_IN
        }
        for pool in list(self.scheduler.pools.values()):
            if pool.block_id in scaled_in:
                self.scheduler.apply(
                    ev.PoolLost(self.scheduler.clock(), pool.pool_id, f"block {pool.block_id} was scaled in")
                )
                log.info("block %s scaled in (idle); its pool is gone", pool.block_id)

    def _block_ended(self, ex: Any, pool_name: str, block_id: str, st: Any, pool: Any) -> None:
        key = f"{pool_name}/{block_id}"
        self._ended_blocks.add(key)
        ex.mark_ended(block_id, st)
        job_id = ex.blocks_to_job_id[block_id]
        kind = self.config.all_pools()[pool_name].provider.type
        reason = f"block {key} ({kind} job {job_id}) ended: {st.state.name}"
        if st.message:
            reason += f" ({st.message})"
        if pool is not None:
            self.scheduler.apply(ev.PoolLost(self.scheduler.clock(), pool.pool_id, reason))
            log.warning("%s; its tasks were re-queued", reason)
            return
        if key in self._blocks_with_pool:  # its pool ran, and was dropped (missed heartbeats) first
            log.warning("%s after its pool was lost", reason)
            return
        tail = _tail(st.stderr_path) or _tail(st.stdout_path)
        failures = self._early_failures[pool_name] = self._early_failures.get(pool_name, 0) + 1
        self.block_errors[key] = {"job_id": job_id, "state": st.state.name, "reason": reason, "output": tail}
        log.error("%s before its pool started (check worker_init):\n%s", reason, tail)
        if failures >= MAX_EARLY_BLOCK_FAILURES and pool_name not in self.scheduler.refused_pools:
            message = (
                f"endpoint {self.config.name!r} cannot start workers in pool {pool_name!r}: {failures} "
                f"blocks in a row ended before their pool started; last: {reason}: {tail[-1000:]}"
            )
            log.error("%s; its scaling stopped and its tasks fail until a restart", message)
            ex.set_bad_state_and_fail_all(RuntimeError(message))  # Parsl's strategy skips it now
            error = errors.infra_error("lost", message)
            self.scheduler.apply(ev.PoolRefused(self.scheduler.clock(), pool_name, error))

    # ---- messages from the manager -------------------------------------------------------------

    def _resend_results(self, results: list) -> None:
        """Results the manager has not acknowledged, again, with the flag of those that name an
        output stored for their caller (the manager must not cache or share them)."""
        flagged = [r[m.R_ID].hex() for r in results if r[m.R_ID] in self.unacked_uncacheable]
        self._to_manager(m.Results(results, {"uncacheable": flagged} if flagged else {}))

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
            self._events += self._image_checks(msg.blobs, now)  # images before tasks are queued
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
            self._blocks_with_pool.add(block)
            self._early_failures[str(hello.info.get("pool_name", "default"))] = 0
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
            "blocks": self._block_states(),
            "block_errors": self.block_errors,
            "version_warnings": self.version_warnings,
            "failing": {pool: error[1] for pool, error in self.scheduler.refused_pools.items()},
            "provider_queries": self._slow_queries(),
            "versions": runtime_versions(),
            **self._snapshot(),
        }

    def _slow_queries(self) -> dict[str, dict[str, Any]]:
        """Provider status queries running longer than a heartbeat (the loop does not wait on
        them; this says a scheduler command is slow instead of the endpoint being slow)."""
        out = {}
        for name, io in self.provider_io.items():
            for _, seconds in io.in_flight().items():
                if seconds > self.config.heartbeat_s:
                    out[name] = {"running_s": round(seconds, 1)}
        return out

    def _troubles(self) -> dict[str, Any]:
        """For the manager's endpoints page (dlhub.manager.web), with each heartbeat: the blocks
        with their scheduler job ids and states, blocks that ended before their pool ran (the
        last 5, output cut to 1,000 characters) and version warnings (the last 10)."""
        errors = list(self.block_errors.items())[-5:]
        return {
            "blocks": self._block_states(),
            "block_errors": {k: {**e, "output": (e.get("output") or "")[-1000:]} for k, e in errors},
            "version_warnings": self.version_warnings[-10:],
        }

    def _snapshot(self) -> dict[str, Any]:
        """The scheduler's counts, plus what `dlhub status` needs to explain them: tasks at
        workers (running or prefetched) and how often these numbers are refreshed."""
        snapshot = self.scheduler.snapshot()
        snapshot["on_workers"] = sum(len(w.assigned) for w in list(self.scheduler.workers.values()))
        snapshot["heartbeat_s"] = self.config.heartbeat_s
        # each pool's provider status queries (run off the loop): a hung sacct shows in
        # `dlhub status` through the heartbeat, instead of being felt
        provider = {}
        for io in list(self.provider_io.values()):
            provider.update(io.health())
        if provider:
            snapshot["provider"] = provider
        return snapshot

    def _block_states(self) -> dict[str, dict[str, Any]]:
        """Parsl's view of each block (its polls are up to 60 s apart), corrected by what we
        know first-hand: a block whose pool is registered is running."""
        registered = {p.block_id: p for p in list(self.scheduler.pools.values())}
        out = {}
        for name, ex in self.executors.items():
            states = ex.block_states()
            for block_id, state in states.items():
                pool = registered.get(f"{name}/{block_id}")
                if pool is not None and state["state"] in ("PENDING", "UNKNOWN"):
                    state["state"] = "RUNNING"
                if pool is not None:
                    state["pool"] = pool.pool_id
            out[name] = states
        return out

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
        for io in self.provider_io.values():
            io.close()
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


def _tail(path: str | None, limit: int = 4000) -> str:
    """The end of a block's output file (blank when it cannot be read)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def install_signal_handlers(endpoint: Endpoint) -> None:
    """SIGTERM drains (a second one stops at once); SIGINT stops at once."""
    signal.signal(signal.SIGTERM, lambda *_: endpoint.stop(drain=True))
    signal.signal(signal.SIGINT, lambda *_: endpoint.stop(drain=False))


def _status_query(ex: Any, watch: list[str]) -> tuple[list[str], list[Any]]:
    """Runs on the pool's OffLoop thread: the provider's status command for these blocks."""
    return watch, ex.fresh_status(watch)
