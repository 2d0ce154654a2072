"""Batching of vectorized servables at the endpoint: the part of the Scheduler that groups
waiting calls of one version into one call (sans-IO, on the Scheduler's clock).

    set_batching(function, policy)  <- a ServableLearned event (the package's record + endpoint config)
    _enqueue: a call of a batched function waits in its (pool, function) queue with its arrival
              time and weight; everything else goes to the pool's regular queue
    _dispatch_batches: a batch leaves when its weight reaches max_batch_size or the delay since
              the first waiting call expired, and only to an idle worker (a warm one first)

Also the per-servable counts workers report (loads, evictions, output-cache hits) and the
batch-size histogram and queue delay for status and metrics.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from dlhub.protocol import messages as m

if TYPE_CHECKING:
    from .scheduler import WorkerState


class Batching:
    """Mixed into :class:`~dlhub.endpoint.scheduler.Scheduler`, whose state it shares."""

    def _init_batching(self) -> None:
        # function -> policy; (pool, function) -> waiting calls (task id, arrival, weight)
        self.batching: dict[str, dict[str, Any]] = {}
        self.batch_queues: dict[tuple[str, str], deque[tuple[bytes, float, int]]] = {}
        self.labels: dict[str, str] = {}  # servable function -> owner/name:version
        self.batch_histogram: dict[int, int] = {}  # batch size bucket (1, 2, 4, ...) -> batches
        self.queue_delay = {"count": 0, "sum_s": 0.0, "max_s": 0.0}  # arrival -> dispatch, batched calls
        self.servable_stats: dict[str, dict[str, int]] = {}  # label -> loads, evictions, cache hits...

    def set_batching(self, function: str, policy: dict[str, Any] | None, label: str = "") -> None:
        """Calls of ``function`` (a vectorized servable) are grouped by ``policy``:
        ``max_batch_size`` (by weight), ``max_batch_delay_ms`` (timer from the first waiting
        call; 0 batches what already waits) and ``weight`` ("count", or "len": the first
        argument's length). ``None``: no batching."""
        if label:
            self.labels[function] = label
        if policy is None or int(policy.get("max_batch_size", 64)) <= 1:
            self.batching.pop(function, None)  # batches of one: the regular queue, with prefetch
        else:
            self.batching[function] = dict(policy)

    def _enqueue(self, pool: str, task_id: bytes, front: bool = False) -> None:
        t = self.tasks[task_id]
        function = t.record[m.T_FUNCTION]
        policy = self.batching.get(function)
        if policy is None:
            queue = self.queues[pool]
            fifo = queue.by_user.get(t.user)
            if fifo is None or front:
                queue.push(task_id, t.user, front)
            else:  # FairQueue.push, inlined for the common case (the hot path)
                fifo.append(task_id)
            return
        options = m.task_options(t.record)
        weight = 1
        if options.get("batch") or policy.get("weight") == "len":
            weight = max(1, int(options.get("len", 1)))
        entry = (task_id, self.clock(), weight)
        queue = self.batch_queues.setdefault((pool, function), deque())
        (queue.appendleft if front else queue.append)(entry)

    def next_batch_deadline(self) -> float | None:
        """The next time a waiting batch becomes due (clock time), or None: the loop need not wake
        for batches that are due already (they wait for a worker, whose result wakes it)."""
        deadline, now = None, self.clock()
        for (_, function), queue in self.batch_queues.items():
            if queue:
                due = queue[0][1] + self.batching.get(function, {}).get("max_batch_delay_ms", 0.0) / 1000.0
                if due > now:  # one already due waits for an idle worker: a result wakes the loop
                    deadline = due if deadline is None else min(deadline, due)
        return deadline

    def _dispatch_batches(self, now: float) -> None:
        for (pool_name, function), queue in list(self.batch_queues.items()):
            policy = self.batching.get(function, {})
            limit = int(policy.get("max_batch_size", 64))
            delay_s = float(policy.get("max_batch_delay_ms", 0.0)) / 1000.0
            while queue:
                while queue and queue[0][0] not in self.tasks:  # cancelled while waiting
                    queue.popleft()
                if not queue:
                    break
                weight = 0
                for task_id, _, w in queue:
                    if task_id in self.tasks:  # cancelled calls wait to be dropped, weightless
                        weight += w
                        if weight >= limit:
                            break
                if weight < limit and now - queue[0][1] < delay_s:
                    break  # not full and not due: let it fill
                worker = self._idle_worker(pool_name, function, now)
                if worker is None:
                    break  # every worker busy: the batch keeps filling
                self._send_batch(worker, function, queue, limit, now)

    def _idle_worker(self, pool_name: str, function: str, now: float) -> WorkerState | None:
        idle = [
            w
            for w in self.workers.values()
            if w.pool_name == pool_name and not w.assigned and self._accepting(w, now)
        ]
        if not idle:
            return None
        return next((w for w in idle if function in w.warm), idle[0])

    def _send_batch(self, w: WorkerState, function: str, queue: deque, limit: int, now: float) -> None:
        ids, records, weight = [], [], 0
        while queue and (not ids or weight + queue[0][2] <= limit):
            task_id, arrived, w_weight = queue.popleft()
            t = self.tasks.get(task_id)
            if t is None:
                continue
            weight += w_weight
            ids.append(task_id)
            records.append(t.record)
            t.worker = w.identity
            delay = max(0.0, now - arrived)
            self.queue_delay["count"] += 1
            self.queue_delay["sum_s"] += delay
            self.queue_delay["max_s"] = max(self.queue_delay["max_s"], delay)
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
        w.warm.add(function)
        w.head_since = now
        w.assigned.extend(ids)
        w.running_batch = set(ids)
        bucket = 1 << max(0, (weight - 1).bit_length())
        self.batch_histogram[bucket] = self.batch_histogram.get(bucket, 0) + 1
        stats = self._stats_for(function)
        stats["batches"] += 1
        stats["batched_calls"] += weight
        self.to_workers.append((w.identity, m.Tasks(records, code, [ids])))

    def _stats_for(self, function: str) -> dict[str, int]:
        label = self.labels.get(function, function)
        stats = self.servable_stats.get(label)
        if stats is None:
            stats = self.servable_stats[label] = dict.fromkeys(
                (
                    "batches",
                    "batched_calls",
                    "loads",
                    "evictions",
                    "output_cache_hits",
                    "output_cache_misses",
                ),
                0,
            )
        return stats

    def worker_info(self, identity: bytes, info: dict[str, Any]) -> None:
        """What a worker reports beside results: loads, evictions and output-cache counts per
        servable function, and which servables it holds warm now."""
        w = self.workers.get(identity)
        if w is not None and isinstance(info.get("warm"), list):
            w.warm = {f for f in info["warm"] if isinstance(f, str)}
        counts = info.get("servables")
        if not isinstance(counts, dict):
            return
        for function, delta in counts.items():
            if not isinstance(delta, dict):
                continue
            stats = self._stats_for(function)
            for key in ("loads", "evictions", "output_cache_hits", "output_cache_misses"):
                value = delta.get(key, 0)
                if isinstance(value, int):
                    stats[key] += value

    def _batch_waiting(self) -> int:
        return sum(1 for q in self.batch_queues.values() for entry in q if entry[0] in self.tasks)

    def batching_snapshot(self) -> dict[str, Any]:
        delay = self.queue_delay
        return {
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_histogram.items())},
            "batches": sum(self.batch_histogram.values()),
            "queue_delay_ms": {
                "mean": round(1000 * delay["sum_s"] / delay["count"], 3) if delay["count"] else None,
                "max": round(1000 * delay["max_s"], 3),
                "count": delay["count"],
            },
            "waiting": self._batch_waiting(),
        }
