"""Sans-IO task scheduling at the endpoint: queue, workers, prefetch credits, failures.

    loop --events (endpoint/events.py)--> handle(*events) --> [apply each; dispatch once]
    loop <--instructions: SendToWorker, SendResults, SendStates, RequestCode, KillWorker, ...

Events: tasks from the manager, code replies, workers and pools joining, results, worker deaths,
pool heartbeats, ticks; each carries the loop's clock reading (``now``), so nothing here reads a
clock or does I/O, and a logged run replays (:mod:`.replay`). Each event's handler is one of the
methods below (the table is :data:`.sched_events.HANDLERS`), which are also the direct API the
unit tests drive; they leave their outputs in the outbox lists (``to_workers``, ``results``,
``states``, ``code_requests``, ``kill_requests``) that :meth:`Scheduler.take_instructions`
empties. The Scheduler keeps the tasks and decides; its parts, each in its own module:

    sched_events    the event -> method table; the outboxes turned into instructions
    sched_state     the task, worker and pool records; which pool a resource request goes to
    roster          the pools and workers connected: joins, heartbeats, drains, departures
    code_wait       the code cache, the tasks waiting for their code, code requests pending
    prefetch        how many tasks of a function may wait behind a worker's running one
    fairqueue       a pool's queue: a FIFO per user, served round-robin
    batching        vectorized servables' batches: when one is due
    image_dispatch  servables' images: their calls' queues, workers swapped into an image

Dispatch: each worker holds a FIFO of tasks, the head running; how many tasks of a function may
wait behind the head adapts to its measured run time (:mod:`.prefetch`).

Fair share: each pool's queue (:class:`~.fairqueue.FairQueue`) holds a FIFO per submitting user (the
``user`` of the task's origin) and dispatch serves them round-robin, one task a turn, so a user
with 100,000 tasks waiting delays another's single call by at most one task a worker, plus what
is already prefetched at the workers (bounded by ``prefetch_target_ms`` of work each).

Failures: a dead worker fails its running task with ``WorkerLost`` and re-queues the prefetched
ones; a dead pool (missed heartbeats) re-queues all its tasks, counting a retry against each,
and after ``max_retries`` reports them ``lost`` with the reason.

Batching of vectorized servables (their own queues, idle workers only): the policy object in
:mod:`.batching` decides when a batch is due; the Scheduler picks the worker and sends it.

Images per servable: a servable's calls run only on workers inside its image, started on demand
in place of an idle worker of the least recently used image (:mod:`.image_dispatch`).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from dlhub.protocol import errors
from dlhub.protocol import messages as m

from . import events as ev
from .batching import Batching
from .code_wait import CodeWait
from .events import EventLog
from .fairqueue import FairQueue
from .image_dispatch import ImageDispatch
from .prefetch import Prefetch
from .roster import Roster
from .sched_events import HANDLERS, take_instructions
from .sched_state import TaskState, WorkerState, choose_pool


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
        self.prefetcher = Prefetch(prefetch_target_ms, min_prefetch, max_prefetch, no_prefetch_above_ms)
        self.heartbeat_threshold_s = heartbeat_threshold_s
        self.max_retries = max_retries
        # what one worker of each named pool offers, the default pool first
        self.pool_offers = pool_offers or {"default": {"cores": None, "memory_gb": None, "gpus": 0}}
        self.queues: dict[str, FairQueue] = {name: FairQueue() for name in self.pool_offers}
        self.queue = self.queues[next(iter(self.queues))]  # the default pool's queue
        self.tasks: dict[bytes, TaskState] = {}
        self.held_by_pool: dict[str, int] = {}  # tasks held per pool (kept as they come and go)
        roster = self.roster = Roster()  # the pools and workers connected: its dicts, never rebound
        self.workers, self.worker_by_id, self.pools = roster.workers, roster.worker_by_id, roster.pools
        self.code_wait = CodeWait()  # the code cache, tasks waiting for code, requests for it
        self.images = ImageDispatch()  # images per servable: their queues, workers swapped in
        # outputs
        self.to_workers: list[tuple[bytes, m.Message]] = []
        self.results: list[list] = []
        self.uncacheable: set[bytes] = set()  # results naming an output stored for their caller
        self.states: list[list] = []
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

    # the helpers' state under the names the daemon and unit tests use
    avg_task_s = property(lambda self: self.prefetcher.avg_task_s)  # function digest -> its run time
    code = property(lambda self: self.code_wait.code)
    waiting_code = property(lambda self: self.code_wait.waiting)
    code_asked = property(lambda self: self.code_wait.asked)
    code_requests = property(lambda self: self.code_wait.requests)  # the outbox of digests to ask for

    @property
    def bare_pools(self) -> set[str]:  # pools without a container runtime (set by the daemon)
        return self.images.bare_pools

    @bare_pools.setter
    def bare_pools(self, pools: set[str]) -> None:
        self.images.bare_pools = pools

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
        # what each event does is one of the methods below (also the direct API of unit tests,
        # mapped in sched_events.HANDLERS); their outputs accumulate in the outbox lists until
        # take_instructions empties them
        for event in events:
            self.now = event.now
            HANDLERS[type(event)](self, event, self._out)

    def take_instructions(self) -> list[ev.Instruction]:
        """Empty the outbox into instructions (:func:`.sched_events.take_instructions`)."""
        return take_instructions(self)

    # ---- tasks and code from the manager ----------------------------------------------------

    def refuse_pool(self, pool_name: str, error: list) -> None:
        """A pool cannot start workers (its blocks keep failing): fail its waiting tasks, and the
        ones that come for it, with ``error`` instead of letting them wait forever."""
        self.refused_pools[pool_name] = error
        queue = self.queues[pool_name]
        waiting = [t for t in queue if t in self.tasks]
        queue.clear()
        waiting += self.images.take_pool(pool_name, self.tasks)
        parked = self.code_wait.waiting
        for digest, ids in list(parked.items()):
            mine = [t for t in ids if t in self.tasks and self.tasks[t].pool == pool_name]
            waiting += mine
            parked[digest] = [t for t in ids if t not in mine]
        for task_id in waiting:
            self._fail(task_id, error)

    def add_tasks(self, records: list[m.TaskRecord]) -> int:
        """Queue new tasks; ids already held are ignored (the manager resends after reconnect)."""
        added, record_type, code, images = 0, m.TaskRecord, self.code_wait.code, self.images
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
            if images.errors and self._image_failed(task_id):
                continue
            if digest in code:
                self._enqueue(pool, task_id)
            else:
                self._wait_for_code(task_id)
            added += 1
        self.counters["received"] += added
        return added

    def add_code(self, blobs: dict[str, bytes]) -> None:
        """Code came (a reply, or found locally): the tasks that waited for it are queued."""
        for task_id in self.code_wait.add(blobs):
            t = self.tasks.get(task_id)
            if t is not None:
                if self.images.errors and self._image_failed(task_id):
                    continue
                self._enqueue(t.pool, task_id)

    def image_unavailable(self, package: str, reason: str) -> None:
        """A servable's container cannot be provided here: its tasks waiting for the package fail
        now, later ones at arrival (bare tasks and other servables are not looked at)."""
        error = self.images.unavailable(package, reason)
        for function in (m.RUN_PREFIX + package, m.VERIFY_PREFIX + package):
            for task_id in self.code_wait.waiting.pop(function, ()):
                if task_id in self.tasks:
                    self._fail(task_id, error)

    def image_fetched(self, image: str, error: str | None) -> None:
        """The fetch of ``image`` ended: workers may start in it now, or every servable that runs
        in it fails with ``error`` (its waiting calls now, later ones at arrival)."""
        packages, queued = self.images.fetched(image, error)
        for package in packages:
            self.image_unavailable(package, error)
        for task_id in queued:
            if task_id in self.tasks:
                self._fail(task_id, errors.infra_error("image", error))

    def _image_failed(self, task_id: bytes) -> bool:
        error = self.images.error_for(self.tasks[task_id].record[m.T_FUNCTION])
        if error is not None:
            self._fail(task_id, error)
        return error is not None

    def _wait_for_code(self, task_id: bytes) -> None:
        """Park a task until its function's code is here: a new task of unseen code, or one whose
        code was evicted from the cache before it reached a worker (it keeps its pool)."""
        t = self.tasks[task_id]
        t.worker = None
        self.code_wait.park(task_id, t.record[m.T_FUNCTION])

    def take_code_requests(self) -> list[str]:
        return self.code_wait.take_requests()

    def code_reply(self, blobs: dict[str, bytes]) -> None:
        """The manager's answer to one code request: the blobs it sent are kept; the digests that
        request asked for and the answer lacks are unknown there, and their tasks fail."""
        self.add_code(blobs)
        self.code_missing(self.code_wait.answered(blobs))

    def code_link_reset(self) -> None:
        self.code_wait.link_reset()

    def choose_pool(self, resources: dict[str, Any] | None) -> tuple[str | None, str]:
        return choose_pool(self.pool_offers, resources)

    def code_missing(self, digests: list[str]) -> None:
        """The manager does not have this code: fail the tasks that need it."""
        for digest in digests:
            for task_id in self.code_wait.waiting.pop(digest, ()):
                self._fail(
                    task_id,
                    errors.infra_error("serialization", f"function code {digest} is unknown"),
                )

    # ---- workers and pools ----------------------------------------------------------------

    def add_pool(self, identity: bytes, pool_id: str, block_id: str, info: dict) -> None:
        self.roster.add_pool(identity, pool_id, block_id, info, self.clock())

    def drain_pool_in(self, pool_id: str, seconds: float) -> None:
        """Give the pool no new work after ``seconds`` (its block's walltime is ending)."""
        self.roster.drain_pool_in(pool_id, seconds, self.clock())

    def _accepting(self, w: WorkerState, now: float) -> bool:
        if self.paused:
            return False
        pool = self.pools.get(w.pool_id)
        return pool is None or pool.drain_at is None or now < pool.drain_at

    def pool_heartbeat(self, pool_id: str, info: dict | None = None) -> bool:
        return self.roster.heartbeat(pool_id, info, self.clock())

    def add_worker(
        self,
        identity: bytes,
        worker_id: str,
        pool_id: str,
        pool_name: str = "default",
        image: str | None = None,
    ) -> None:
        self.images.worker_joined(pool_name, image)
        self.roster.add_worker(identity, worker_id, pool_id, pool_name, image)

    def worker_died(self, worker_id: str, reason: str) -> None:
        """The running task fails with WorkerLost; prefetched tasks go back to the queue."""
        w = self.roster.remove_worker(worker_id)
        if w is None:
            return
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
        self.kill_requests.extend(self.roster.overrunning(self.tasks, self.clock(), grace_s))

    def pool_lost(self, pool_id: str, reason: str) -> None:
        """A whole block went away: every task it held is retried, or lost after max_retries."""
        for w in self.roster.remove_pool(pool_id):
            self._requeue(list(w.assigned), count_retry=True, reason=reason)

    def check_pools(self) -> list[str]:
        """Pools whose heartbeats stopped; they are dropped and their tasks re-queued."""
        dead = self.roster.silent_pools(self.clock(), self.heartbeat_threshold_s)
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
            if self.images.package_images and self.images.image_of(t.record[m.T_FUNCTION]) is not None:
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

    def _enqueue(self, pool: str, task_id: bytes, front: bool = False) -> None:
        t = self.tasks[task_id]
        function = t.record[m.T_FUNCTION]
        if self.images.package_images:
            image = self.images.function_images.get(function)
            if image is not None:  # runs only on workers inside its image
                why = self.images.enqueue(pool, image, task_id, front)
                if why is not None:
                    self._fail(task_id, errors.infra_error("image", why))
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
        if self.images.package_images:  # each image's calls, then workers started in images
            images, workers, accepting = self.images, self.workers.values(), self._accepting
            self._send(
                images.dispatch(now, workers, self.tasks, accepting, self.prefetcher.depth, self._assign)
            )
            starts = images.start_workers(now, workers, self.tasks, self.queues, self.pools, accepting)
            self.counters["image_starts"] += len(starts)
            self.to_workers += starts

    def _dispatch_pool(self, pool_name: str, queue: FairQueue, now: float) -> None:
        load = [
            (len(w.assigned), i, w)
            for i, w in enumerate(self.workers.values())
            if w.pool_name == pool_name and w.image is None and not w.swapping and self._accepting(w, now)
        ]
        if load and self.images.package_images:
            self.images.used[(pool_name, None)] = now
        heapq.heapify(load)
        bump = 0
        batches: dict[bytes, tuple[list, dict]] = {}
        ring, by_user = queue.ring, queue.by_user  # FairQueue.peek/pop, inlined (the hot path)
        prefetch = self.prefetcher.depth
        while ring and load:
            user = ring[0]
            fifo = by_user[user]
            task_id = fifo[0]
            t = self.tasks.get(task_id)
            if t is None or t.worker is not None:
                # cancelled (or finished) while queued: dropped, costing its user no turn; or an
                # entry left behind by such a task whose id came again and was dispatched already
                fifo.popleft()
                if not fifo:
                    ring.popleft()
                    del by_user[user]
                continue
            digest = t.record[m.T_FUNCTION]
            depth, i, w = load[0]
            if depth > prefetch(digest):
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
        self._send(batches)

    def _send(self, batches: dict[bytes, tuple[list, dict]]) -> None:
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

    def prefetch(self, digest: str) -> int:
        """How many tasks of this function may wait behind a worker's running task."""
        return self.prefetcher.depth(digest)

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
                self.prefetcher.learn(t.record[m.T_FUNCTION], max(timing[1] - timing[0], 1e-6))
            self._finish(res)

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
        return self.roster.idle_pools()

    def snapshot(self) -> dict[str, Any]:
        return {
            "batching": self.batching_snapshot(),
            "servables": {label: dict(stats) for label, stats in self.servable_stats.items()},
            "queued": sum(len(q) for q in self.queues.values())
            + sum(len(q) for q in self.batch_queues.values()),
            "queued_by_pool": {name: len(q) for name, q in self.queues.items()},
            "outstanding": len(self.tasks),
            "workers": len(self.workers),
            **self.images.snapshot(self.workers.values(), self.tasks),
            "pools": self.roster.snapshot(self.clock()),
            "busy_workers": sum(1 for w in self.workers.values() if w.assigned),
            **self.counters,
        }
