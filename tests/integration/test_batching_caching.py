"""Batching of vectorized servables and caching of deterministic ones, end to end.

- The session stack (``dlhub up``: manager + ``local`` endpoint with 2 workers): the endpoint
  batches queued calls of a vectorized servable, a failing batch falls back to one call per input,
  explicit client batches (``ex.map(..., batch_size=N)``), the manager's result cache with
  in-flight coalescing, invalidation by version, the REST ``cache`` flag, metrics and
  ``dlhub status``.
- Private stacks (an in-process manager + an endpoint subprocess with its own config): the
  result cache across a manager restart (``persist_result_cache``), and the workers' warm LRU.

Executions are observed through a log file: each servable is a closure over a path in
``tmp_path`` and appends one line per call (workers run on this machine). Functions published by
value import what they need inside their bodies.
"""

from __future__ import annotations

import random
import re
import uuid
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from conftest import RESULT_TIMEOUT_S, meta, read_json, wait_until

from dlhub.executor import Client, Servable

OWNER = "admin"  # the user of the token `dlhub up` writes
SLOW_S = 0.5  # how long the "expensive" deterministic servables take

# ---- functions published by value (closures over a log file) ------------------------------------


def vectorized_affine(log: str, factor: int, offset: int):
    """A vectorized servable: ``factor * x + offset`` for each input; logs each call's size."""

    def affine(xs):
        with open(log, "a") as f:
            f.write(f"{len(xs)}\n")
        return [factor * x + offset for x in xs]

    return affine


def vectorized_halve_non_negative(log: str):
    """Vectorized; the whole call raises when any input is negative."""

    def halve(xs):
        with open(log, "a") as f:
            f.write(" ".join(str(x) for x in xs) + "\n")
        for x in xs:
            if x < 0:
                raise ValueError(f"negative input: {x}")
        return [x / 2 for x in xs]

    return halve


def slow_square(log: str, seconds: float):
    """Takes ``seconds`` and logs each execution."""

    def square(x):
        import time

        with open(log, "a") as f:
            f.write(f"{x}\n")
        time.sleep(seconds)
        return x * x

    return square


def logged_add(log: str, delta: int, tag: str):
    def add(x):
        with open(log, "a") as f:
            f.write(f"{tag} {x}\n")
        return x + delta

    return add


# ---- fixtures and helpers ------------------------------------------------------------------------


def log_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def batch_sizes(path: Path) -> list[int]:
    return [int(line) for line in log_lines(path)]


def metrics(http: httpx.Client, auth: dict) -> dict:
    r = http.get("/api/v1/metrics", headers=auth)
    assert r.status_code == 200, r.text
    return r.json()


def servable_stats(http: httpx.Client, auth: dict, endpoint: str, ref: str) -> dict:
    info = metrics(http, auth)["endpoints"].get(endpoint, {}).get("info") or {}
    return (info.get("servables") or {}).get(ref) or {}


# ---- 1. batching of a vectorized servable --------------------------------------------------------


def test_concurrent_calls_of_a_vectorized_servable_run_in_batches(client, ex, stack, rest, name, tmp_path):
    log = tmp_path / "calls.log"
    servable = Servable.from_function(
        vectorized_affine(str(log), 3, 1),
        **meta(name, vectorized=True, batching={"max_batch_size": 64, "max_batch_delay_ms": 20}),
    )
    ref = client.publish(servable)
    inputs = list(range(300))
    random.Random(7).shuffle(inputs)
    futures = [ex.submit(f"{OWNER}/{name}", x) for x in inputs]
    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [3 * x + 1 for x in inputs]

    sizes = batch_sizes(log)
    assert sum(sizes) == 300, sizes  # every input ran exactly once
    assert len(sizes) < 300 and max(sizes) > 1, sizes
    assert max(sizes) <= 64, sizes

    # the endpoint reports its batches (refreshed each heartbeat): in status.json and the metrics
    def batched_status():
        status = read_json(stack.endpoint_dir / "status.json")
        stats = (status.get("servables") or {}).get(ref) or {}
        return status if stats.get("batched_calls") == 300 else None

    status = wait_until(batched_status, 15, interval=0.1, what="status.json to show the batches")
    histogram = {int(k): v for k, v in status["batching"]["batch_size_histogram"].items()}
    assert any(size > 1 and count > 0 for size, count in histogram.items()), histogram
    assert status["servables"][ref]["batches"] == len(sizes)

    http, auth = rest
    stats = wait_until(
        lambda: (s := servable_stats(http, auth, "local", ref)).get("batched_calls") == 300 and s,
        15,
        interval=0.1,
        what="the manager's metrics to show the batches",
    )
    assert stats["batches"] == len(sizes)
    info = metrics(http, auth)["endpoints"]["local"]["info"]
    assert any(int(k) > 1 for k in info["batching"]["batch_size_histogram"])


