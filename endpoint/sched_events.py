"""The Scheduler's boundary with the endpoint loop: what each event (:mod:`.events`) calls, and
the Scheduler's outboxes turned into instructions.

    handle(*events) -> HANDLERS[type(event)](scheduler, event, out) for each  (then dispatch once)
                    -> take_instructions(scheduler): the outbox lists as SendToWorker, RequestCode,
                       SendStates, LogFailures, SendResults, KillWorker

A handler calls the Scheduler's direct API (the methods the unit tests drive, which leave their
outputs in the outbox lists); a few add an instruction at once (a pool's heartbeat answered, a
cancel refused, a pool dropped). Kept apart from :mod:`.scheduler` so the event-to-method table
and the order instructions leave in are read in one place; nothing here keeps state, reads a clock
or does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dlhub.protocol import messages as m

from . import events as ev

if TYPE_CHECKING:
    from .scheduler import Scheduler


def take_instructions(s: Scheduler) -> list[ev.Instruction]:
    """Empty the outbox into instructions: worker messages, then what goes to the manager
    (code requests, states, results), failures to log and workers to kill."""
    out, s._out = s._out, []
    if s.to_workers:
        out[:0] = [ev.SendToWorker(identity, msg) for identity, msg in s.to_workers]
        s.to_workers.clear()
    if s.code_wait.requests:
        out.append(ev.RequestCode(s.code_wait.take_requests()))
    if s.states:
        done = {r[m.R_ID] for r in s.results}  # a finished task needs no "running"
        updates = [u for u in s.states if u[0] not in done]
        if updates:
            out.append(ev.SendStates(updates))
        s.states.clear()
    if s.failures:
        out.append(ev.LogFailures(list(s.failures)))
        s.failures.clear()
    if s.results:
        flagged = s.uncacheable and [r[m.R_ID] for r in s.results if r[m.R_ID] in s.uncacheable]
        if flagged:
            s.uncacheable.difference_update(flagged)
            out.append(ev.SendResults(s.results, {"uncacheable": [t.hex() for t in flagged]}))
        else:
            out.append(ev.SendResults(s.results))
        s.results = []
    for pool_id, worker_id, reason in s.kill_requests:
        pool = s.pools.get(pool_id)
        if pool is not None:
            out.append(ev.KillWorker(pool.identity, worker_id, reason))
    s.kill_requests.clear()
    return out


def _pool_joined(s: Scheduler, e: ev.PoolJoined, out: list) -> None:
    s.add_pool(e.identity, e.pool_id, e.block_id, e.info)
    if e.drain_in_s is not None:
        s.drain_pool_in(e.pool_id, e.drain_in_s)


def _results(s: Scheduler, e: ev.WorkerResults, out: list) -> None:
    if e.info:
        s.worker_info(e.identity, e.info)
    s.worker_results(e.identity, e.results)


def _heartbeat(s: Scheduler, e: ev.PoolHeartbeat, out: list) -> None:
    if s.pool_heartbeat(e.pool_id, e.info):
        out.append(ev.SendToWorker(e.identity, m.Heartbeat({})))


def _cancel(s: Scheduler, e: ev.CancelRequested, out: list) -> None:
    refused = s.cancel(e.task_ids)
    if refused:
        out.append(ev.RefuseCancel(refused, "already running or finished"))


def _tick(s: Scheduler, e: ev.Tick, out: list) -> None:
    s.wall_now = e.wall
    s.running_updates()
    out.extend(ev.PoolDropped(pool_id) for pool_id in s.check_pools())
    s.check_timeouts()


def _idle(s: Scheduler, e: ev.Idle, out: list) -> None:
    s.wall_now = e.wall
    s.running_updates()


HANDLERS: dict[type, Callable[[Scheduler, Any, list], None]] = {
    ev.TasksArrived: lambda s, e, out: s.add_tasks(e.records),
    ev.CodeArrived: lambda s, e, out: s.code_reply(e.blobs),
    ev.CodeFound: lambda s, e, out: s.add_code(e.blobs),
    ev.ManagerSession: lambda s, e, out: s.code_link_reset(),
    ev.ServableLearned: lambda s, e, out: s.set_batching(e.function, e.policy, e.label),
    ev.ImageUnavailable: lambda s, e, out: s.image_unavailable(e.package, e.reason),
    ev.ServableImage: lambda s, e, out: s.images.servable_image(e.package, e.image, e.fetching),
    ev.ImageFetched: lambda s, e, out: s.image_fetched(e.image, e.error),
    ev.ImageFailed: lambda s, e, out: s.image_fetched(e.image, e.reason),
    ev.PoolJoined: _pool_joined,
    ev.WorkerJoined: lambda s, e, out: s.add_worker(e.identity, e.worker_id, e.pool_id, e.pool_name, e.image),
    ev.WorkerResults: _results,
    ev.WorkerDied: lambda s, e, out: s.worker_died(e.worker_id, e.reason),
    ev.PoolHeartbeat: _heartbeat,
    ev.PoolLost: lambda s, e, out: s.pool_lost(e.pool_id, e.reason),
    ev.PoolRefused: lambda s, e, out: s.refuse_pool(e.pool_name, e.error),
    ev.CancelRequested: _cancel,
    ev.PolicyChanged: lambda s, e, out: setattr(s, "policy", e.policy),
    ev.Paused: lambda s, e, out: setattr(s, "paused", True),
    ev.Tick: _tick,
    ev.Idle: _idle,
}
