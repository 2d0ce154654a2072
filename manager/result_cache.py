"""The manager's result cache for deterministic servables (sans-IO, owned by the Router).

    key = sha256(package digest | input digest | result serializer)

The package digest names one immutable version, so a new version never sees an older version's
results (invalidation by version is in the key); ``latest`` resolves to the new digest at once.
Bounded by bytes with LRU eviction and an optional TTL; persisted through the task store when
the manager is configured to keep it across restarts. Identical calls in flight are coalesced by
the Router (one runs; the others wait for its result).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


def cache_key(function: str, input_key: str, serializer: str) -> str:
    return hashlib.sha256(f"{function}|{input_key}|{serializer}".encode()).hexdigest()


class ResultCache:
    def __init__(
        self,
        max_bytes: int = 256 * 1024 * 1024,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.time,
        persist: Callable[[str, bytes, float], None] | None = None,
    ):
        self.max_bytes, self.ttl_s, self.clock, self.persist = max_bytes, ttl_s, clock, persist
        self.entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # key -> (payload, created)
        self.bytes = 0
        self.counters = {"hits": 0, "misses": 0, "coalesced": 0, "stored": 0, "evicted": 0, "expired": 0}

    def get(self, key: str) -> bytes | None:
        entry = self.entries.get(key)
        if entry is not None and self.ttl_s is not None and self.clock() - entry[1] > self.ttl_s:
            self._drop(key)
            self.counters["expired"] += 1
            entry = None
        if entry is None:
            self.counters["misses"] += 1
            return None
        self.entries.move_to_end(key)
        self.counters["hits"] += 1
        return entry[0]

    def put(self, key: str, payload: bytes, created: float | None = None, persist: bool = True) -> None:
        if len(payload) > self.max_bytes or key in self.entries:
            return
        created = self.clock() if created is None else created
        self.entries[key] = (payload, created)
        self.bytes += len(payload)
        self.counters["stored"] += 1
        if persist and self.persist is not None:
            self.persist(key, payload, created)
        while self.bytes > self.max_bytes and self.entries:
            oldest = next(iter(self.entries))
            self._drop(oldest)
            self.counters["evicted"] += 1

    def _drop(self, key: str) -> None:
        payload, _ = self.entries.pop(key)
        self.bytes -= len(payload)

    def stats(self) -> dict[str, Any]:
        lookups = self.counters["hits"] + self.counters["misses"]
        return {
            **self.counters,
            "entries": len(self.entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hit_ratio": round(self.counters["hits"] / lookups, 4) if lookups else None,
        }