def test_a_failing_batch_fails_only_the_guilty_calls(client, ex, name, tmp_path):
    log = tmp_path / "calls.log"
    servable = Servable.from_function(
        vectorized_halve_non_negative(str(log)),
        **meta(name, vectorized=True, batching={"max_batch_size": 32, "max_batch_delay_ms": 50}),
    )
    client.publish(servable)
    inputs = [x if x % 7 else -x - 1 for x in range(40)]  # every 7th input negative
    random.Random(3).shuffle(inputs)
    futures = {x: ex.submit(f"{OWNER}/{name}", x) for x in inputs}
    negatives = sorted(x for x in inputs if x < 0)
    assert len(negatives) == 6
    for x, fut in futures.items():
        if x < 0:
            with pytest.raises(ValueError, match=rf"^negative input: {x}$"):
                fut.result(RESULT_TIMEOUT_S)
        else:
            assert fut.result(RESULT_TIMEOUT_S) == x / 2
    calls = [[int(x) for x in line.split()] for line in log_lines(log)]
    # a real batch held a negative input (and failed) ...
    failed = [call for call in calls if len(call) > 1 and any(x < 0 for x in call)]
    assert failed, calls
    # ... then each of its calls ran alone: the negative ones failed by themselves
    alone = {call[0] for call in calls if len(call) == 1}
    assert set(negatives) <= alone, calls
    assert {x for call in failed for x in call} <= alone, calls


def test_explicit_client_batches_reach_the_function_whole(client, ex, name, tmp_path):
    log = tmp_path / "calls.log"
    servable = Servable.from_function(
        vectorized_affine(str(log), 2, 0),
        **meta(name, vectorized=True, batching={"max_batch_size": 100}),
    )
    client.publish(servable)
    results = list(ex.map(f"{OWNER}/{name}", range(1000), batch_size=100, timeout=RESULT_TIMEOUT_S))
    assert results == [2 * x for x in range(1000)]
    assert batch_sizes(log) == [100] * 10


# ---- 2. the manager's result cache ---------------------------------------------------------------


def test_identical_calls_of_a_deterministic_servable_run_once(client, ex, rest, name, tmp_path):
    http, auth = rest
    log = tmp_path / "calls.log"
    client.publish(Servable.from_function(slow_square(str(log), SLOW_S), **meta(name, deterministic=True)))
    ref = f"{OWNER}/{name}"
    before = metrics(http, auth)["result_cache"]

    futures = [ex.submit(ref, 7) for _ in range(10)]
    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [49] * 10
    assert log_lines(log) == ["7"]  # one execution; the other nine waited for it
    after = metrics(http, auth)["result_cache"]
    assert after["coalesced"] - before["coalesced"] == 9
    assert after["stored"] - before["stored"] >= 1

    hit = ex.submit(ref, 7)
    assert hit.result(RESULT_TIMEOUT_S) == 49
    assert log_lines(log) == ["7"]  # not run again
    assert metrics(http, auth)["result_cache"]["hits"] == after["hits"] + 1
    # answered by the manager: never dispatched to the endpoint, no worker time in its record
    info = ex.task_info(hit)
    assert info["state"] == "succeeded" and info["t_dispatched"] is None, info
    assert info["t_started"] == info["t_finished"] == info["t_received"], info

    assert ex.with_options(cache=False).submit(ref, 7).result(RESULT_TIMEOUT_S) == 49
    assert log_lines(log) == ["7", "7"]
    assert ex.submit(ref, 8).result(RESULT_TIMEOUT_S) == 64  # other inputs: another entry
    assert log_lines(log) == ["7", "7", "8"]


def test_identical_calls_of_a_non_deterministic_servable_each_run(client, ex, name, tmp_path):
    log = tmp_path / "calls.log"
    client.publish(Servable.from_function(slow_square(str(log), 0.1), **meta(name)))
    futures = [ex.submit(f"{OWNER}/{name}", 5) for _ in range(5)]
    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [25] * 5
    assert log_lines(log) == ["5"] * 5


