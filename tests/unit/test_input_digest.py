"""Input digests for the result caches (canonical hashing of a call's inputs), and the manager's
status rendered as Prometheus metrics."""

from __future__ import annotations

import fractions
import re

import numpy as np
import pytest

from dlhub.endpoint.scheduler import Scheduler
from dlhub.manager.metrics import prometheus_text
from dlhub.protocol import messages as m
from dlhub.protocol.serialize import input_digest


def digest(*args, **kwargs) -> str | None:
    return input_digest(args, kwargs)


# ---- input_digest ------------------------------------------------------------------------------


def test_a_digest_is_hex_sha256_and_stable():
    d = digest(1, "a", [1.5, None], {"k": b"\x00"}, flag=True)
    assert re.fullmatch(r"[0-9a-f]{64}", d)
    assert d == digest(1, "a", [1.5, None], {"k": b"\x00"}, flag=True)


def test_dict_insertion_order_does_not_matter():
    a = {"x": 1, "y": [1, 2], "z": {"b": 2, "a": 1}}
    b = {"z": {"a": 1, "b": 2}, "y": [1, 2], "x": 1}
    assert digest(a) == digest(b)
    assert digest(q=1, r=2) == digest(r=2, q=1)
    assert digest({1: "one", "1": "string one"}) == digest({"1": "string one", 1: "one"})


@pytest.mark.parametrize(
    "left, right",
    [
        (([1, 2],), ((1, 2),)),  # list vs tuple
        ((1,), (1.0,)),  # int vs float (msgpack encodes them differently)
        ((True,), (1,)),  # bool vs int
        ((0,), (False,)),
        (("a",), (b"a",)),  # str vs bytes
        ((None,), ((),)),
        (({"a": 1},), ([["a", 1]],)),  # a dict vs a list of pairs
        (([1, 2],), ([2, 1],)),  # order of a list matters
        ((1, 2), (2, 1)),
        (([[1], 2],), ([1, [2]],)),
        ((1.0,), (1.0000000001,)),
    ],
)
def test_different_inputs_digest_differently(left, right):
    assert digest(*left) != digest(*right)


def test_args_and_kwargs_are_distinguished():
    assert digest(1) != digest(x=1)
    assert digest(1, x=2) != digest(2, x=1)
    assert digest() != digest(None)


def test_numpy_arrays_digest_by_dtype_shape_and_content():
    a = np.arange(6, dtype=np.int64)
    assert digest(a) == digest(np.arange(6, dtype=np.int64))  # another array, same content
    assert digest(a) == digest(a.copy())
    assert digest(a) != digest(a.astype(np.int32))  # same values, another dtype
    assert digest(a) != digest(a.astype(np.float64))
    assert digest(a) != digest(a.reshape(2, 3))  # same bytes, another shape
    assert digest(a.reshape(2, 3)) != digest(a.reshape(3, 2))
    b = a.copy()
    b[3] = 99
    assert digest(a) != digest(b)  # content
    assert digest(a) != digest(a.tolist())  # an array is not a list
    # by content, not memory layout: a strided view and a Fortran-ordered copy match a C copy
    m2 = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert digest(m2[:, ::2]) == digest(np.ascontiguousarray(m2[:, ::2]))
    assert digest(np.asfortranarray(m2)) == digest(m2)
    # inside containers and kwargs too
    assert digest([a, {"w": m2}], scale=np.float32(2)) == digest(
        [a.copy(), {"w": m2.copy()}], scale=np.float32(2)
    )
    assert digest(np.int64(1)) != digest(np.int32(1))


def test_other_picklable_objects_digest_by_their_pickle():
    assert digest(fractions.Fraction(1, 3)) == digest(fractions.Fraction(2, 6))
    assert digest(fractions.Fraction(1, 3)) != digest(fractions.Fraction(1, 4))


def test_unpicklable_inputs_have_no_digest():
    assert digest(lambda x: x) is None
    assert digest([1, {"f": lambda x: x}]) is None
    assert digest(callback=lambda: None) is None
    assert digest(x for x in range(3)) is None


def test_a_list_shaped_like_a_tag_does_not_collide_with_a_tuple():
    assert digest(["__tuple__", [1, 2]]) != digest((1, 2))


def test_an_object_array_digests_by_its_elements_not_their_addresses():
    inner = [1]
    arr = np.empty(1, dtype=object)
    arr[0] = inner
    before = digest(arr)
    inner.append(2)
    assert digest(arr) != before


# ---- Prometheus text ----------------------------------------------------------------------------

