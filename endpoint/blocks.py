"""The endpoint's watch over its Parsl blocks: what the providers say about them, and what follows.

    loop (heartbeat) --watch()--> OffLoop thread per pool: provider status query
    loop (each turn) <--answers()-- outcomes: confirmed ends -> PoolLost / PoolRefused events

Parsl polls providers only every 5-60 s; at each heartbeat the endpoint asks now about the blocks
that matter now (no pool registered yet, or a pool gone quiet), confirms a terminal state across
queries a while apart, and then re-queues the block's tasks, or records why a block ended before
its pool started and, after ``MAX_EARLY_BLOCK_FAILURES`` in a row, stops that pool's scaling.

Split from the daemon (``endpoint/daemon.py``), whose ``Endpoint`` owns one ``BlockWatch``: this
is a role of its own (provider answers and block bookkeeping), and everything here runs on the
endpoint loop's thread. The provider queries themselves run on each pool's
:class:`~.offloop.OffLoop` and come back only as outcomes the loop collects; Parsl's poller
thread never calls in here (it reads what the loop publishes: ``Endpoint._idle_blocks``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from parsl.jobs.states import JobState

from dlhub.protocol import errors

from . import events as ev
from .config import EndpointConfig
from .offloop import Inline, OffLoop, Outcome
from .scheduler import Scheduler

log = logging.getLogger("dlhub.endpoint")

UNSEEN_JOB_GRACE_S = 30.0  # accounting may learn of a new job this late on a busy cluster
MAX_EARLY_BLOCK_FAILURES = 3  # then stop scaling and fail tasks with the blocks' error


class BlockWatch:
    """The blocks' bookkeeping, owned by the Endpoint and used only on its loop's thread."""

    def __init__(
        self,
        config: EndpointConfig,
        scheduler: Scheduler,
        executors: dict[str, Any],
        write_status: Callable[[], None],
    ):
        self.config = config
        self.scheduler = scheduler
        self.executors = executors  # the Endpoint's own dict: pool name -> PoolExecutor
        self._write_status = write_status
        self._ended_blocks: set[str] = set()
        self._terminal_since: dict[str, float] = {}  # block -> when a terminal status was first seen
        self._early_failures: dict[str, int] = {}  # pool -> blocks in a row that ended before registering
        self.block_errors: dict[str, dict[str, Any]] = {}  # blocks that ended before their pool ran
        self._blocks_with_pool: set[str] = set()  # blocks whose pool registered at least once
        self.provider_io: dict[str, OffLoop] = {}  # pool name -> the thread its provider queries run on

    def pool_registered(self, block: str, pool_name: str) -> None:
        """A pool said Hello: its block ran (never an early failure), and its pool's count restarts."""
        self._blocks_with_pool.add(block)
        self._early_failures[pool_name] = 0

    def watch(self) -> None:
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
        self.answers()

    def answers(self) -> None:
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
                self.block_ended(ex, name, block_id, st, by_block.get(key))
                self._write_status()  # the log and `dlhub status` name it together

    def forget_scaled_in(self) -> None:
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

    def block_ended(self, ex: Any, pool_name: str, block_id: str, st: Any, pool: Any) -> None:
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

    # ---- what status.json and the heartbeat show of them ---------------------------------------

    def block_states(self) -> dict[str, dict[str, Any]]:
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

    def slow_queries(self) -> dict[str, dict[str, Any]]:
        """Provider status queries running longer than a heartbeat (the loop does not wait on
        them; this says a scheduler command is slow instead of the endpoint being slow)."""
        out = {}
        for name, io in self.provider_io.items():
            for _, seconds in io.in_flight().items():
                if seconds > self.config.heartbeat_s:
                    out[name] = {"running_s": round(seconds, 1)}
        return out

    def provider_health(self) -> dict[str, Any]:
        """Each pool's provider status queries (run off the loop): a hung sacct shows in
        `dlhub status` through the heartbeat, instead of being felt."""
        provider = {}
        for io in list(self.provider_io.values()):
            provider.update(io.health())
        return provider

    def close(self) -> None:
        for io in self.provider_io.values():
            io.close()


def _status_query(ex: Any, watch: list[str]) -> tuple[list[str], list[Any]]:
    """Runs on the pool's OffLoop thread: the provider's status command for these blocks."""
    return watch, ex.fresh_status(watch)


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