def test_a_new_version_is_not_answered_from_the_old_versions_cache(client, ex, name, tmp_path):
    log = tmp_path / "calls.log"
    base = f"{OWNER}/{name}"
    v1 = Servable.from_function(logged_add(str(log), 1, "v1"), **meta(name, deterministic=True))
    assert client.publish(v1) == f"{base}:1"
    assert ex.submit(base, 5).result(RESULT_TIMEOUT_S) == 6
    assert ex.submit(base, 5).result(RESULT_TIMEOUT_S) == 6
    assert log_lines(log) == ["v1 5"]  # the second came from the cache

    v2 = Servable.from_function(logged_add(str(log), 2, "v2"), **meta(name, deterministic=True))
    assert client.publish(v2) == f"{base}:2"
    assert ex.submit(base, 5).result(RESULT_TIMEOUT_S) == 7
    assert ex.submit(f"{base}:latest", 5).result(RESULT_TIMEOUT_S) == 7
    assert ex.submit(f"{base}:2", 5).result(RESULT_TIMEOUT_S) == 7
    assert ex.submit(f"{base}:1", 5).result(RESULT_TIMEOUT_S) == 6
    assert log_lines(log) == ["v1 5", "v2 5"]  # v2 ran once; v1's pinned call stayed cached


# ---- 3. the result cache across a manager restart --------------------------------------------


def restart_manager(cs, **manager_kwargs) -> None:
    """Stop the custom stack's in-process manager and start a new one on the same home and
    ports; wait until the endpoint (which stays up) has registered with it again."""
    from dlhub.manager import Manager, ManagerConfig

    for executor in cs.executors:
        executor.shutdown(wait=False)
    cs.executors.clear()
    old = cs.manager
    client_port = urlparse(old.client_url).port
    endpoint_port = urlparse(old.endpoint_url).port
    old.stop()
    config = ManagerConfig(
        home=cs.home / "manager", client_port=client_port, endpoint_port=endpoint_port, **manager_kwargs
    )
    new = Manager(config)
    new.start_thread()
    cs.manager = new  # the fixture's teardown stops this one
    wait_until(
        lambda: new.status()["endpoints"].get(cs.endpoint_name, {}).get("connected"),
        30,
        interval=0.1,
        what="the endpoint to register with the restarted manager",
    )


def test_result_cache_is_kept_across_a_restart_only_when_persisted(custom_stack_factory, tmp_path):
    # the workers' own output cache is off: only the manager's cache can spare an execution
    cs = custom_stack_factory(
        endpoint={"heartbeat_s": 0.5, "worker_cache": {"output_cache_mb": 0}},
        workers=1,
        manager_kwargs={"persist_result_cache": True},
    )
    log = tmp_path / "calls.log"
    name = f"persisted-{uuid.uuid4().hex[:6]}"
    ref = f"{OWNER}/{name}"
    with Client(cs.manager.api.url, cs.token, home=str(cs.home)) as c:
        c.publish(Servable.from_function(logged_add(str(log), 10, "run"), **meta(name, deterministic=True)))

    def call(x: int) -> int:
        ex = cs.executors[-1] if cs.executors else cs.executor()  # one per manager run
        return ex.submit(ref, x).result(RESULT_TIMEOUT_S)

    assert call(3) == 13
    assert call(3) == 13
    assert log_lines(log) == ["run 3"]

    restart_manager(cs, persist_result_cache=True)
    assert cs.manager.status()["result_cache"]["entries"] >= 1
    assert call(3) == 13
    assert log_lines(log) == ["run 3"]  # answered from the restored cache

    # the default: the cache lives in memory only
    restart_manager(cs)
    assert cs.manager.status()["result_cache"]["entries"] == 0
    assert call(3) == 13
    assert log_lines(log) == ["run 3", "run 3"]
    assert call(4) == 14
    assert call(4) == 14
    assert log_lines(log) == ["run 3", "run 3", "run 4"]
    restart_manager(cs)
    assert call(4) == 14
    assert log_lines(log) == ["run 3", "run 3", "run 4", "run 4"]


# ---- 4. warm servables: LRU eviction at the worker -----------------------------------------------


