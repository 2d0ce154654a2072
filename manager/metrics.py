"""The manager's status as Prometheus metrics (text exposition via prometheus_client).

One collector turns a status snapshot (``Router.status()`` plus the endpoints' heartbeat info)
into metric families: task counters, result-cache counters, and per endpoint its workers, batch
size histogram, queue delay, and per servable warm loads, evictions, output-cache hits/misses
and batches. Served at ``GET /metrics`` with a bearer token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dlhub.protocol import messages as m

log = logging.getLogger("dlhub.manager.metrics")


def prometheus_text(status: dict[str, Any]) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(lambda: status))
    return generate_latest(registry)


class _StatusCollector:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self.snapshot = snapshot

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            SummaryMetricFamily,
        )

        status = self.snapshot()
        for key in ("received", "finished", "duplicates"):
            yield _counter(
                CounterMetricFamily, f"dlhub_tasks_{key}", f"tasks {key} by the manager", status.get(key, 0)
            )
        yield GaugeMetricFamily(
            "dlhub_tasks_open", "tasks not yet finished", value=status.get("tasks_open", 0)
        )

        cache = status.get("result_cache") or {}
        for key in ("hits", "misses", "coalesced", "stored", "evicted", "expired"):
            yield _counter(
                CounterMetricFamily,
                f"dlhub_result_cache_{key}",
                f"manager result cache: {key} (deterministic servables)",
                cache.get(key, 0),
            )
        yield GaugeMetricFamily(
            "dlhub_result_cache_bytes", "bytes held by the result cache", value=cache.get("bytes", 0)
        )
        yield GaugeMetricFamily(
            "dlhub_result_cache_entries", "entries in the result cache", value=cache.get("entries", 0)
        )

        yield from _database_gauges(GaugeMetricFamily, status.get("database"))

        connected = GaugeMetricFamily(
            "dlhub_endpoint_connected", "1 if the endpoint is connected", labels=["endpoint"]
        )
        workers = GaugeMetricFamily("dlhub_endpoint_workers", "workers registered", labels=["endpoint"])
        queued = GaugeMetricFamily(
            "dlhub_endpoint_queued", "tasks waiting at the endpoint", labels=["endpoint"]
        )
        batch = HistogramMetricFamily(
            "dlhub_batch_size", "calls per batch of a vectorized servable", labels=["endpoint"]
        )
        delay = SummaryMetricFamily(
            "dlhub_batch_queue_delay_seconds",
            "time batched calls waited before dispatch",
            labels=["endpoint"],
        )
        per_servable = {
            key: CounterMetricFamily(
                f"dlhub_servable_{key}",
                f"per servable: {key.replace('_', ' ')}",
                labels=["endpoint", "servable"],
            )
            for key in m.SERVABLE_STATS_KEYS
        }
        for name, ep in sorted((status.get("endpoints") or {}).items()):
            try:  # one endpoint's odd report must not take the whole page down
                samples = list(_endpoint_samples(name, ep, batch, delay, per_servable))
            except (TypeError, ValueError, AttributeError, KeyError) as exc:
                log.warning("metrics: skipped endpoint %r, its report is malformed: %s", name, exc)
                continue
            info = ep.get("info") or {}
            connected.add_metric([name], 1 if ep.get("connected") else 0)
            workers.add_metric([name], float(info.get("workers", 0)))
            queued.add_metric([name], float(info.get("queued", 0)))
            for family, args in samples:
                family.add_metric(*args)
        yield from (connected, workers, queued, batch, delay, *per_servable.values())


def _endpoint_samples(name: str, ep: dict, batch, delay, per_servable: dict):
    """(family, add_metric args) for one endpoint, all computed before any is added."""
    info = ep.get("info") or {}
    float(info.get("workers", 0)), float(info.get("queued", 0))  # raise here, not half-way
    batching = info.get("batching") or {}
    histogram = {int(k): v for k, v in (batching.get("batch_size_histogram") or {}).items()}
    if histogram:
        running, buckets = 0, []
        for bound in sorted(histogram):
            running += histogram[bound]
            buckets.append((str(bound), running))
        buckets.append(("+Inf", running))
        calls = sum(s.get("batched_calls", 0) for s in (info.get("servables") or {}).values())
        yield batch, ([name], buckets, calls)
    waited = batching.get("queue_delay_ms") or {}
    if waited.get("count"):
        yield delay, ([name], waited["count"], (waited.get("mean") or 0) * waited["count"] / 1000.0)
    for servable, stats in sorted((info.get("servables") or {}).items()):
        for key, family in per_servable.items():
            yield family, ([name, servable], float(stats.get(key, 0)))


def _database_gauges(cls, health: Any):
    """The task store's writer (``TaskStore.health``; shown to admins only): stalled or not, for
    how long, and how many writes wait, so an alert can fire on a locked database."""
    if not isinstance(health, dict):
        return
    stalled_for = health.get("stalled_for_s")
    yield cls(
        "dlhub_database_stalled",
        "1 while a group commit fails and is retried, or runs over a second",
        value=0 if health.get("state") == "ok" else 1,
    )
    yield cls(
        "dlhub_database_stalled_seconds",
        "how long the stuck commit has run (0 when not stalled)",
        value=float(stalled_for or 0),
    )
    yield cls(
        "dlhub_database_pending_writes",
        "writes not yet committed",
        value=float(health.get("pending_writes") or 0),
    )
    yield cls(
        "dlhub_database_last_commit_age_seconds",
        "seconds since the last commit",
        value=float(health.get("last_commit_age_s") or 0),
    )


def _counter(cls, name: str, doc: str, value: float):
    family = cls(name, doc)
    family.add_metric([], value)
    return family
