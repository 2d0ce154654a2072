"""What a worker keeps between calls: loaded servables (LRU) and outputs of deterministic ones.

    WarmServables: package digest -> LoadedServable, least recently used first out, bounded by
        a count and by the worker's memory (RSS from psutil, through a probe tests can replace).
        A package's bytes are kept on the node's disk (beside its unpacked files), so a servable
        evicted here reloads without another fetch.
    OutputCache: (package, input digest, serializer) -> serialized result, bounded by bytes.

Both count what they do per servable (loads, evictions, hits, misses); the worker reports the
counts to the endpoint with its results, which shows them in its status and metrics.
"""

from __future__ import annotations

import gc
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from dlhub.protocol import messages as m

from .packages import write_atomically


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class WarmServables:
    def __init__(
        self,
        max_count: int = 16,
        memory_budget_bytes: int | None = None,
        probe: Callable[[], int] = rss_bytes,
        log: Callable[[str], None] | None = None,
    ):
        self.max_count, self.memory_budget_bytes, self.probe = max_count, memory_budget_bytes, probe
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.loaded: OrderedDict[str, Any] = OrderedDict()
        self.events: dict[str, dict[str, int]] = {}  # function -> counts since last report
        self.changed = False

    def __contains__(self, package: str) -> bool:
        return package in self.loaded

    def get(self, package: str) -> Any | None:
        servable = self.loaded.get(package)
        if servable is not None:
            self.loaded.move_to_end(package)
        return servable

    def load(self, package: str, blob: bytes | None) -> Any:
        from .servables import cache_root, load_package

        path = cache_root() / f"{package}.pkg"
        if blob is None:
            try:
                blob = path.read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"servable package {package} was evicted and its copy {path} is gone"
                ) from None
        else:
            try:
                write_atomically(path, blob)
            except OSError:  # a full disk only costs a refetch after an eviction
                pass
        servable = load_package(blob, package)  # a copy read back must be the package named
        self.loaded[package] = servable
        self._count(package, "loads")
        self._evict(keep=package)
        return servable

    def _evict(self, keep: str) -> None:
        while len(self.loaded) > 1:
            over_count = len(self.loaded) > self.max_count
            over_memory = self.memory_budget_bytes is not None and self.probe() > self.memory_budget_bytes
            if not (over_count or over_memory):
                return
            victim = next(p for p in self.loaded if p != keep)
            servable = self.loaded.pop(victim)
            why = f"over {self.max_count} servables" if over_count else "over the memory budget"
            self.log(f"dlhub worker: evicted {getattr(servable.record, 'ref', victim)} ({why})")
            unload = getattr(servable, "unload", None)
            if unload is not None:
                unload()
            del servable
            gc.collect()
            self._count(victim, "evictions")

    def _count(self, package: str, what: str) -> None:
        counts = self.events.setdefault(m.RUN_PREFIX + package, {})
        counts[what] = counts.get(what, 0) + 1
        self.changed = True

    def count(self, package: str, what: str) -> None:
        self._count(package, what)

    def report(self) -> dict[str, Any]:
        """Counts since the last report and the warm set (as task functions); {} if unchanged."""
        if not self.changed:
            return {}
        info = {"servables": self.events, "warm": [m.RUN_PREFIX + p for p in self.loaded]}
        self.events, self.changed = {}, False
        return info


class OutputCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, bytes] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple) -> bytes | None:
        body = self.entries.get(key)
        if body is not None:
            self.entries.move_to_end(key)
        return body

    def put(self, key: tuple, body: bytes) -> None:
        if len(body) > self.max_bytes or key in self.entries:
            return
        self.entries[key] = body
        self.bytes += len(body)
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= len(old)