def test_warm_lru_evicts_and_reloads_servables(custom_stack_factory, tmp_path):
    cs = custom_stack_factory(
        endpoint={"heartbeat_s": 0.5, "worker_cache": {"max_warm_servables": 1}}, workers=1
    )
    log = tmp_path / "calls.log"
    a, b = (f"lru-{tag}-{uuid.uuid4().hex[:6]}" for tag in ("a", "b"))
    with Client(cs.manager.api.url, cs.token, home=str(cs.home)) as c:
        ref_a = c.publish(Servable.from_function(logged_add(str(log), 1, "a"), **meta(a)))
        ref_b = c.publish(Servable.from_function(logged_add(str(log), 100, "b"), **meta(b)))
    ex = cs.executor()
    http = httpx.Client(base_url=cs.manager.api.url, timeout=RESULT_TIMEOUT_S)
    auth = {"Authorization": f"Bearer {cs.token}"}

    def counts() -> tuple[int, int, int, int]:
        sa = servable_stats(http, auth, cs.endpoint_name, ref_a)
        sb = servable_stats(http, auth, cs.endpoint_name, ref_b)
        return sa.get("loads", 0), sa.get("evictions", 0), sb.get("loads", 0), sb.get("evictions", 0)

    try:
        # verifying each version loaded it on the one worker (B's load evicted A): let those
        # counts reach the metrics (each heartbeat) before counting what the calls do
        before = wait_until(
            lambda: (c := counts())[0] >= 1 and c[1] >= 1 and c[2] >= 1 and c,
            15,
            interval=0.1,
            what="the verification loads in the metrics",
        )
        assert ex.submit(f"{OWNER}/{a}", 1).result(RESULT_TIMEOUT_S) == 2  # loads A, evicts B
        assert ex.submit(f"{OWNER}/{b}", 1).result(RESULT_TIMEOUT_S) == 101  # loads B, evicts A
        assert ex.submit(f"{OWNER}/{a}", 2).result(RESULT_TIMEOUT_S) == 3  # loads A again, evicts B
        assert log_lines(log) == ["a 1", "b 1", "a 2"]

        expected = (before[0] + 2, before[1] + 1, before[2] + 1, before[3] + 2)
        wait_until(lambda: counts() == expected, 15, interval=0.1, what=f"warm counts {expected}")
        # one worker, one warm slot: verification loaded A, then B (evicting A); the three calls
        # loaded A, B, A again, each evicting the other
        assert before == (1, 1, 1, 0) and expected == (3, 2, 2, 2), (before, expected)
        loads_a, evictions_a = expected[:2]

        # the endpoint's status.json shows the same counts
        status = cs.status().get("servables") or {}
        assert (status[ref_a]["loads"], status[ref_a]["evictions"]) == (loads_a, evictions_a)
        assert ex.submit(f"{OWNER}/{b}", 5).result(RESULT_TIMEOUT_S) == 105
        assert ex.submit(f"{OWNER}/{a}", 5).result(RESULT_TIMEOUT_S) == 6
    finally:
        http.close()


# ---- 5. REST, metrics and `dlhub status` -------------------------------------------------------


def test_rest_cache_flag_metrics_and_status(client, ex, stack, rest, name, tmp_path):
    http, auth = rest
    log = tmp_path / "calls.log"
    client.publish(Servable.from_function(logged_add(str(log), 1, "run"), **meta(name, deterministic=True)))
    url = f"/api/v1/servables/{OWNER}/{name}/run"

    r = http.post(url, json={"args": [41]}, headers=auth)
    assert r.status_code == 200 and r.json()["result"] == 42, r.text
    r = http.post(url, json={"args": [41]}, headers=auth)
    assert r.status_code == 200 and r.json()["result"] == 42, r.text
    assert log_lines(log) == ["run 41"]  # the second came from the cache
    r = http.post(url, json={"args": [41], "cache": False}, headers=auth)
    assert r.status_code == 200 and r.json()["result"] == 42, r.text
    assert log_lines(log) == ["run 41", "run 41"]

    # a batch of a vectorized servable, so the endpoint has a batch-size histogram to report
    vec = f"{name}-vec"
    client.publish(
        Servable.from_function(
            vectorized_affine(str(tmp_path / "vec.log"), 1, 0),
            **meta(vec, vectorized=True, batching={"max_batch_size": 8, "max_batch_delay_ms": 20}),
        )
    )
    assert list(ex.map(f"{OWNER}/{vec}", range(16), batch_size=4, timeout=RESULT_TIMEOUT_S)) == list(
        range(16)
    )
    wait_until(
        lambda: servable_stats(http, auth, "local", f"{OWNER}/{vec}:1").get("batched_calls") == 16,
        15,
        interval=0.1,
        what="the batches in the metrics",
    )

    assert http.get("/api/v1/metrics").status_code == 401
    assert http.get("/metrics").status_code == 401
    assert http.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = http.get("/metrics", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert re.search(r"^dlhub_result_cache_hits_total \d", text, re.M), text
    assert re.search(r'^dlhub_batch_size_bucket\{endpoint="local",le="\+Inf"\} \d', text, re.M), text
    hits = float(re.search(r"^dlhub_result_cache_hits_total (\S+)", text, re.M).group(1))
    assert hits >= 1

    p = stack.cli("status")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^result cache\s+\d+ entries, [\d,]+ bytes, hits [1-9]", p.stdout, re.M), p.stdout
    assert "batches" in p.stdout
