"""Sans-IO task scheduling at the endpoint: queue, workers, prefetch credits, failures.

    loop --events (endpoint/events.py)--> handle(*events) --> [apply each; dispatch once]
    loop <--instructions: SendToWorker, SendResults, SendStates, RequestCode, KillWorker, ...

Events: tasks from the manager, code replies, workers and pools joining, results, worker deaths,
pool heartbeats, ticks; each carries the loop's clock reading (``now``), so nothing here reads a
clock or does I/O, and a logged run replays (:mod:`.replay`). Each event's handler is one of the
methods below, which are also the direct API the unit tests drive; they leave their outputs in
the outbox lists (``to_workers``, ``results``, ``states``, ``code_requests``, ``kill_requests``)
that :meth:`Scheduler.take_instructions` empties. Code requests: a reply settles only what its
own request asked (``code_asked``).

Dispatch: each worker holds a FIFO of tasks, the head running. A task may sit at depth ``d``
behind the head only if its function's prefetch allows it. The prefetch adapts to the function's
measured run time so that about ``prefetch_target_ms`` of work is queued ahead of a worker: many
for no-ops (so batches fill), one for short tasks, none for tasks longer than
``no_prefetch_above_ms`` (a round trip is noise next to them; kept at the endpoint, any idle
worker can take them and a cancel acts at once). Functions not yet measured get ``min_prefetch``
(0 by default: the first results arrive within one task's time and set the real depth).

Fair share: each pool's queue (:class:`~.fairqueue.FairQueue`) holds a FIFO per submitting user (the
``user`` of the task's origin) and dispatch serves them round-robin, one task a turn, so a user
with 100,000 tasks waiting delays another's single call by at most one task a worker, plus what
is already prefetched at the workers (bounded by ``prefetch_target_ms`` of work each).

Failures: a dead worker fails its running task with ``WorkerLost`` and re-queues the prefetched
ones; a dead pool (missed heartbeats) re-queues all its tasks, counting a retry against each,
and after ``max_retries`` reports them ``lost`` with the reason.

Batching of vectorized servables (their own queues, idle workers only): the policy object in
:mod:`.batching` decides when a batch is due; the Scheduler picks the worker and sends it.

Images per servable: a servable package whose container resolved to an image other than its
pool's own (:class:`~.events.ServableImage`) has its calls queued per ``(pool, image)`` and run
only on workers started inside that image. Workers are the pool's budget: when an image has calls
waiting and no worker (nor one starting), the Scheduler asks the pool (``StartWorker``) to replace
an idle worker of the least recently used image (the pool's own image included: its bare calls
then ask for one back the same way) with one inside the image it needs; workers stay warm in
their image until retired so. An image's calls wait meanwhile; batching does not apply to them.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dlhub.protocol import errors
from dlhub.protocol import messages as m

from . import events as ev
from .batching import Batching
from .events import EventLog
from .fairqueue import FairQueue

log = logging.getLogger("dlhub.endpoint.scheduler")

CODE_CACHE_BYTES = 512 * 1024 * 1024
IMAGE_START_TIMEOUT_S = 120.0  # a worker asked for in an image and not joined by then: ask again


@dataclass
class TaskState:
    record: m.TaskRecord
    worker: bytes | None = None
    retries: int = 0
    pool: str = "default"  # the named pool whose workers may run it
    user: str | None = None  # who submitted it (its origin's user): its turn in the fair queue


@dataclass
class WorkerState:
    identity: bytes
    worker_id: str
    pool_id: str
    assigned: deque = field(default_factory=deque)  # task ids, head = running
    pool_name: str = "default"
    known_code: set = field(default_factory=set)
    reported_running: bytes | None = None
    warm: set = field(default_factory=set)  # servable functions loaded there (routing prefers them)
    running_batch: set = field(default_factory=set)  # ids of the batch it runs as one call
    head_since: float | None = None  # when the head task (approximately) started
    killing: str | None = None  # why we asked the pool to kill this worker
    image: str | None = None  # the servable image it runs in (None: its pool's own image)
    swapping: bool = False  # being replaced by a worker in another image: given nothing new


@dataclass
class PoolState:
    pool_id: str
    identity: bytes
    block_id: str
    last_seen: float
    workers: set = field(default_factory=set)  # worker ids
    info: dict = field(default_factory=dict)
    drain_at: float | None = None  # stop giving this pool work at this time (walltime ahead)


class Scheduler:
    def __init__(
        self,
        clock: Callable[[], float] | None = time.monotonic,
        prefetch_target_ms: float = 2.0,
        min_prefetch: int = 0,
        max_prefetch: int = 64,
        heartbeat_threshold_s: float = 10.0,
        max_retries: int = 2,
        wall_clock: Callable[[], float] | None = time.time,
        no_prefetch_above_ms: float = 100.0,
        pool_offers: dict[str, dict[str, Any]] | None = None,
    ):
        # None: time comes only with the events handed to handle() (the daemon's way); a
        # callable: the old direct-call API (unit tests drive the clock by hand)
        self.now, self.wall_now = 0.0, 0.0
        self.clock = clock if clock is not None else (lambda: self.now)
        self.wall_clock = wall_clock if wall_clock is not None else (lambda: self.wall_now)
        self.event_log: EventLog | None = None  # every event handled, when set (replay a bug)
        self._out: list[ev.Instruction] = []  # instructions from events, until take_instructions
        self.prefetch_target_s = prefetch_target_ms / 1000.0
        self.min_prefetch, self.max_prefetch = min_prefetch, max_prefetch
        self.no_prefetch_above_s = no_prefetch_above_ms / 1000.0
        self.avg_task_s: dict[str, float] = {}  # function digest -> EWMA of its run time
        self.heartbeat_threshold_s = heartbeat_threshold_s
        self.max_retries = max_retries
        # what one worker of each named pool offers, the default pool first
        self.pool_offers = pool_offers or {"default": {"cores": None, "memory_gb": None, "gpus": 0}}
        self.queues: dict[str, FairQueue] = {name: FairQueue() for name in self.pool_offers}
        self.queue = self.queues[next(iter(self.queues))]  # the default pool's queue
        self.tasks: dict[bytes, TaskState] = {}
        self.held_by_pool: dict[str, int] = {}  # tasks held per pool (kept as they come and go)
        self.workers: dict[bytes, WorkerState] = {}
        self.worker_by_id: dict[str, bytes] = {}
        self.pools: dict[str, PoolState] = {}
        self.code: OrderedDict[str, bytes] = OrderedDict()
        self.code_bytes = 0
        self.waiting_code: dict[str, list[bytes]] = {}
        # package digest -> error record: servables whose container this endpoint cannot provide
        self.image_errors: dict[str, list] = {}
        # images per servable: package digest -> its image; queued calls per (pool, image); when
        # each (pool, image) last got a call (LRU); workers asked for and not yet joined
        self.package_images: dict[str, str] = {}
        self.function_images: dict[str, str] = {}  # the same by servable:/verify: function (hot path)
        self.image_queues: dict[tuple[str, str], deque] = {}
        self.image_used: dict[tuple[str, str | None], float] = {}
        self.image_starting: dict[tuple[str, str | None], list[float]] = {}
        self.images_fetching: set[str] = set()  # being pulled (ImageFetched ends it)
        self.bare_pools: set[str] = set()  # pools without a container runtime (set by the daemon)
        # code requests sent to the manager and not yet answered, oldest first: a reply settles
        # only the digests its own request asked for (the manager answers in order)
        self.code_asked: deque[frozenset[str]] = deque()
        # outputs
        self.to_workers: list[tuple[bytes, m.Message]] = []
        self.results: list[list] = []
        self.uncacheable: set[bytes] = set()  # results naming an output stored for their caller
        self.states: list[list] = []
        self.code_requests: list[str] = []
        self.kill_requests: list[tuple[str, str, str]] = []  # (pool_id, worker_id, reason)
        self.paused = False  # draining for shutdown: nothing new is dispatched
        self.refused_pools: dict[str, list] = {}  # pools whose blocks cannot start -> the error
        self.counters = {
            "received": 0,
            "completed": 0,
            "failed": 0,
            "worker_lost": 0,
            "requeued": 0,
            "refused": 0,  # by the endpoint's policy
            "image_starts": 0,  # workers replaced by one in another image
        }
        # the endpoint's policy (protocol.policy.Policy); None: every task is admitted (unit tests)
        self.policy: Any = None
        # failed tasks, (task id, function, worker identity or None, error), when a list: the
        # daemon sets one and drains it to log them (counting them costs one comparison a result)
        self.failures: list[tuple[bytes, str, bytes | None, list]] | None = None
        self.batcher = Batching()  # vectorized servables' calls: the batching policy and its queues

    # ---- events in, instructions out -----------------------------------------------------------

    def handle(self, *events: ev.Event) -> list[ev.Instruction]:
        """Apply events in order, dispatch once, and return what the loop must do now."""
        if self.event_log is not None:
            self.event_log.write("handle", events)
        self._apply(events)
        self.dispatch()
        return self.take_instructions()

    def apply(self, *events: ev.Event) -> None:
        """Apply events without dispatching: their outputs leave with the next :meth:`handle`
        (for control events whose effect the loop reads at once, e.g. a pool that joined)."""
        if self.event_log is not None:
            self.event_log.write("apply", events)
        self._apply(events)

    def _apply(self, events: tuple[ev.Event, ...]) -> None:
        # what each event does is one of the methods below (also the direct API of unit tests);
        # their outputs accumulate in the outbox lists until take_instructions empties them
        for event in events:
            self.now = event.now
            _HANDLERS[type(event)](self, event, self._out)

    def take_instructions(self) -> list[ev.Instruction]:
        """Empty the outbox into instructions: worker messages, then what goes to the manager
        (code requests, states, results), failures to log and workers to kill."""
        out, self._out = self._out, []
        if self.to_workers:
            out[:0] = [ev.SendToWorker(identity, msg) for identity, msg in self.to_workers]
            self.to_workers.clear()
        if self.code_requests:
            out.append(ev.RequestCode(self.take_code_requests()))
        if self.states:
            done = {r[m.R_ID] for r in self.results}  # a finished task needs no "running"
            updates = [u for u in self.states if u[0] not in done]
            if updates:
                out.append(ev.SendStates(updates))
            self.states.clear()
        if self.failures:
            out.append(ev.LogFailures(list(self.failures)))
            self.failures.clear()
        if self.results:
            flagged = self.uncacheable and [r[m.R_ID] for r in self.results if r[m.R_ID] in self.uncacheable]
            if flagged:
                self.uncacheable.difference_update(flagged)
                out.append(ev.SendResults(self.results, {"uncacheable": [t.hex() for t in flagged]}))
            else:
                out.append(ev.SendResults(self.results))
            self.results = []
        for pool_id, worker_id, reason in self.kill_requests:
            pool = self.pools.get(pool_id)
            if pool is not None:
                out.append(ev.KillWorker(pool.identity, worker_id, reason))
        self.kill_requests.clear()
        return out

    def _on_pool_joined(self, e: ev.PoolJoined, out: list) -> None:
        self.add_pool(e.identity, e.pool_id, e.block_id, e.info)
        if e.drain_in_s is not None:
            self.drain_pool_in(e.pool_id, e.drain_in_s)

    def _on_results(self, e: ev.WorkerResults, out: list) -> None:
        if e.info:
            self.worker_info(e.identity, e.info)
        self.worker_results(e.identity, e.results)

    def _on_heartbeat(self, e: ev.PoolHeartbeat, out: list) -> None:
        if self.pool_heartbeat(e.pool_id, e.info):
            out.append(ev.SendToWorker(e.identity, m.Heartbeat({})))

    def _on_cancel(self, e: ev.CancelRequested, out: list) -> None:
        refused = self.cancel(e.task_ids)
        if refused:
            out.append(ev.RefuseCancel(refused, "already running or finished"))

    def _on_tick(self, e: ev.Tick, out: list) -> None:
        self.wall_now = e.wall
        self.running_updates()
        out.extend(ev.PoolDropped(pool_id) for pool_id in self.check_pools())
        self.check_timeouts()

    def _on_idle(self, e: ev.Idle, out: list) -> None:
        self.wall_now = e.wall
        self.running_updates()

    # ---- tasks and code from the manager ----------------------------------------------------

    def refuse_pool(self, pool_name: str, error: list) -> None:
        """A pool cannot start workers (its blocks keep failing): fail its waiting tasks, and the
        ones that come for it, with ``error`` instead of letting them wait forever."""
        self.refused_pools[pool_name] = error
        queue = self.queues[pool_name]
        waiting = [t for t in queue if t in self.tasks]
        queue.clear()
        for (name, _), imaged in self.image_queues.items():
            if name == pool_name:
                waiting += [t for t in imaged if t in self.tasks]
                imaged.clear()
        for digest, ids in list(self.waiting_code.items()):
            mine = [t for t in ids if t in self.tasks and self.tasks[t].pool == pool_name]
            waiting += mine
            self.waiting_code[digest] = [t for t in ids if t not in mine]
        for task_id in waiting:
            self._fail(task_id, error)

    def add_tasks(self, records: list[m.TaskRecord]) -> int:
        """Queue new tasks; ids already held are ignored (the manager resends after reconnect)."""
        added, record_type = 0, m.TaskRecord
        for rec in records:
            if type(rec) is not record_type:  # a list from a caller in this process
                rec = m.as_task_record(rec)
            task_id = rec[m.T_ID]
            if task_id in self.tasks:
                continue
            t = self.tasks[task_id] = TaskState(rec)
            self.held_by_pool[t.pool] = self.held_by_pool.get(t.pool, 0) + 1
            origin = rec[m.T_ORIGIN]
            if origin is not None:  # kept for the fair queue: the policy check clears the field
                t.user = origin.get("user")
            if self.policy is not None:
                refused = self.policy.refusal(origin, rec[m.T_FUNCTION])
                if refused is not None:
                    self.counters["refused"] += 1
                    self._fail(task_id, self.policy.error(refused))
                    continue
                # workers need no origin: not sent (nor decoded) on that hop
                rec = t.record = m.with_origin(rec, None)
            pool, why = self.choose_pool(rec[m.T_RESOURCES])
            if pool is None:
                self._fail(task_id, errors.infra_error("resources", why))
                continue
            if pool in self.refused_pools:
                self._fail(task_id, self.refused_pools[pool])
                continue
            if pool != t.pool:
                self.held_by_pool[t.pool] -= 1
                self.held_by_pool[pool] = self.held_by_pool.get(pool, 0) + 1
                t.pool = pool
            digest = rec[m.T_FUNCTION]
            if self.image_errors and self._image_failed(task_id):
                continue
            if digest in self.code:
                self._enqueue(pool, task_id)
            else:
                self._wait_for_code(task_id)
            added += 1
        self.counters["received"] += added
        return added

    def add_code(self, blobs: dict[str, bytes]) -> None:
        for digest, blob in blobs.items():
            if digest not in self.code:
                self.code[digest] = blob
                self.code_bytes += len(blob)
            for task_id in self.waiting_code.pop(digest, ()):
                t = self.tasks.get(task_id)
                if t is not None:
                    if self.image_errors and self._image_failed(task_id):
                        continue
                    self._enqueue(t.pool, task_id)
        while self.code_bytes > CODE_CACHE_BYTES and len(self.code) > 1:
            digest, blob = self.code.popitem(last=False)
            self.code_bytes -= len(blob)

    def image_unavailable(self, package: str, reason: str) -> None:
        """A servable's container cannot be provided here: its tasks waiting for the package fail
        now, later ones at arrival (bare tasks and other servables are not looked at)."""
        self.image_errors[package] = errors.infra_error("image", reason)
        for function in (m.RUN_PREFIX + package, m.VERIFY_PREFIX + package):
            for task_id in self.waiting_code.pop(function, ()):
                if task_id in self.tasks:
                    self._fail(task_id, self.image_errors[package])

    def servable_image(self, package: str, image: str, fetching: bool = False) -> None:
        """A servable package runs inside ``image``: its calls queue for workers in that image
        (started once the image is fetched, when it is being fetched)."""
        self.package_images[package] = image
        for prefix in (m.RUN_PREFIX, m.VERIFY_PREFIX):
            self.function_images[prefix + package] = image
        if fetching:
            self.images_fetching.add(image)

    def image_fetched(self, image: str, error: str | None) -> None:
        """The fetch of ``image`` ended: workers may start in it now, or every servable that runs
        in it fails with ``error`` (its waiting calls now, later ones at arrival)."""
        self.images_fetching.discard(image)
        if error is None:
            return
        for package in [p for p, i in self.package_images.items() if i == image]:
            self.image_unavailable(package, error)
            del self.package_images[package]
            for prefix in (m.RUN_PREFIX, m.VERIFY_PREFIX):
                self.function_images.pop(prefix + package, None)
        for (_, queued_image), queue in self.image_queues.items():
            if queued_image == image:
                for task_id in queue:
                    if task_id in self.tasks:
                        self._fail(task_id, errors.infra_error("image", error))
                queue.clear()

    def _image_failed(self, task_id: bytes) -> bool:
        package = m.package_key(self.tasks[task_id].record[m.T_FUNCTION])
        error = self.image_errors.get(package) if package is not None else None
        if error is not None:
            self._fail(task_id, error)
        return error is not None

    def _wait_for_code(self, task_id: bytes) -> None:
        """Park a task until its function's code is here: a new task of unseen code, or one whose
        code was evicted from the cache before it reached a worker (it keeps its pool). The code
        is asked of the manager once per digest."""
        t = self.tasks[task_id]
        t.worker = None
        digest = t.record[m.T_FUNCTION]
        waiting = self.waiting_code.get(digest)
        if waiting is None:
            self.waiting_code[digest] = [task_id]
            self.code_requests.append(digest)
        else:
            waiting.append(task_id)

    def take_code_requests(self) -> list[str]:
        """The digests to ask the manager for now, remembered as one pending request: its reply
        says nothing about digests asked later (issue 11: they were failed as unknown)."""
        asked, self.code_requests = self.code_requests, []
        if asked:
            self.code_asked.append(frozenset(asked))
        return asked

    def code_reply(self, blobs: dict[str, bytes]) -> None:
        """The manager's answer to one code request: the blobs it sent are kept; the digests that
        request asked for and the answer lacks are unknown there, and their tasks fail. The
        answer belongs to the oldest pending request that asked for everything in it."""
        self.add_code(blobs)
        request = next((r for r in self.code_asked if r.issuperset(blobs)), None)
        if request is None:  # asked before the link was reset (see code_link_reset)
            return
        self.code_asked.remove(request)
        self.code_missing([d for d in request if d not in blobs])

    def code_link_reset(self) -> None:
        """The manager link started a new session: requests not answered by now are lost with
        the old one (the manager answers in order), so everything still waiting is asked again."""
        self.code_asked.clear()
        self.code_requests = list(dict.fromkeys([*self.code_requests, *self.waiting_code]))

    def choose_pool(self, resources: dict[str, Any] | None) -> tuple[str | None, str]:
        """``(pool, "")`` for a resource request: the named pool, else the first (default first)
        whose workers offer it; ``(None, why)`` when no pool here can ever run it."""
        if not resources:
            return next(iter(self.pool_offers)), ""
        wanted = resources.get("pool")
        if wanted and wanted not in self.pool_offers:
            return None, f"no pool named {wanted!r} at this endpoint (pools: {', '.join(self.pool_offers)})"
        for name in [wanted] if wanted else list(self.pool_offers):
            offers = self.pool_offers[name]
            if all(
                _fits(resources.get(k), offers.get(k), k == "gpus") for k in ("cores", "memory_gb", "gpus")
            ):
                return name, ""
        shapes = "; ".join(f"{n}: {o}" for n, o in self.pool_offers.items())
        return None, f"no pool offers {resources} per worker (pools: {shapes})"

    def code_missing(self, digests: list[str]) -> None:
        """The manager does not have this code: fail the tasks that need it."""
        for digest in digests:
            for task_id in self.waiting_code.pop(digest, ()):
                self._fail(
                    task_id,
                    errors.infra_error("serialization", f"function code {digest} is unknown"),
                )

    # ---- workers and pools ----------------------------------------------------------------

    def add_pool(self, identity: bytes, pool_id: str, block_id: str, info: dict) -> None:
        pool = self.pools.get(pool_id)
        if pool is None:
            self.pools[pool_id] = PoolState(pool_id, identity, block_id, self.clock(), info=info)
        else:
            pool.identity, pool.last_seen, pool.info = identity, self.clock(), info

    def drain_pool_in(self, pool_id: str, seconds: float) -> None:
        """Give the pool no new work after ``seconds`` (its block's walltime is ending)."""
        pool = self.pools.get(pool_id)
        if pool is not None:
            pool.drain_at = self.clock() + seconds

    def _accepting(self, w: WorkerState, now: float) -> bool:
        if self.paused:
            return False
        pool = self.pools.get(w.pool_id)
        return pool is None or pool.drain_at is None or now < pool.drain_at

    def pool_heartbeat(self, pool_id: str, info: dict | None = None) -> bool:
        pool = self.pools.get(pool_id)
        if pool is None:
            return False
        pool.last_seen = self.clock()
        problem = m.check_pool_info(info) if info else None
        if problem:  # never let it into the snapshot the manager and `dlhub status` read
            log.warning("pool %s sent malformed heartbeat info, ignored: %s", pool_id, problem)
        elif info:
            pool.info.update(info)
        return True

    def add_worker(
        self,
        identity: bytes,
        worker_id: str,
        pool_id: str,
        pool_name: str = "default",
        image: str | None = None,
    ) -> None:
        w = WorkerState(identity, worker_id, pool_id, pool_name=pool_name, image=image)
        starting = self.image_starting.get((pool_name, image))
        if starting:  # the worker asked for (the oldest request) has come
            starting.pop(0)
        self.workers[identity] = w
        self.worker_by_id[worker_id] = identity
        pool = self.pools.get(pool_id)
        if pool is not None:
            pool.workers.add(worker_id)

    def worker_died(self, worker_id: str, reason: str) -> None:
        """The running task fails with WorkerLost; prefetched tasks go back to the queue."""
        identity = self.worker_by_id.pop(worker_id, None)
        w = self.workers.pop(identity, None) if identity is not None else None
        if w is None:
            return
        pool = self.pools.get(w.pool_id)
        if pool is not None:
            pool.workers.discard(worker_id)
        if w.running_batch:  # one call ran them all: they all died with it
            error = (
                errors.infra_error("task-timeout", w.killing)
                if w.killing
                else errors.infra_error("worker-lost", f"worker {worker_id} died running the batch: {reason}")
            )
            for task_id in [t for t in w.assigned if t in w.running_batch]:
                w.assigned.remove(task_id)
                self.counters["worker_lost"] += 1
                self._fail(task_id, error)
        elif w.assigned:
            running = w.assigned.popleft()
            if w.killing:
                error = errors.infra_error("task-timeout", w.killing)
            else:
                self.counters["worker_lost"] += 1
                error = errors.infra_error(
                    "worker-lost", f"worker {worker_id} died running the task: {reason}"
                )
            self._fail(running, error)
        self._requeue(list(w.assigned), count_retry=False, reason=reason)

    def check_timeouts(self, grace_s: float = 1.0) -> None:
        """Ask pools to kill workers whose running task overran its limit and ignored SIGALRM."""
        now = self.clock()
        for w in self.workers.values():
            if w.killing or not w.assigned or w.head_since is None:
                continue
            t = self.tasks.get(w.assigned[0])
            limit = t.record[m.T_TIMEOUT] if t is not None else None
            if limit and now - w.head_since > limit + grace_s:
                w.killing = (
                    f"task exceeded its time limit of {limit} s and did not respond to the "
                    "interrupt; its worker was killed"
                )
                self.kill_requests.append((w.pool_id, w.worker_id, w.killing))

    def pool_lost(self, pool_id: str, reason: str) -> None:
        """A whole block went away: every task it held is retried, or lost after max_retries."""
        pool = self.pools.pop(pool_id, None)
        if pool is None:
            return
        for worker_id in list(pool.workers):
            identity = self.worker_by_id.pop(worker_id, None)
            w = self.workers.pop(identity, None) if identity is not None else None
            if w is not None:
                self._requeue(list(w.assigned), count_retry=True, reason=reason)

    def check_pools(self) -> list[str]:
        """Pools whose heartbeats stopped; they are dropped and their tasks re-queued."""
        now = self.clock()
        dead = [p.pool_id for p in self.pools.values() if now - p.last_seen > self.heartbeat_threshold_s]
        for pool_id in dead:
            self.pool_lost(
                pool_id, f"pool {pool_id} missed heartbeats for {self.heartbeat_threshold_s:.0f} s"
            )
        return dead

    def _requeue(self, task_ids: list[bytes], count_retry: bool, reason: str) -> None:
        """Put tasks taken back from workers at the front of the queues, in order (batched
        calls at the front of their batch queue)."""
        batched: list[tuple[str, bytes]] = []
        regular: dict[str, list[tuple[bytes, str | None]]] = {}
        for task_id in task_ids:
            t = self.tasks.get(task_id)
            if t is None:
                continue
            t.worker = None
            if count_retry:
                t.retries += 1
                if t.retries > self.max_retries:
                    self._finish(
                        m.result_record(
                            task_id,
                            "lost",
                            error=errors.infra_error("lost", f"{reason} (after {self.max_retries} retries)"),
                        )
                    )
                    continue
            self.counters["requeued"] += 1
            if self.package_images and self._image_of(t) is not None:
                batched.append((t.pool, task_id))  # _enqueue puts it in its image's queue
            elif t.record[m.T_FUNCTION] in self.batching:
                batched.append((t.pool, task_id))
            else:
                regular.setdefault(t.pool, []).append((task_id, t.user))
        for pool, task_id in reversed(batched):
            self._enqueue(pool, task_id, front=True)
        for pool, items in regular.items():
            self.queues[pool].push_front(items)

    # ---- batching (the policy object's state, and the parts that touch workers) ----------------

    # kept under their old names for the unit tests and status (thin views of the policy object)
    batching = property(lambda self: self.batcher.policies)
    batch_queues = property(lambda self: self.batcher.queues)
    labels = property(lambda self: self.batcher.labels)
    servable_stats = property(lambda self: self.batcher.servable_stats)

    def set_batching(self, function: str, policy: dict[str, Any] | None, label: str = "") -> None:
        self.batcher.set_policy(function, policy, label)

    def next_batch_deadline(self) -> float | None:
        return self.batcher.next_deadline(self.clock())

    def batching_snapshot(self) -> dict[str, Any]:
        return self.batcher.snapshot(self.tasks)

    def worker_info(self, identity: bytes, info: dict[str, Any]) -> None:
        """What a worker reports beside results: which servables it holds warm now, and loads,
        evictions and output-cache counts per servable function."""
        w = self.workers.get(identity)
        if w is not None and isinstance(info.get("warm"), list):
            w.warm = {f for f in info["warm"] if isinstance(f, str)}
        self.batcher.count_reported(info.get("servables"))
        self.uncacheable |= m.uncacheable_ids(info)  # passed on to the manager with their results

    def _image_of(self, t: TaskState) -> str | None:
        return self.function_images.get(t.record[m.T_FUNCTION])

    def _enqueue(self, pool: str, task_id: bytes, front: bool = False) -> None:
        t = self.tasks[task_id]
        function = t.record[m.T_FUNCTION]
        if self.package_images:
            image = self.function_images.get(function)
            if image is not None:  # runs only on workers inside its image
                if pool in self.bare_pools:  # its workers cannot start in an image
                    why = f"pool {pool!r} runs no container runtime: it cannot run image {image}"
                    self._fail(task_id, errors.infra_error("image", why))
                    return
                queue = self.image_queues.setdefault((pool, image), deque())
                if front:
                    queue.appendleft(task_id)
                else:
                    queue.append(task_id)
                return
        if function in self.batcher.policies:
            self.batcher.add(pool, function, task_id, m.task_options(t.record), self.clock(), front, t.user)
            return
        queue = self.queues[pool]
        fifo = queue.by_user.get(t.user)
        if fifo is None or front:
            queue.push(task_id, t.user, front)
        else:  # FairQueue.push, inlined for the common case (the hot path)
            fifo.append(task_id)

    def _dispatch_batches(self, now: float) -> None:
        for (pool_name, function), queue in list(self.batcher.queues.items()):
            while (limit := self.batcher.due(function, queue, now, self.tasks)) is not None:
                worker = self._idle_worker(pool_name, function, now)
                if worker is None:
                    break  # every worker busy: the batch keeps filling
                self._send_batch(worker, function, queue, limit, now)

    def _idle_worker(self, pool_name: str, function: str, now: float) -> WorkerState | None:
        idle = [
            w
            for w in self.workers.values()
            if w.pool_name == pool_name
            and not w.assigned
            and w.image is None
            and not w.swapping
            and self._accepting(w, now)
        ]
        if not idle:
            return None
        return next((w for w in idle if function in w.warm), idle[0])

    def _send_batch(self, w: WorkerState, function: str, queue: deque, limit: int, now: float) -> None:
        ids, weight = self.batcher.take(queue, limit, self.tasks, now)
        if not ids:
            return
        code = {}
        if function not in w.known_code:
            blob = self.code.get(function)
            if blob is None:  # evicted from the code cache: fetch it again
                for task_id in ids:
                    self._wait_for_code(task_id)
                return
            code[function] = blob
            w.known_code.add(function)
        records = []
        for task_id in ids:
            t = self.tasks[task_id]
            t.worker = w.identity
            records.append(t.record)
        w.warm.add(function)
        w.head_since = now
        w.assigned.extend(ids)
        w.running_batch = set(ids)
        self.batcher.sent(function, weight)
        self.to_workers.append((w.identity, m.Tasks(records, code, [ids])))

    # ---- dispatch ----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand each pool's queued tasks (round-robin between users, FIFO for each) to the
        least-loaded of its workers whose depth the task allows. Idle workers get work before any
        worker prefetches; one message per worker."""
        if not self.workers:
            return
        now = self.clock()
        if self.batch_queues:
            self._dispatch_batches(now)
        for pool_name, queue in self.queues.items():
            if queue:
                self._dispatch_pool(pool_name, queue, now)
        if self.package_images:
            self._dispatch_images(now)
            self._start_image_workers(now)

    def _dispatch_pool(self, pool_name: str, queue: FairQueue, now: float) -> None:
        load = [
            (len(w.assigned), i, w)
            for i, w in enumerate(self.workers.values())
            if w.pool_name == pool_name and w.image is None and not w.swapping and self._accepting(w, now)
        ]
        if load and self.package_images:
            self.image_used[(pool_name, None)] = now
        heapq.heapify(load)
        bump = 0
        batches: dict[bytes, tuple[list, dict]] = {}
        ring, by_user = queue.ring, queue.by_user  # FairQueue.peek/pop, inlined (the hot path)
        while ring and load:
            user = ring[0]
            fifo = by_user[user]
            task_id = fifo[0]
            t = self.tasks.get(task_id)
            if t is None:  # cancelled while queued: dropped, costing its user no turn
                fifo.popleft()
                if not fifo:
                    ring.popleft()
                    del by_user[user]
                continue
            digest = t.record[m.T_FUNCTION]
            depth, i, w = load[0]
            if depth > self.prefetch(digest):
                break  # even the least-loaded worker is full for this task
            if digest not in w.warm and m.package_key(digest) is not None:
                warm = next((e for e in load if e[0] == depth and digest in e[2].warm), None)
                if warm is not None:  # as idle, and the servable is loaded there already:
                    bump -= 1  # a unique tie-break below every index puts it on top
                    load[load.index(warm)] = (depth, bump, warm[2])
                    heapq.heapify(load)
                    depth, i, w = load[0]
            fifo.popleft()  # dispatched: its user's turn ends
            if not fifo:
                ring.popleft()
                del by_user[user]
            elif len(ring) > 1:
                ring.rotate(-1)
            if not self._assign(w, t, task_id, digest, batches, now, m.package_key(digest) is not None):
                continue
            heapq.heapreplace(load, (depth + 1, i, w))
        for identity, (batch, code) in batches.items():
            if batch:  # empty when its only task went back to wait for evicted code
                self.to_workers.append((identity, m.Tasks(batch, code)))

    def _assign(self, w, t, task_id: bytes, digest: str, batches: dict, now: float, warms: bool) -> bool:
        """Put a task in worker ``w``'s next batch (with its code if the worker lacks it); False
        when its code was evicted and the task went back to wait for it. ``warms``: the worker
        keeps the servable loaded after the call."""
        batch, code = batches.setdefault(w.identity, ([], {}))
        if digest not in w.known_code:
            blob = self.code.get(digest)
            if blob is None:  # evicted from the code cache: fetch it again
                self._wait_for_code(task_id)
                return False
            code[digest] = blob
            w.known_code.add(digest)
        t.worker = w.identity
        if not w.assigned:
            w.head_since = now
        w.assigned.append(task_id)
        if warms:
            w.warm.add(digest)
        batch.append(t.record)
        return True

    def _dispatch_images(self, now: float) -> None:
        """Each image's queued calls to the least-loaded of its pool's workers inside it."""
        batches: dict[bytes, tuple[list, dict]] = {}
        for (pool_name, image), queue in self.image_queues.items():
            if not queue:
                continue
            workers = [
                w
                for w in self.workers.values()
                if w.pool_name == pool_name
                and w.image == image
                and not w.swapping
                and self._accepting(w, now)
            ]
            while queue and workers:
                task_id = queue[0]
                t = self.tasks.get(task_id)
                if t is None:  # cancelled while queued
                    queue.popleft()
                    continue
                digest = t.record[m.T_FUNCTION]
                w = min(workers, key=lambda w: (len(w.assigned), digest not in w.warm))
                if len(w.assigned) > self.prefetch(digest):
                    break
                queue.popleft()
                if not self._assign(w, t, task_id, digest, batches, now, True):
                    continue
                self.image_used[(pool_name, image)] = now
        for identity, (batch, code) in batches.items():
            if batch:
                self.to_workers.append((identity, m.Tasks(batch, code)))

    def _start_image_workers(self, now: float) -> None:
        """Images (the pools' own included) with calls waiting and no worker, nor one starting:
        replace an idle worker of the least recently used other image with one inside it."""
        for key, times in list(self.image_starting.items()):
            times[:] = [t for t in times if now - t < IMAGE_START_TIMEOUT_S]
            if not times:
                del self.image_starting[key]
        for queue in self.image_queues.values():
            while queue and queue[0] not in self.tasks:  # cancelled while waiting
                queue.popleft()
        wanted: list[tuple[str, str | None]] = [k for k, q in self.image_queues.items() if q]
        for name, q in self.queues.items():
            # bare calls waiting need a start only where no worker of the pool's own image is
            # left (the common case stops at the first worker: the bare hot path pays ~nothing)
            if q and not any(
                w.image is None and not w.swapping and w.pool_name == name for w in self.workers.values()
            ):
                wanted.append((name, None))
        if not wanted:
            return
        running = {(w.pool_name, w.image) for w in self.workers.values() if not w.swapping}
        for pool_name, image in wanted:
            if (pool_name, image) in running or self.image_starting.get((pool_name, image)):
                continue
            if image in self.images_fetching:
                continue  # its calls wait for the pull
            busy_images = {i for (p, i), q in self.image_queues.items() if q and p == pool_name}
            if self.queues[pool_name]:
                busy_images.add(None)
            idle = [
                w
                for w in self.workers.values()
                if w.pool_name == pool_name
                and not w.assigned
                and not w.swapping
                and w.image != image
                and w.image not in busy_images
                and self._accepting(w, now)
            ]
            if not idle:
                continue  # every worker busy, or its image has calls waiting: asked again later
            victim = min(idle, key=lambda w: self.image_used.get((pool_name, w.image), -math.inf))
            pool = self.pools.get(victim.pool_id)
            if pool is None:
                continue
            victim.swapping = True
            self.counters["image_starts"] += 1
            self.image_starting.setdefault((pool_name, image), []).append(now)
            self.to_workers.append((pool.identity, m.StartWorker(victim.worker_id, image)))

    def prefetch(self, digest: str) -> int:
        """How many tasks of this function may wait behind a worker's running task."""
        avg = self.avg_task_s.get(digest)
        if avg is None:
            return self.min_prefetch
        if avg > self.no_prefetch_above_s:
            return 0
        return min(self.max_prefetch, max(1, math.ceil(self.prefetch_target_s / max(avg, 1e-6))))

    def worker_results(self, identity: bytes, results: list[list]) -> None:
        w = self.workers.get(identity)
        for res in results:
            task_id = res[m.R_ID]
            if w is not None:
                head = w.assigned[0] if w.assigned else None
                try:
                    w.assigned.remove(task_id)
                except ValueError:
                    pass
                w.running_batch.discard(task_id)
                if w.assigned and w.assigned[0] != head:
                    w.head_since = self.clock()
            t = self.tasks.get(task_id)
            timing = res[m.R_TIMING]
            if t is not None and timing and timing[0] is not None and timing[1] is not None:
                self._learn(t.record[m.T_FUNCTION], max(timing[1] - timing[0], 1e-6))
            self._finish(res)

    def _learn(self, digest: str, seconds: float) -> None:
        """Update the function's mean run time (an EWMA), which sets its prefetch depth."""
        avg = self.avg_task_s.get(digest)
        self.avg_task_s[digest] = seconds if avg is None else 0.8 * avg + 0.2 * seconds

    def running_updates(self) -> None:
        """Report each worker's head task as running (once), for users watching states."""
        now = self.wall_clock()
        for w in self.workers.values():
            head = w.assigned[0] if w.assigned else None
            if head is not None and head != w.reported_running:
                w.reported_running = head
                self.states.append([head, "running", now])

    # ---- cancel ------------------------------------------------------------------------------

    def cancel(self, task_ids: list[bytes]) -> list[bytes]:
        """Cancel tasks not yet started; return those that are running or unknown here."""
        refused: list[bytes] = []
        forward: dict[bytes, list[bytes]] = {}
        for task_id in task_ids:
            t = self.tasks.get(task_id)
            if t is None:
                refused.append(task_id)
            elif t.worker is None:
                self._finish(
                    m.result_record(
                        task_id,
                        "cancelled",
                        error=errors.infra_error("cancelled", "task was cancelled before it started"),
                    )
                )
            else:
                w = self.workers.get(t.worker)
                if w is not None and w.assigned and w.assigned[0] == task_id:
                    refused.append(task_id)
                else:  # prefetched at a worker: it drops the task unless it already started
                    forward.setdefault(t.worker, []).append(task_id)
        for identity, ids in forward.items():
            self.to_workers.append((identity, m.Cancel(ids)))
        return refused

    # ---- bookkeeping -------------------------------------------------------------------------

    def _fail(self, task_id: bytes, error: list) -> None:
        self._finish(m.result_record(task_id, "failed", error=error))

    def _finish(self, res: list) -> None:
        t = self.tasks.pop(res[m.R_ID], None)
        if t is None:
            return  # duplicate (e.g. a late result after a requeue already finished it)
        self.held_by_pool[t.pool] -= 1
        self.counters["completed"] += 1
        if res[m.R_STATE] != "succeeded" and res[m.R_STATE] != "cancelled":
            self.counters["failed"] += 1
            if self.failures is not None:
                self.failures.append((res[m.R_ID], t.record[m.T_FUNCTION], t.worker, res[m.R_ERROR]))
        self.results.append(res)

    def outstanding(self, pool_name: str | None = None) -> int:
        """Tasks held here (waiting or running), for one pool or all: what scaling looks at."""
        if pool_name is None:
            return len(self.tasks)
        return self.held_by_pool.get(pool_name, 0)

    def idle_pools(self) -> list[str]:
        """Pools none of whose workers hold a task (safe to scale in)."""
        busy = {w.pool_id for w in list(self.workers.values()) if w.assigned}
        return [p for p in list(self.pools) if p not in busy]

    def snapshot(self) -> dict[str, Any]:
        return {
            "batching": self.batching_snapshot(),
            "servables": {label: dict(stats) for label, stats in self.servable_stats.items()},
            "queued": sum(len(q) for q in self.queues.values())
            + sum(len(q) for q in self.batch_queues.values()),
            "queued_by_pool": {name: len(q) for name, q in self.queues.items()},
            "outstanding": len(self.tasks),
            "workers": len(self.workers),
            **(
                {
                    "image_workers": {
                        image: sum(1 for w in self.workers.values() if w.image == image)
                        for image in sorted({w.image for w in self.workers.values() if w.image})
                    },
                    "image_queued": {
                        i: n
                        for (_, i), q in self.image_queues.items()
                        if (n := sum(1 for t in q if t in self.tasks))
                    },
                }
                if self.package_images
                else {}
            ),
            "pools": {
                p.pool_id: {
                    **p.info,
                    "block_id": p.block_id,
                    "workers": len(p.workers),
                    "draining": p.drain_at is not None and self.clock() >= p.drain_at,
                }
                for p in self.pools.values()
            },
            "busy_workers": sum(1 for w in self.workers.values() if w.assigned),
            **self.counters,
        }


def _fits(wanted: Any, offered: Any, counted: bool) -> bool:
    """Does one worker offer what a task asks? Undeclared cores/memory fit any request; GPUs are
    counted (a worker without accelerators offers 0)."""
    if wanted is None:
        return True
    if offered is None:
        return not counted
    return wanted <= offered


_HANDLERS: dict[type, Callable[[Scheduler, Any, list], None]] = {
    ev.TasksArrived: lambda s, e, out: s.add_tasks(e.records),
    ev.CodeArrived: lambda s, e, out: s.code_reply(e.blobs),
    ev.CodeFound: lambda s, e, out: s.add_code(e.blobs),
    ev.ManagerSession: lambda s, e, out: s.code_link_reset(),
    ev.ServableLearned: lambda s, e, out: s.set_batching(e.function, e.policy, e.label),
    ev.ImageUnavailable: lambda s, e, out: s.image_unavailable(e.package, e.reason),
    ev.ServableImage: lambda s, e, out: s.servable_image(e.package, e.image, e.fetching),
    ev.ImageFetched: lambda s, e, out: s.image_fetched(e.image, e.error),
    ev.ImageFailed: lambda s, e, out: s.image_fetched(e.image, e.reason),
    ev.PoolJoined: Scheduler._on_pool_joined,
    ev.WorkerJoined: lambda s, e, out: s.add_worker(e.identity, e.worker_id, e.pool_id, e.pool_name, e.image),
    ev.WorkerResults: Scheduler._on_results,
    ev.WorkerDied: lambda s, e, out: s.worker_died(e.worker_id, e.reason),
    ev.PoolHeartbeat: Scheduler._on_heartbeat,
    ev.PoolLost: lambda s, e, out: s.pool_lost(e.pool_id, e.reason),
    ev.PoolRefused: lambda s, e, out: s.refuse_pool(e.pool_name, e.error),
    ev.CancelRequested: Scheduler._on_cancel,
    ev.PolicyChanged: lambda s, e, out: setattr(s, "policy", e.policy),
    ev.Paused: lambda s, e, out: setattr(s, "paused", True),
    ev.Tick: Scheduler._on_tick,
    ev.Idle: Scheduler._on_idle,
}
