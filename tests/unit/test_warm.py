"""What a worker keeps between calls: the WarmServables LRU (by count, by a memory probe, and once
with real memory and the real RSS probe), the OutputCache, and a Worker (never connected) running
vectorized batches and deterministic servables in-process."""

from __future__ import annotations

import gc
import signal
import sys
import textwrap

import pytest

from dlhub.endpoint.servables import cache_root
from dlhub.endpoint.warm import OutputCache, WarmServables, rss_bytes
from dlhub.endpoint.worker import Worker
from dlhub.executor.servable import Servable
from dlhub.protocol import messages as m
from dlhub.protocol.serialize import deserialize, serialize
from dlhub.protocol.servable import pack_package, parse_record, record_digest

META = {"title": "A test servable", "authors": ["Doe, Jane"]}
MB = 2**20

CALLS: list = []  # what the servables below were called with (they run in this process)


def double(x):
    CALLS.append(x)
    return 2 * x


def vdouble(xs):
    """Vectorized: a list in, a list out; one bad input makes the whole call raise."""
    CALLS.append(list(xs))
    if any(x == "bad" for x in xs):
        raise ValueError("bad input")
    return [2 * x for x in xs]


def package(servable: Servable, version: int = 1) -> tuple[str, bytes]:
    """(record digest, package blob), as the repository packs a published version."""
    record = {**servable.record, "owner": "jane", "version": version}
    return record_digest(parse_record(record)), pack_package(record, servable.files, [])


