"""Batching of vectorized servables at the endpoint: a policy object the Scheduler composes
(sans-IO; times come from the Scheduler, which has them from its events).

    set_policy(function, policy)  <- a ServableLearned event (the package's record + endpoint config)
    add:  a call of a batched function waits in its (pool, function) queue with its arrival
          time and weight (the Scheduler's _enqueue; everything else goes to the pool's FairQueue);
          the queue is a FIFO per submitting user (:class:`BatchQueue`)
    due:  a batch may leave when its weight reaches max_batch_size or the delay since the first
          waiting call expired; the Scheduler then picks an idle worker (a warm one first)
    take: the calls of one batch, up to the size limit, one user's call a turn (round-robin),
          so another user's call rides in the next batch, not after a flood; ``sent`` counts it

It holds only its own state: the policies, the waiting calls, the labels, the per-servable counts
workers report (loads, evictions, output-cache hits), the batch-size histogram and queue delay.
Which calls are still alive is asked of the caller (``alive``: the Scheduler's tasks).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Iterator
from typing import Any

from dlhub.protocol import messages as m

STATS_KEYS = m.SERVABLE_STATS_KEYS  # the one definition is the protocol's
REPORTED_KEYS = m.WORKER_SERVABLE_KEYS


class BatchQueue:
    """One (pool, function)'s waiting batched calls: a FIFO per user of ``(task id, arrival,
    weight)``, served round-robin (``ring``: users with calls waiting, the next first). With one
    user it is a FIFO; iteration yields every waiting entry (users in turn, not arrival order)."""

    __slots__ = ("by_user", "ring", "size")

    def __init__(self) -> None:
        self.by_user: dict[str | None, deque[tuple[bytes, float, int]]] = {}
        self.ring: deque[str | None] = deque()
        self.size = 0

    def push(self, entry: tuple[bytes, float, int], user: str | None, front: bool = False) -> None:
        """At the back of ``user``'s FIFO, or the front (a requeued call; a user with nothing
        waiting then joins the ring at its head, as in the pools' FairQueue)."""
        q = self.by_user.get(user)
        if q is None:
            q = self.by_user[user] = deque()
            (self.ring.appendleft if front else self.ring.append)(user)
        (q.appendleft if front else q.append)(entry)
        self.size += 1

    def peek(self) -> tuple[bytes, float, int]:
        return self.by_user[self.ring[0]][0]

    def pop(self) -> tuple[bytes, float, int]:
        """The next user's oldest call; that user goes to the back of the ring."""
        user = self.ring[0]
        q = self.by_user[user]
        entry = q.popleft()
        self.size -= 1
        if not q:
            self.ring.popleft()
            del self.by_user[user]
        else:
            self.ring.rotate(-1)
        return entry

    def drop_dead(self, alive: Container[bytes]) -> None:
        """Drop cancelled calls at the head of each user's FIFO."""
        for user, q in list(self.by_user.items()):
            while q and q[0][0] not in alive:
                q.popleft()
                self.size -= 1
            if not q:
                del self.by_user[user]
                self.ring.remove(user)

    def first_arrival(self) -> float:
        """When the oldest waiting call arrived (the queue must not be empty)."""
        return min(q[0][1] for q in self.by_user.values())

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __iter__(self) -> Iterator[tuple[bytes, float, int]]:
        for q in self.by_user.values():
            yield from q