STATUS = {
    "received": 10,
    "finished": 8,
    "duplicates": 1,
    "tasks_open": 2,
    "result_cache": {
        "hits": 3,
        "misses": 5,
        "coalesced": 2,
        "stored": 4,
        "evicted": 1,
        "expired": 0,
        "bytes": 1234,
        "entries": 4,
        "hit_ratio": 0.375,
    },
    "endpoints": {
        "local": {
            "connected": True,
            "info": {
                "workers": 2,
                "queued": 1,
                "batching": {
                    "batch_size_histogram": {"1": 2, "4": 3, "8": 1},
                    "batches": 6,
                    "queue_delay_ms": {"mean": 2.5, "max": 9.0, "count": 4},
                    "waiting": 0,
                },
                "servables": {
                    "jane/vec:1": {
                        "loads": 1,
                        "evictions": 0,
                        "output_cache_hits": 2,
                        "output_cache_misses": 1,
                        "batches": 6,
                        "batched_calls": 20,
                    }
                },
            },
        },
        "down": {"connected": False, "info": {}},
    },
}


def lines(status: dict) -> list[str]:
    return prometheus_text(status).decode().splitlines()


def test_prometheus_text_renders_counters_gauges_and_the_batch_histogram():
    out = lines(STATUS)
    for expected in [
        "dlhub_tasks_received_total 10.0",
        "dlhub_tasks_finished_total 8.0",
        "dlhub_tasks_duplicates_total 1.0",
        "dlhub_tasks_open 2.0",
        "dlhub_result_cache_hits_total 3.0",
        "dlhub_result_cache_misses_total 5.0",
        "dlhub_result_cache_coalesced_total 2.0",
        "dlhub_result_cache_expired_total 0.0",
        "dlhub_result_cache_bytes 1234.0",
        "dlhub_result_cache_entries 4.0",
        'dlhub_endpoint_connected{endpoint="local"} 1.0',
        'dlhub_endpoint_connected{endpoint="down"} 0.0',
        'dlhub_endpoint_workers{endpoint="local"} 2.0',
        'dlhub_endpoint_queued{endpoint="local"} 1.0',
        # cumulative buckets: 2 batches of 1, 3 of 3-4, 1 of 5-8; the sum is the batched calls
        'dlhub_batch_size_bucket{endpoint="local",le="1"} 2.0',
        'dlhub_batch_size_bucket{endpoint="local",le="4"} 5.0',
        'dlhub_batch_size_bucket{endpoint="local",le="8"} 6.0',
        'dlhub_batch_size_bucket{endpoint="local",le="+Inf"} 6.0',
        'dlhub_batch_size_count{endpoint="local"} 6.0',
        'dlhub_batch_size_sum{endpoint="local"} 20.0',
        'dlhub_batch_queue_delay_seconds_count{endpoint="local"} 4.0',
        'dlhub_batch_queue_delay_seconds_sum{endpoint="local"} 0.01',
        'dlhub_servable_loads_total{endpoint="local",servable="jane/vec:1"} 1.0',
        'dlhub_servable_output_cache_hits_total{endpoint="local",servable="jane/vec:1"} 2.0',
        'dlhub_servable_batched_calls_total{endpoint="local",servable="jane/vec:1"} 20.0',
    ]:
        assert expected in out, expected
    assert "# TYPE dlhub_batch_size histogram" in out
    assert "# TYPE dlhub_result_cache_hits_total counter" in out
    # an endpoint without batches has no histogram or delay series
    assert not any('endpoint="down"' in line for line in out if line.startswith("dlhub_batch"))


def test_prometheus_text_of_an_empty_status():
    out = lines({})
    assert "dlhub_tasks_received_total 0.0" in out
    assert "dlhub_result_cache_hits_total 0.0" in out
    assert not any(line.startswith("dlhub_batch_size_bucket") for line in out)


def test_prometheus_text_from_a_real_scheduler_snapshot():
    """The endpoint's heartbeat info is Scheduler.snapshot(): its batching and servable counts
    are what the metrics read."""
    fn = "servable:" + "a" * 64
    s = Scheduler(clock=lambda: 0.0)
    s.add_code({fn: b"\x20"})
    s.set_batching(fn, {"max_batch_size": 4}, "jane/vec:1")
    s.add_pool(b"p:p1", "p1", "0", {})
    s.add_worker(b"w:p1.0", "p1.0", "p1")
    s.add_tasks([m.task_record(n.to_bytes(16, "big"), fn, b"\x01\x90") for n in range(1, 6)])
    s.dispatch()  # a batch of 4; the 5th waits for an idle worker
    s.worker_info(b"w:p1.0", {"servables": {fn: {"loads": 1}}})
    out = lines({"endpoints": {"local": {"connected": True, "info": s.snapshot()}}})
    assert 'dlhub_batch_size_bucket{endpoint="local",le="4"} 1.0' in out
    assert 'dlhub_batch_size_bucket{endpoint="local",le="+Inf"} 1.0' in out
    assert 'dlhub_batch_size_sum{endpoint="local"} 4.0' in out
    assert 'dlhub_endpoint_workers{endpoint="local"} 1.0' in out
    assert 'dlhub_endpoint_queued{endpoint="local"} 1.0' in out
    assert 'dlhub_servable_loads_total{endpoint="local",servable="jane/vec:1"} 1.0' in out
    assert 'dlhub_servable_batches_total{endpoint="local",servable="jane/vec:1"} 1.0' in out
