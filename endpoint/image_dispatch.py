"""Images per servable at the endpoint: which image each servable runs in, its calls queued per
``(pool, image)``, and when to trade a pool's idle worker for one inside an image.

A helper the Scheduler composes (sans-IO, like :mod:`.batching`; ``now`` comes from the Scheduler,
which has it from its events). The workers, tasks and pools it looks at are the Scheduler's,
passed in; it changes none of them but a worker's ``swapping`` flag.

A servable package whose container resolved to an image other than its pool's own
(:class:`~.events.ServableImage`) has its calls queued per ``(pool, image)`` and run only on
workers started inside that image. Workers are the pool's budget: when an image has calls
waiting and no worker (nor one starting), the Scheduler asks the pool (``StartWorker``) to replace
an idle worker of the least recently used image (the pool's own image included: its bare calls
then ask for one back the same way) with one inside the image it needs; workers stay warm in
their image until retired so. An image's calls wait meanwhile; batching does not apply to them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Collection, Container, Mapping
from typing import Any

from dlhub.protocol import errors
from dlhub.protocol import messages as m

from .fairqueue import FairQueue
from .sched_state import PoolState, TaskState, WorkerState

IMAGE_START_TIMEOUT_S = 120.0  # a worker asked for in an image and not joined by then: ask again


class ImageDispatch:
    def __init__(self) -> None:
        # package digest -> error record: servables whose container this endpoint cannot provide
        self.errors: dict[str, list] = {}
        # images per servable: package digest -> its image; queued calls per (pool, image); when
        # each (pool, image) last got a call (LRU); workers asked for and not yet joined
        self.package_images: dict[str, str] = {}
        self.function_images: dict[str, str] = {}  # the same by servable:/verify: function (hot path)
        self.queues: dict[tuple[str, str], deque] = {}
        self.used: dict[tuple[str, str | None], float] = {}
        self.starting: dict[tuple[str, str | None], list[float]] = {}
        self.fetching: set[str] = set()  # being pulled (ImageFetched ends it)
        self.bare_pools: set[str] = set()  # pools without a container runtime (set by the daemon)

    def servable_image(self, package: str, image: str, fetching: bool = False) -> None:
        """A servable package runs inside ``image``: its calls queue for workers in that image
        (started once the image is fetched, when it is being fetched)."""
        self.package_images[package] = image
        for prefix in (m.RUN_PREFIX, m.VERIFY_PREFIX):
            self.function_images[prefix + package] = image
        if fetching:
            self.fetching.add(image)

    def unavailable(self, package: str, reason: str) -> list:
        """A servable's container cannot be provided here: the error its calls fail with."""
        error = self.errors[package] = errors.infra_error("image", reason)
        return error

    def fetched(self, image: str, error: str | None) -> tuple[list[str], list[bytes]]:
        """The fetch of ``image`` ended: workers may start in it now; or, with ``error``, the
        packages that run in it and the calls queued for it, which the Scheduler fails (the
        packages are forgotten and their queues emptied here)."""
        self.fetching.discard(image)
        if error is None:
            return [], []
        packages = [p for p, i in self.package_images.items() if i == image]
        for package in packages:
            del self.package_images[package]
            for prefix in (m.RUN_PREFIX, m.VERIFY_PREFIX):
                self.function_images.pop(prefix + package, None)
        queued: list[bytes] = []
        for (_, queued_image), queue in self.queues.items():
            if queued_image == image:
                queued += queue
                queue.clear()
        return packages, queued

    def error_for(self, function: str) -> list | None:
        """The error a call of ``function`` fails with when its servable's image is unavailable."""
        package = m.package_key(function)
        return self.errors.get(package) if package is not None else None

    def image_of(self, function: str) -> str | None:
        return self.function_images.get(function)

    def enqueue(self, pool: str, image: str, task_id: bytes, front: bool = False) -> str | None:
        """Queue a call for ``pool``'s workers inside ``image``; the reason it cannot run when
        that pool's workers cannot start in an image."""
        if pool in self.bare_pools:  # its workers cannot start in an image
            return f"pool {pool!r} runs no container runtime: it cannot run image {image}"
        queue = self.queues.setdefault((pool, image), deque())
        if front:
            queue.appendleft(task_id)
        else:
            queue.append(task_id)
        return None

    def take_pool(self, pool_name: str, alive: Container[bytes]) -> list[bytes]:
        """Empty ``pool_name``'s image queues: the live calls that waited there."""
        waiting: list[bytes] = []
        for (name, _), imaged in self.queues.items():
            if name == pool_name:
                waiting += [t for t in imaged if t in alive]
                imaged.clear()
        return waiting

    def worker_joined(self, pool_name: str, image: str | None) -> None:
        starting = self.starting.get((pool_name, image))
        if starting:  # the worker asked for (the oldest request) has come
            starting.pop(0)

    def dispatch(
        self,
        now: float,
        workers: Collection[WorkerState],
        tasks: Mapping[bytes, TaskState],
        accepting: Callable[[WorkerState, float], bool],
        prefetch: Callable[[str], int],
        assign: Callable[..., bool],
    ) -> dict[bytes, tuple[list, dict]]:
        """Each image's queued calls to the least-loaded of its pool's workers inside it: the
        batches to send, by worker identity (``assign`` puts a call in one; False when the call
        went back to wait for its code)."""
        batches: dict[bytes, tuple[list, dict]] = {}
        for (pool_name, image), queue in self.queues.items():
            if not queue:
                continue
            inside = [
                w
                for w in workers
                if w.pool_name == pool_name and w.image == image and not w.swapping and accepting(w, now)
            ]
            while queue and inside:
                task_id = queue[0]
                t = tasks.get(task_id)
                if t is None:  # cancelled while queued
                    queue.popleft()
                    continue
                digest = t.record[m.T_FUNCTION]
                w = min(inside, key=lambda w: (len(w.assigned), digest not in w.warm))
                if len(w.assigned) > prefetch(digest):
                    break
                queue.popleft()
                if not assign(w, t, task_id, digest, batches, now, True):
                    continue
                self.used[(pool_name, image)] = now
        return batches

    def start_workers(
        self,
        now: float,
        workers: Collection[WorkerState],
        alive: Container[bytes],
        pool_queues: Mapping[str, FairQueue],
        pools: Mapping[str, PoolState],
        accepting: Callable[[WorkerState, float], bool],
    ) -> list[tuple[bytes, m.StartWorker]]:
        """Images (the pools' own included) with calls waiting and no worker, nor one starting:
        replace an idle worker of the least recently used other image with one inside it. The
        ``StartWorker`` messages to send, by pool identity (their workers marked swapping)."""
        for key, times in list(self.starting.items()):
            times[:] = [t for t in times if now - t < IMAGE_START_TIMEOUT_S]
            if not times:
                del self.starting[key]
        for queue in self.queues.values():
            while queue and queue[0] not in alive:  # cancelled while waiting
                queue.popleft()
        wanted: list[tuple[str, str | None]] = [k for k, q in self.queues.items() if q]
        for name, q in pool_queues.items():
            # bare calls waiting need a start only where no worker of the pool's own image is
            # left (the common case stops at the first worker: the bare hot path pays ~nothing)
            if q and not any(w.image is None and not w.swapping and w.pool_name == name for w in workers):
                wanted.append((name, None))
        if not wanted:
            return []
        starts: list[tuple[bytes, m.StartWorker]] = []
        running = {(w.pool_name, w.image) for w in workers if not w.swapping}
        for pool_name, image in wanted:
            if (pool_name, image) in running or self.starting.get((pool_name, image)):
                continue
            if image in self.fetching:
                continue  # its calls wait for the pull
            busy_images = {i for (p, i), q in self.queues.items() if q and p == pool_name}
            if pool_queues[pool_name]:
                busy_images.add(None)
            idle = [
                w
                for w in workers
                if w.pool_name == pool_name
                and not w.assigned
                and not w.swapping
                and w.image != image
                and w.image not in busy_images
                and accepting(w, now)
            ]
            if not idle:
                continue  # every worker busy, or its image has calls waiting: asked again later
            victim = min(idle, key=lambda w: self.used.get((pool_name, w.image), -math.inf))
            pool = pools.get(victim.pool_id)
            if pool is None:
                continue
            victim.swapping = True
            self.starting.setdefault((pool_name, image), []).append(now)
            starts.append((pool.identity, m.StartWorker(victim.worker_id, image)))
        return starts

    def snapshot(self, workers: Collection[WorkerState], alive: Container[bytes]) -> dict[str, Any]:
        """Workers and waiting calls per image, for status (nothing where no servable has one)."""
        if not self.package_images:
            return {}
        return {
            "image_workers": {
                image: sum(1 for w in workers if w.image == image)
                for image in sorted({w.image for w in workers if w.image})
            },
            "image_queued": {
                i: n for (_, i), q in self.queues.items() if (n := sum(1 for t in q if t in alive))
            },
        }
