"""The pools and workers connected to the endpoint, as its Scheduler sees them: who joined, each
pool's last heartbeat, info and drain time, who left, and whose running task overran its limit.

A helper the Scheduler composes (sans-IO: ``now`` comes from the Scheduler, which has it from its
events). It keeps the :class:`~.sched_state.PoolState` and :class:`~.sched_state.WorkerState`
records (the Scheduler's ``pools``, ``workers`` and ``worker_by_id`` are its dicts); what becomes
of the tasks a departed worker or pool held (failed, re-queued, lost) is the Scheduler's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from dlhub.protocol import messages as m

from .sched_state import PoolState, TaskState, WorkerState

log = logging.getLogger("dlhub.endpoint.scheduler")  # the Scheduler's log: the same name as ever


class Roster:
    def __init__(self) -> None:
        self.workers: dict[bytes, WorkerState] = {}
        self.worker_by_id: dict[str, bytes] = {}
        self.pools: dict[str, PoolState] = {}

    def add_pool(self, identity: bytes, pool_id: str, block_id: str, info: dict, now: float) -> None:
        pool = self.pools.get(pool_id)
        if pool is None:
            self.pools[pool_id] = PoolState(pool_id, identity, block_id, now, info=info)
        else:
            pool.identity, pool.last_seen, pool.info = identity, now, info

    def drain_pool_in(self, pool_id: str, seconds: float, now: float) -> None:
        """Give the pool no new work after ``seconds`` (its block's walltime is ending)."""
        pool = self.pools.get(pool_id)
        if pool is not None:
            pool.drain_at = now + seconds

    def heartbeat(self, pool_id: str, info: dict | None, now: float) -> bool:
        """A pool is alive (and its info, when well formed, updated); False for one not known."""
        pool = self.pools.get(pool_id)
        if pool is None:
            return False
        pool.last_seen = now
        problem = m.check_pool_info(info) if info else None
        if problem:  # never let it into the snapshot the manager and `dlhub status` read
            log.warning("pool %s sent malformed heartbeat info, ignored: %s", pool_id, problem)
        elif info:
            pool.info.update(info)
        return True

    def add_worker(
        self, identity: bytes, worker_id: str, pool_id: str, pool_name: str, image: str | None
    ) -> None:
        w = WorkerState(identity, worker_id, pool_id, pool_name=pool_name, image=image)
        self.workers[identity] = w
        self.worker_by_id[worker_id] = identity
        pool = self.pools.get(pool_id)
        if pool is not None:
            pool.workers.add(worker_id)

    def remove_worker(self, worker_id: str) -> WorkerState | None:
        """A worker died: its record (None for one not known), gone from the roster."""
        identity = self.worker_by_id.pop(worker_id, None)
        w = self.workers.pop(identity, None) if identity is not None else None
        if w is None:
            return None
        pool = self.pools.get(w.pool_id)
        if pool is not None:
            pool.workers.discard(worker_id)
        return w

    def remove_pool(self, pool_id: str) -> list[WorkerState]:
        """A whole block went away: the records of its workers, gone with it from the roster."""
        pool = self.pools.pop(pool_id, None)
        if pool is None:
            return []
        gone = []
        for worker_id in list(pool.workers):
            identity = self.worker_by_id.pop(worker_id, None)
            w = self.workers.pop(identity, None) if identity is not None else None
            if w is not None:
                gone.append(w)
        return gone

    def silent_pools(self, now: float, threshold_s: float) -> list[str]:
        """Pools not heard from for longer than ``threshold_s``."""
        return [p.pool_id for p in self.pools.values() if now - p.last_seen > threshold_s]

    def overrunning(
        self, tasks: Mapping[bytes, TaskState], now: float, grace_s: float
    ) -> list[tuple[str, str, str]]:
        """Workers whose running task overran its limit (and ignored SIGALRM), each once: marked
        ``killing``, and returned as ``(pool_id, worker_id, reason)`` for the pool to kill."""
        kills = []
        for w in self.workers.values():
            if w.killing or not w.assigned or w.head_since is None:
                continue
            t = tasks.get(w.assigned[0])
            limit = t.record[m.T_TIMEOUT] if t is not None else None
            if limit and now - w.head_since > limit + grace_s:
                w.killing = (
                    f"task exceeded its time limit of {limit} s and did not respond to the "
                    "interrupt; its worker was killed"
                )
                kills.append((w.pool_id, w.worker_id, w.killing))
        return kills

    def idle_pools(self) -> list[str]:
        """Pools none of whose workers hold a task (safe to scale in)."""
        busy = {w.pool_id for w in list(self.workers.values()) if w.assigned}
        return [p for p in list(self.pools) if p not in busy]

    def snapshot(self, now: float) -> dict[str, dict]:
        """Each pool's info, block, worker count and whether it drains, for status."""
        return {
            p.pool_id: {
                **p.info,
                "block_id": p.block_id,
                "workers": len(p.workers),
                "draining": p.drain_at is not None and now >= p.drain_at,
            }
            for p in self.pools.values()
        }
