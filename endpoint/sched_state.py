"""The records the endpoint's Scheduler keeps per task, worker and pool, and the rule that places
a task's resource request on a named pool.

Plain data, no behaviour of their own beyond matching a request to a pool's worker shape: the
Scheduler (:mod:`.scheduler`) and the helpers it composes (:mod:`.roster` keeps the worker and
pool records, :mod:`.image_dispatch` reads them) read and update them. Kept apart so those
helpers can name the records without importing the Scheduler.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dlhub.protocol import messages as m


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


def choose_pool(
    pool_offers: dict[str, dict[str, Any]], resources: dict[str, Any] | None
) -> tuple[str | None, str]:
    """``(pool, "")`` for a resource request: the named pool, else the first (default first)
    whose workers offer it; ``(None, why)`` when no pool here can ever run it."""
    if not resources:
        return next(iter(pool_offers)), ""
    wanted = resources.get("pool")
    if wanted and wanted not in pool_offers:
        return None, f"no pool named {wanted!r} at this endpoint (pools: {', '.join(pool_offers)})"
    for name in [wanted] if wanted else list(pool_offers):
        offers = pool_offers[name]
        if all(fits(resources.get(k), offers.get(k), k == "gpus") for k in ("cores", "memory_gb", "gpus")):
            return name, ""
    shapes = "; ".join(f"{n}: {o}" for n, o in pool_offers.items())
    return None, f"no pool offers {resources} per worker (pools: {shapes})"


def fits(wanted: Any, offered: Any, counted: bool) -> bool:
    """Does one worker offer what a task asks? Undeclared cores/memory fit any request; GPUs are
    counted (a worker without accelerators offers 0)."""
    if wanted is None:
        return True
    if offered is None:
        return not counted
    return wanted <= offered