class Batching:
    """Batched calls of vectorized servables: the queues, the policies and the counts."""

    def __init__(self) -> None:
        # function -> policy; (pool, function) -> waiting calls (task id, arrival, weight)
        self.policies: dict[str, dict[str, Any]] = {}
        self.queues: dict[tuple[str, str], BatchQueue] = {}
        self.labels: dict[str, str] = {}  # servable function -> owner/name:version
        self.histogram: dict[int, int] = {}  # batch size bucket (1, 2, 4, ...) -> batches
        self.queue_delay = {"count": 0, "sum_s": 0.0, "max_s": 0.0}  # arrival -> dispatch, batched calls
        self.servable_stats: dict[str, dict[str, int]] = {}  # label -> loads, evictions, cache hits...

    def set_policy(self, function: str, policy: dict[str, Any] | None, label: str = "") -> None:
        """Calls of ``function`` (a vectorized servable) are grouped by ``policy``:
        ``max_batch_size`` (by weight), ``max_batch_delay_ms`` (timer from the first waiting
        call; 0 batches what already waits) and ``weight`` ("count", or "len": the first
        argument's length). ``None``: no batching."""
        if label:
            self.labels[function] = label
        if policy is None or int(policy.get("max_batch_size", 64)) <= 1:
            self.policies.pop(function, None)  # batches of one: the regular queue, with prefetch
        else:
            self.policies[function] = dict(policy)

    def add(
        self,
        pool: str,
        function: str,
        task_id: bytes,
        options: dict,
        now: float,
        front: bool = False,
        user: str | None = None,
    ) -> None:
        """Queue a call of a batched function in ``user``'s FIFO (``front``: a requeued one,
        first to go)."""
        policy = self.policies[function]
        weight = 1
        if options.get("batch") or policy.get("weight") == "len":
            weight = max(1, int(options.get("len", 1)))
        queue = self.queues.get((pool, function))
        if queue is None:
            queue = self.queues[(pool, function)] = BatchQueue()
        queue.push((task_id, now, weight), user, front)

    def next_deadline(self, now: float) -> float | None:
        """The next time a waiting batch becomes due, or None: the loop need not wake for batches
        that are due already (they wait for a worker, whose result wakes it)."""
        deadline = None
        for (_, function), queue in self.queues.items():
            if queue:
                due = (
                    queue.first_arrival()
                    + self.policies.get(function, {}).get("max_batch_delay_ms", 0.0) / 1000.0
                )
                if due > now:
                    deadline = due if deadline is None else min(deadline, due)
        return deadline

    def due(self, function: str, queue: BatchQueue, now: float, alive: Container[bytes]) -> int | None:
        """The size limit when a batch of ``queue`` may leave now (full, or its delay expired),
        else None. Cancelled calls at the heads are dropped; those further in weigh nothing."""
        queue.drop_dead(alive)
        if not queue:
            return None
        policy = self.policies.get(function, {})
        limit = int(policy.get("max_batch_size", 64))
        weight = 0
        for task_id, _, w in queue:
            if task_id in alive:
                weight += w
                if weight >= limit:
                    return limit
        if now - queue.first_arrival() < float(policy.get("max_batch_delay_ms", 0.0)) / 1000.0:
            return None  # not full and not due: let it fill
        return limit

    def take(
        self, queue: BatchQueue, limit: int, alive: Container[bytes], now: float
    ) -> tuple[list[bytes], int]:
        """Pop one batch (ids of live calls, at most ``limit`` in weight, the users in turn) and
        its weight."""
        ids: list[bytes] = []
        weight = 0
        while queue and (not ids or weight + queue.peek()[2] <= limit):
            task_id, arrived, w = queue.pop()
            if task_id not in alive:
                continue
            weight += w
            ids.append(task_id)
            delay = max(0.0, now - arrived)
            self.queue_delay["count"] += 1
            self.queue_delay["sum_s"] += delay
            self.queue_delay["max_s"] = max(self.queue_delay["max_s"], delay)
        return ids, weight

    def sent(self, function: str, weight: int) -> None:
        """Count a batch that left (histogram by power-of-two bucket, per-servable stats)."""
        bucket = 1 << max(0, (weight - 1).bit_length())
        self.histogram[bucket] = self.histogram.get(bucket, 0) + 1
        stats = self.stats_for(function)
        stats["batches"] += 1
        stats["batched_calls"] += weight

    def stats_for(self, function: str) -> dict[str, int]:
        label = self.labels.get(function, function)
        stats = self.servable_stats.get(label)
        if stats is None:
            stats = self.servable_stats[label] = dict.fromkeys(STATS_KEYS, 0)
        return stats

    def count_reported(self, counts: Any) -> None:
        """Per-servable counts a worker reported (loads, evictions, output-cache hits/misses);
        malformed entries are ignored."""
        if not isinstance(counts, dict):
            return
        for function, delta in counts.items():
            if not isinstance(delta, dict):
                continue
            stats = self.stats_for(function)
            for key in REPORTED_KEYS:
                value = delta.get(key, 0)
                if isinstance(value, int):
                    stats[key] += value

    def waiting(self, alive: Container[bytes]) -> int:
        return sum(1 for q in self.queues.values() for entry in q if entry[0] in alive)

    def snapshot(self, alive: Container[bytes]) -> dict[str, Any]:
        delay = self.queue_delay
        return {
            "batch_size_histogram": {str(k): v for k, v in sorted(self.histogram.items())},
            "batches": sum(self.histogram.values()),
            "queue_delay_ms": {
                "mean": round(1000 * delay["sum_s"] / delay["count"], 3) if delay["count"] else None,
                "max": round(1000 * delay["max_s"], 3),
                "count": delay["count"],
            },
            "waiting": self.waiting(alive),
        }