def fn_package(name: str, fn=double, **metadata) -> tuple[str, bytes]:
    return package(Servable.from_function(fn, name=name, **META, **metadata))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Package files under tmp_path; sys.path, package modules and SIGALRM (Worker sets it) undone."""
    monkeypatch.setenv("DLHUB_SERVABLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    alarm = signal.getsignal(signal.SIGALRM)
    CALLS.clear()
    yield
    signal.signal(signal.SIGALRM, alarm)
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]


def quiet(logs: list):
    return logs.append


# ---- WarmServables -----------------------------------------------------------------------------


def test_lru_by_count_evicts_the_least_recently_used_and_reloads_it_from_disk():
    (d1, b1), (d2, b2), (d3, b3) = fn_package("s1"), fn_package("s2"), fn_package("s3")
    logs: list[str] = []
    warm = WarmServables(max_count=2, probe=lambda: 0, log=logs.append)
    assert warm.report() == {}  # nothing happened yet
    assert warm.load(d1, b1)(2) == 4
    warm.load(d2, b2)
    assert (cache_root() / f"{d1}.pkg").read_bytes() == b1  # kept on the node's disk
    assert warm.get(d1) is not None  # s1 used: s2 is now the least recently used
    warm.load(d3, b3)
    assert list(warm.loaded) == [d1, d3] and d2 not in warm
    assert warm.get(d2) is None
    assert len(logs) == 1 and "evicted jane/s2:1" in logs[0] and "over 2 servables" in logs[0]

    report = warm.report()
    assert report["warm"] == [m.RUN_PREFIX + d1, m.RUN_PREFIX + d3]
    assert report["servables"] == {
        m.RUN_PREFIX + d1: {"loads": 1},
        m.RUN_PREFIX + d2: {"loads": 1, "evictions": 1},
        m.RUN_PREFIX + d3: {"loads": 1},
    }
    assert warm.report() == {}  # counts are since the last report

    again = warm.load(d2, None)  # evicted: reloaded from the on-disk copy, no fetch
    assert again(5) == 10 and again.record.name == "s2"
    assert list(warm.loaded) == [d3, d2]  # s1 was the least recently used
    assert warm.report()["servables"] == {
        m.RUN_PREFIX + d2: {"loads": 1},
        m.RUN_PREFIX + d1: {"evictions": 1},
    }


def test_an_evicted_servable_whose_copy_is_gone_names_it():
    d1, b1 = fn_package("s1")
    warm = WarmServables(max_count=1, probe=lambda: 0, log=quiet([]))
    warm.load(d1, b1)
    (cache_root() / f"{d1}.pkg").unlink()
    warm.loaded.clear()
    with pytest.raises(FileNotFoundError, match="evicted and its copy"):
        warm.load(d1, None)


def test_a_probe_over_the_budget_evicts_down_to_one():
    packages = [fn_package(f"s{i}") for i in range(4)]
    logs: list[str] = []
    warm = WarmServables(max_count=16, memory_budget_bytes=100, probe=lambda: 1000, log=logs.append)
    for digest, blob in packages:
        warm.load(digest, blob)
        assert list(warm.loaded) == [digest]  # the newest stays, however much it takes
    assert len(logs) == 3 and all("over the memory budget" in line for line in logs)
    counts = warm.report()["servables"]
    assert sum(c.get("loads", 0) for c in counts.values()) == 4
    assert sum(c.get("evictions", 0) for c in counts.values()) == 3


def test_a_probe_under_the_budget_keeps_everything():
    packages = [fn_package(f"s{i}") for i in range(3)]
    usage = [10]
    warm = WarmServables(max_count=16, memory_budget_bytes=100, probe=lambda: usage[0], log=quiet([]))
    for digest, blob in packages[:2]:
        warm.load(digest, blob)
    assert len(warm.loaded) == 2
    # the third load pushes it over (150): the oldest goes, then it fits (50)
    calls = iter([150, 50])
    warm.probe = lambda: next(calls)
    warm.load(*packages[2])
    assert list(warm.loaded) == [packages[1][0], packages[2][0]]


def _module_servable(tmp_path, module: str, body: str) -> tuple[str, bytes]:
    src = tmp_path / f"src-{module}"
    src.mkdir()
    (src / f"{module}.py").write_text(textwrap.dedent(body))
    return package(
        Servable.from_module(f"{module}:predict", files=[src / f"{module}.py"], name=module, **META)
    )


def test_real_memory_loading_a_second_servable_evicts_the_big_one_and_rss_drops(tmp_path):
    big = _module_servable(
        tmp_path,
        "dlhub_test_bigmod",
        """
        BIG = b"\\x01" * (200 * 2**20)  # written, so resident

        def predict(x):
            return len(BIG) + x
        """,
    )
    small = _module_servable(
        tmp_path,
        "dlhub_test_smallmod",
        """
        def predict(x):
            return x + 1
        """,
    )
    gc.collect()
    baseline = rss_bytes()
    warm = WarmServables(max_count=16, memory_budget_bytes=baseline + 100 * MB, log=quiet([]))
    assert warm.load(*big)(1) == 200 * MB + 1
    loaded_big = rss_bytes()
    assert loaded_big > baseline + 180 * MB
    assert list(warm.loaded) == [big[0]]  # alone it stays, over the budget or not

    assert warm.load(*small)(1) == 2
    gc.collect()
    after = rss_bytes()
    assert list(warm.loaded) == [small[0]]
    assert after < loaded_big - 150 * MB, (baseline // MB, loaded_big // MB, after // MB)
    counts = warm.report()["servables"]
    assert counts[m.RUN_PREFIX + big[0]] == {"loads": 1, "evictions": 1}


def test_real_memory_is_freed_when_a_by_value_servable_replaces_a_module_servable(tmp_path):
    big = _module_servable(
        tmp_path,
        "dlhub_test_bigmod2",
        """
        BIG = b"\\x02" * (200 * 2**20)

        def predict(x):
            return len(BIG) + x
        """,
    )
    small = fn_package("byvalue")
    gc.collect()
    baseline = rss_bytes()
    warm = WarmServables(max_count=16, memory_budget_bytes=baseline + 100 * MB, log=quiet([]))
    warm.load(*big)
    loaded_big = rss_bytes()
    warm.load(*small)
    gc.collect()
    assert list(warm.loaded) == [small[0]]  # evicted...
    assert rss_bytes() < loaded_big - 150 * MB  # ...but is the memory back?


# ---- OutputCache -------------------------------------------------------------------------------


def test_output_cache_is_an_lru_by_bytes():
    cache = OutputCache(max_bytes=10)
    cache.put(("f", "a", "auto"), b"aaaa")
    cache.put(("f", "b", "auto"), b"bbbb")
    assert cache.get(("f", "a", "auto")) == b"aaaa"  # a is the most recent now
    cache.put(("f", "c", "auto"), b"cccc")
    assert list(cache.entries) == [("f", "a", "auto"), ("f", "c", "auto")] and cache.bytes == 8
    assert cache.get(("f", "b", "auto")) is None
    cache.put(("f", "big", "auto"), b"x" * 11)  # larger than the whole cache: not kept
    assert ("f", "big", "auto") not in cache.entries and cache.bytes == 8
    cache.put(("f", "a", "auto"), b"zz")  # held already: unchanged
    assert cache.get(("f", "a", "auto")) == b"aaaa" and cache.bytes == 8


# ---- a Worker, not connected -------------------------------------------------------------------


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def make_worker(config: dict | None = None) -> Worker:
    worker = Worker({"worker_cache": {"max_warm_servables": 4}, **(config or {})}, "w1", "p1")
    worker.warm.log = quiet([])
    return worker


def call(n: int, digest: str, *args, options: dict | None = None) -> list:
    return m.task_record(
        tid(n), m.RUN_PREFIX + digest, serialize([list(args), {}]), None, "auto", None, options
    )


def ok(res: list):
    assert res[m.R_STATE] == "succeeded", res[m.R_ERROR]
    return deserialize(res[m.R_PAYLOAD])


def test_worker_init_only_reads_its_config():
    worker = Worker(
        {"worker_cache": {"max_warm_servables": 3, "memory_budget_mb": 512, "output_cache_mb": 1}}, "w1", "p1"
    )
    assert (worker.warm.max_count, worker.warm.memory_budget_bytes) == (3, 512 * MB)
    assert worker.outputs.max_bytes == MB
    assert not hasattr(worker, "sock")
    defaults = Worker({}, "w2", "p1")
    assert (defaults.warm.max_count, defaults.warm.memory_budget_bytes) == (16, None)
    assert defaults.outputs.max_bytes == 64 * MB


def test_execute_batch_makes_one_vectorized_call_and_splits_the_results_in_order():
    digest, blob = fn_package("vdouble", vdouble, vectorized=True)
    worker = make_worker()
    worker.code[m.RUN_PREFIX + digest] = blob
    results = worker.execute_batch([call(n, digest, n * 10) for n in (1, 2, 3)])
    assert [r[m.R_ID] for r in results] == [tid(1), tid(2), tid(3)]
    assert [ok(r) for r in results] == [20, 40, 60]
    assert CALLS == [[10, 20, 30]]  # one call for the batch
    assert m.RUN_PREFIX + digest not in worker.code  # loaded: the blob is not kept twice
    assert worker.warm.report()["servables"] == {m.RUN_PREFIX + digest: {"loads": 1}}


def test_one_bad_input_fails_only_its_own_task():
    digest, blob = fn_package("vdouble", vdouble, vectorized=True)
    worker = make_worker()
    worker.code[m.RUN_PREFIX + digest] = blob
    results = worker.execute_batch([call(1, digest, 1), call(2, digest, "bad"), call(3, digest, 3)])
    assert [r[m.R_ID] for r in results] == [tid(1), tid(2), tid(3)]
    assert ok(results[0]) == 2 and ok(results[2]) == 6
    assert results[1][m.R_STATE] == "failed"
    assert "ValueError" in str(results[1][m.R_ERROR]) and "bad input" in str(results[1][m.R_ERROR])
    assert CALLS == [[1, "bad", 3], [1], ["bad"], [3]]  # the batch, then each call alone


def test_a_malformed_call_fails_alone_and_the_rest_still_batch():
    digest, blob = fn_package("vdouble", vdouble, vectorized=True)
    worker = make_worker()
    worker.code[m.RUN_PREFIX + digest] = blob
    two_args = call(2, digest, 1, 2)  # a vectorized servable takes one input per call
    results = worker.execute_batch([call(1, digest, 1), two_args, call(3, digest, 3)])
    assert ok(results[0]) == 2 and ok(results[2]) == 6
    assert results[1][m.R_STATE] == "failed" and "one input per call" in str(results[1][m.R_ERROR])
    assert CALLS == [[1, 3]]


def test_an_explicit_client_batch_gets_a_list_back():
    digest, blob = fn_package("vdouble", vdouble, vectorized=True)
    worker = make_worker()
    worker.code[m.RUN_PREFIX + digest] = blob
    explicit = call(2, digest, [1, 2, 3], options={"batch": True, "len": 3})
    results = worker.execute_batch([call(1, digest, 100), explicit, call(3, digest, 7)])
    assert [ok(r) for r in results] == [200, [2, 4, 6], 14]
    assert CALLS == [[100, 1, 2, 3, 7]]
    # alone, through execute() (not part of a batch): still a list
    alone = worker.execute(call(4, digest, [5, 6], options={"batch": True, "len": 2}))
    assert ok(alone) == [10, 12]
    # and an explicit batch with a bad input fails only itself in the fallback
    results = worker.execute_batch(
        [call(5, digest, [1, "bad"], options={"batch": True, "len": 2}), call(6, digest, 4)]
    )
    assert results[0][m.R_STATE] == "failed" and ok(results[1]) == 8


def test_a_single_call_of_a_vectorized_servable_is_a_batch_of_one():
    digest, blob = fn_package("vdouble", vdouble, vectorized=True)
    worker = make_worker()
    worker.code[m.RUN_PREFIX + digest] = blob
    assert ok(worker.execute(call(1, digest, 21))) == 42
    assert CALLS == [[21]]


def test_a_batch_whose_servable_does_not_load_fails_every_call():
    worker = make_worker()
    digest = "f" * 64  # never sent, never on disk
    results = worker.execute_batch([call(1, digest, 1), call(2, digest, 2)])
    assert [r[m.R_STATE] for r in results] == ["failed", "failed"]
    assert [r[m.R_ID] for r in results] == [tid(1), tid(2)]


def test_a_deterministic_servables_repeated_call_is_an_output_cache_hit():
    digest, blob = fn_package("double", double, deterministic=True)
    worker = make_worker()
    worker.code[m.RUN_PREFIX + digest] = blob
    key = "ab" * 32
    assert ok(worker.execute(call(1, digest, 4, options={"key": key}))) == 8
    second = worker.execute(call(2, digest, 4, options={"key": key}))
    assert second[m.R_ID] == tid(2) and ok(second) == 8
    assert CALLS == [4]  # the second came from the cache
    counts = worker.warm.report()["servables"][m.RUN_PREFIX + digest]
    assert counts == {"loads": 1, "output_cache_misses": 1, "output_cache_hits": 1}
    # cache=False runs it; no key: runs it and counts nothing
    assert ok(worker.execute(call(3, digest, 4, options={"key": key, "cache": False}))) == 8
    assert ok(worker.execute(call(4, digest, 4))) == 8
    assert CALLS == [4, 4, 4]
    assert worker.warm.report() == {}
    # another serializer is another entry
    rec = call(5, digest, 4, options={"key": key})._replace(serializer="json")
    assert ok(worker.execute(rec)) == 8 and CALLS == [4, 4, 4, 4]


def test_a_non_deterministic_servable_is_never_served_from_the_output_cache():
    digest, blob = fn_package("double", double)
    worker = make_worker()
    worker.code[m.RUN_PREFIX + digest] = blob
    for n in (1, 2):
        assert ok(worker.execute(call(n, digest, 4, options={"key": "ab" * 32}))) == 8
    assert CALLS == [4, 4] and worker.outputs.entries == {}


def test_an_output_cache_of_zero_bytes_is_off():
    digest, blob = fn_package("double", double, deterministic=True)
    worker = make_worker({"worker_cache": {"output_cache_mb": 0}})
    worker.code[m.RUN_PREFIX + digest] = blob
    for n in (1, 2):
        assert ok(worker.execute(call(n, digest, 4, options={"key": "ab" * 32}))) == 8
    assert CALLS == [4, 4]


def test_a_deterministic_vectorized_servable_uses_the_output_cache():
    digest, blob = fn_package("vdouble", vdouble, vectorized=True, deterministic=True)
    worker = make_worker()
    worker.code[m.RUN_PREFIX + digest] = blob
    for n in (1, 2):
        assert ok(worker.execute(call(n, digest, 4, options={"key": "ab" * 32}))) == 8
    assert CALLS == [[4]]


def test_the_worker_evicts_by_count_and_reloads_from_disk():
    packages = [fn_package(f"s{i}") for i in range(3)]
    worker = make_worker({"worker_cache": {"max_warm_servables": 2}})
    for n, (digest, blob) in enumerate(packages):
        worker.code[m.RUN_PREFIX + digest] = blob
        assert ok(worker.execute(call(n, digest, n))) == 2 * n
    assert packages[0][0] not in worker.warm
    # the first again: no blob in worker.code any more, reloaded from the node's disk
    assert ok(worker.execute(call(9, packages[0][0], 9))) == 18
    counts = worker.warm.report()["servables"]
    assert counts[m.RUN_PREFIX + packages[0][0]] == {"loads": 2, "evictions": 1}
