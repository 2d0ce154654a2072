"""Batching and memoization benchmark: each feature beside the same setting turned off, one run.

Usage: python benchmarks/batching.py [--quick] [--home DIR]

On one local stack that it starts itself (``dlhub up --workers 2 --detach --no-examples`` in a
temp home, or in ``--home``; always stopped at the end) it measures:

1. ``batch_throughput``: predictions/s against the batch size (1, 8, 64, 256, 1024) for the
   scikit-learn RandomForestRegressor example (``build_diabetes_rf(vectorized=True)``: one call is
   one patient, a row of 10 floats) and for a vectorized no-op (returns its inputs). One version
   is published per batch size, with ``batching={"max_batch_size": B, "max_batch_delay_ms": 0}``;
   batch size 1 is the unbatched baseline, and the same servables published not vectorized are a
   second baseline (``B=plain``). Two paths per version: N single calls ``ex.submit(ref, row)``
   submitted at once (the endpoint forms the batches), and ``ex.map(ref, rows, batch_size=B)``
   (explicit batches from the client). Every input is distinct, so the result cache never
   answers. The batch sizes actually formed come from the endpoint's status (``GET
   /api/v1/metrics``: ``batch_size_histogram``, power-of-two buckets, and per version
   ``batches``/``batched_calls``), read after each configuration once the endpoint's heartbeat
   has reported it. ``rf_in_process`` is ``model.predict`` on B rows in this process.
   N = 4,096 calls (or rows) per configuration and round; 512 for the RF at B=1 and not
   vectorized (~5-10 ms of CPU per prediction there). Configurations run in two rounds, the second
   in reverse order; rates are over both rounds.
2. ``cache_latency``: serial calls of a deterministic no-op servable: a manager cache hit (the
   same input every time), a miss with ``with_options(cache=False)``, a miss with a fresh input
   each time (looked up, run, stored), and the raw one-hop limit: a pyzmq REQ/REP round trip to an
   echo server process on 127.0.0.1, from this process; p50/p99, interleaved in blocks.
3. ``cache_throughput``: calls/s of a deterministic servable that sleeps 2 ms, as the share of
   repeated inputs goes 0, 25, 50, 75, 100 % (repeats drawn from a pool of inputs called once
   before, the rest fresh), with the cache on and with ``cache=False``, alternating.

``--quick`` (a smoke run, ~30 s, what CI runs) uses batch sizes 1, 8 and 256, smaller counts, one
round and no batch histograms; every result is still checked against the model's own ``predict``
(or the input, for the no-ops) and a wrong one exits 1. ``--home DIR`` runs the stack
in DIR (which must not have one running; it is stopped but not deleted at the end).

One JSON line per measurement goes to stdout, then a plain-text summary.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _stack import WORKERS, run_bench  # noqa: E402
from _stack import Stack as BenchStack  # noqa: E402
from _stack import ms as _ms  # noqa: E402
from _stack import percentile as _percentile  # noqa: E402
from _stack import stats as _stats  # noqa: E402

BATCH_SIZES = (1, 8, 64, 256, 1024)
SHARES = (0, 25, 50, 75, 100)
FULL = {
    "batch_sizes": BATCH_SIZES,
    "calls": 4096,  # single calls (and map rows) per configuration
    "rf_unbatched_calls": 512,  # RF at B=1 and not vectorized: ~10 ms of CPU per prediction
    "rounds": 2,
    "histograms": ("single", "map"),
    "latency": 2000,
    "latency_warmup": 200,
    "blocks": 10,
    "cache_calls": 2000,
    "pool": 32,
}
QUICK = {
    "batch_sizes": (1, 8, 256),
    "calls": 256,
    "rf_unbatched_calls": 32,
    "rounds": 1,
    "histograms": (),  # no waits for the heartbeat's batch counts
    "latency": 100,
    "latency_warmup": 20,
    "blocks": 4,
    "cache_calls": 100,
    "pool": 16,
}
RESULT_TIMEOUT_S = 300
ECHO_SERVER = r"""
import sys, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.REP)
sock.setsockopt(zmq.LINGER, 0)
port = sock.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
while True:
    msg = sock.recv()
    sock.send(msg)
    if msg == b"stop":
        break
"""


def vnoop(inputs):
    """Vectorized no-op: a list of inputs in, the same list out."""
    return inputs


def noop(x):
    return x


def work2ms(x):
    """A deterministic call with 2 ms of work (a sleep: the two cores stay free)."""
    import time

    time.sleep(0.002)
    return x


class Stack(BenchStack):
    """The shared stack, plus waiting for the endpoint's heartbeat to report batches."""

    def settle(self, expected: dict[str, int], timeout_s: float = 8.0) -> tuple[dict, bool]:
        """The metrics once the endpoint has reported ``expected`` batched calls per version
        (its status comes with the heartbeat, every 2 s); ``(snapshot, False)`` on a timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            snap = self.metrics()
            servables = self.endpoint_info(snap).get("servables", {})
            if all(servables.get(label, {}).get("batched_calls", 0) >= n for label, n in expected.items()):
                return snap, True
            if time.monotonic() > deadline:
                return snap, False
            time.sleep(0.1)

    def publish(self, servable) -> str:
        return self.client.publish(servable)

    def wait_all(self, futures) -> list:
        return [f.result(timeout=RESULT_TIMEOUT_S) for f in futures]


# ---------------------------------------------------------------- 1. batch size


def _hist_diff(after: dict, before: dict) -> dict[str, int]:
    keys = sorted({*after, *before}, key=int)
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    return {k: v for k, v in diff.items() if v}


def measure_batching(stack: Stack, sizes: dict, emit) -> None:
    import io

    import joblib
    import numpy as np
    from sklearn.datasets import load_diabetes

    from dlhub.executor import Servable
    from dlhub.executor.examples import build_diabetes_rf

    t0 = time.perf_counter()
    rf = build_diabetes_rf(vectorized=True, name="diabetes-rf-bench")
    rf_plain = build_diabetes_rf(vectorized=False, name="diabetes-rf-plain-bench")  # same seed
    model = joblib.load(io.BytesIO(rf.files["model.joblib"]))
    x, _ = load_diabetes(return_X_y=True)
    build_s = time.perf_counter() - t0

    # in-process reference: model.predict on B rows in this process (workers idle)
    for b in sizes["batch_sizes"]:
        rows = np.resize(x, (b, x.shape[1]))
        model.predict(rows)
        took = []
        for _ in range(7):
            start = time.perf_counter()
            model.predict(rows)
            took.append(time.perf_counter() - start)
        took.sort()
        emit(
            "rf_in_process",
            f"B={b}",
            rows=b,
            predict_ms=_ms(took[3]),
            predictions_per_s=round(b / took[3], 1),
            note="model.predict(B rows) in this process, median of 7",
        )

    # publish: one vectorized version per batch size, for the RF and the no-op, plus plain ones
    refs: dict[tuple[str, str], str] = {}
    t0 = time.perf_counter()
    for b in sizes["batch_sizes"]:
        record = copy.deepcopy(rf.record)
        record["name"] = f"diabetes-rf-b{b}"
        record["batching"] = {"max_batch_size": b, "max_batch_delay_ms": 0}
        refs["rf", str(b)] = stack.publish(Servable(record, dict(rf.files)))
        refs["noop", str(b)] = stack.publish(
            Servable.from_function(
                vnoop,
                name=f"vnoop-b{b}",
                title=f"Vectorized no-op, batches of up to {b}",
                authors=["dlhub benchmarks"],
                examples=[(([1, 2],), [1, 2])],
                deterministic=True,
                vectorized=True,
                batching={"max_batch_size": b, "max_batch_delay_ms": 0},
            )
        )
    refs["rf", "plain"] = stack.publish(rf_plain)
    refs["noop", "plain"] = stack.publish(
        Servable.from_function(
            noop,
            name="noop-plain-bench",
            title="No-op, not vectorized",
            authors=["dlhub benchmarks"],
            examples=[((1,), 1)],
            deterministic=True,
        )
    )
    emit(
        "setup",
        "batching",
        model_build_s=round(build_s, 3),
        publish_s=round(time.perf_counter() - t0, 3),
        calls=sizes["calls"],
        rf_unbatched_calls=sizes["rf_unbatched_calls"],
        rounds=sizes["rounds"],
    )

    rng = np.random.default_rng(0)
    counter = iter(range(10**9, 2 * 10**9))  # no-op inputs: never the same twice

    def inputs(kind: str, n: int) -> list:
        if kind == "noop":
            return [next(counter) for _ in range(n)]
        rows = x[rng.integers(0, len(x), n)] + rng.normal(0.0, 1e-3, (n, x.shape[1]))
        return rows.tolist()  # one patient per call: a list of 10 floats

    def call_arg(key: tuple[str, str], value):
        return np.asarray([value]) if key == ("rf", "plain") else value  # plain RF: a (1, 10) array

    def check(key: tuple[str, str], sent: list, got: list) -> None:
        if key[0] == "noop":
            ok = got == sent
        else:
            got = np.concatenate([np.ravel(g) for g in got])
            ok = np.allclose(got, model.predict(np.asarray(sent)))
        if not ok:
            raise AssertionError(f"{refs[key]}: wrong results")

    # warm: both workers load every version (a burst of concurrent calls, then one map)
    expected: dict[str, int] = {}  # version -> batched calls the endpoint should have counted
    for key, ref in refs.items():
        for _ in range(2):
            sent = inputs(key[0], 4 * WORKERS)
            check(key, sent, stack.wait_all([stack.ex.submit(ref, call_arg(key, v)) for v in sent]))
            if key[1] != "plain":
                expected[ref] = expected.get(ref, 0) + len(sent)
        if key[1] != "plain":
            sent = inputs(key[0], 2 * int(key[1]))
            check(key, sent, list(stack.ex.map(ref, sent, batch_size=int(key[1]), timeout=RESULT_TIMEOUT_S)))
            expected[ref] += len(sent)
    snap, _ = stack.settle(expected)
    cache_hits_before = (snap.get("result_cache") or {}).get("hits", 0)

    configs = [(("rf", "plain"), "single"), (("noop", "plain"), "single")]
    paths = ("map", "single") if "map" in sizes["histograms"] else ("single",)
    for b in sizes["batch_sizes"]:  # next to each other: the same batch size, single calls and map
        configs += [((kind, str(b)), path) for path in paths for kind in ("rf", "noop")]
    if "map" not in sizes["histograms"]:  # maps last: fewer waits for the heartbeat
        configs += [((kind, str(b)), "map") for b in sizes["batch_sizes"] for kind in ("rf", "noop")]
    elapsed: dict = {}
    done: dict = {}
    rounds: dict = {}
    hists: dict = {}
    settled = True  # ``snap`` holds every batch formed so far
    for r in range(sizes["rounds"]):
        for key, path in configs if r % 2 == 0 else configs[::-1]:
            ref = refs[key]
            # the endpoint reports batches with its heartbeat (2 s): a histogram per configuration
            # costs a wait; --quick takes them for single calls only (map batches are B by design)
            # batch size 1 is no batching: those calls use the endpoint's regular queue
            histogram = key[1] not in ("plain", "1") and path in sizes["histograms"]
            if histogram and not settled:
                snap, _ = stack.settle(expected)
            unbatched = key[0] == "rf" and key[1] in ("1", "plain")
            n = sizes["rf_unbatched_calls"] if unbatched else sizes["calls"]
            sent = inputs(key[0], n)
            args = [call_arg(key, v) for v in sent]
            start = time.perf_counter()
            if path == "single":
                got = stack.wait_all([stack.ex.submit(ref, a) for a in args])
            else:
                got = list(stack.ex.map(ref, args, batch_size=int(key[1]), timeout=RESULT_TIMEOUT_S))
            took = time.perf_counter() - start
            check(key, sent, got)
            elapsed[key, path] = elapsed.get((key, path), 0.0) + took
            done[key, path] = done.get((key, path), 0) + n
            rounds.setdefault((key, path), []).append(round(n / took, 1))
            if key[1] not in ("plain", "1"):
                expected[ref] += n
            settled = key[1] in ("plain", "1")
            if histogram:  # the batches this configuration formed, from the endpoint
                before = stack.endpoint_info(snap).get("batching", {}).get("batch_size_histogram", {})
                snap, fresh = stack.settle(expected)
                settled = True
                after = stack.endpoint_info(snap).get("batching", {}).get("batch_size_histogram", {})
                total = hists.setdefault((key, path), {"hist": {}, "calls": 0, "stale": False})
                for k, v in _hist_diff(after, before).items():
                    total["hist"][k] = total["hist"].get(k, 0) + v
                total["calls"] += n
                total["stale"] |= not fresh
    snap = stack.metrics()
    cache_hits = (snap.get("result_cache") or {}).get("hits", 0) - cache_hits_before
    servables = stack.endpoint_info(snap).get("servables", {})
    for (key, path), took in elapsed.items():
        fields = {}
        if (key, path) in hists:
            hist = hists[key, path]["hist"]
            batches = sum(hist.values())
            fields = {
                "batches": batches,
                "mean_batch": round(hists[key, path]["calls"] / batches, 1) if batches else None,
                "batch_size_histogram": hist,
                "histogram_stale": hists[key, path]["stale"],
            }
        emit(
            "batch_throughput",
            f"{key[0]}/{path}",
            batch=key[1],
            ref=refs[key],
            predictions_per_s=round(done[key, path] / took, 1),
            n=done[key, path],
            round_predictions_per_s=rounds[key, path],
            **fields,
        )
    emit(
        "batch_endpoint_totals",
        "endpoint",
        result_cache_hits_during=cache_hits,
        servables={refs[k]: servables.get(refs[k]) for k in refs if k[1] != "plain"},
        note="per version since publish, warm-up included; result_cache_hits_during should be 0",
    )


# ---------------------------------------------------------------- 2. cache hit latency


def _echo_server() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    port = int(proc.stdout.readline())
    return proc, port


def measure_cache_latency(stack: Stack, sizes: dict, emit) -> None:
    import zmq

    from dlhub.executor.examples import build_noop

    servable = build_noop()  # deterministic=True
    servable.record["name"] = "noop-cache-bench"
    ref = stack.publish(servable)
    fresh = iter(range(3 * 10**9, 4 * 10**9))
    uncached = stack.ex.with_options(cache=False)
    proc, port = _echo_server()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    message = os.urandom(128)  # about the size of a small task record
    try:

        def raw():
            sock.send(message)
            if sock.recv() != message:
                raise AssertionError("the echo server answered something else")

        def checked(ex, value):
            got = ex.submit(ref, value).result(timeout=60)
            if got != value:  # the no-op returns its input
                raise AssertionError(f"{ref}({value!r}) returned {got!r}")

        systems = {
            "hit": lambda: checked(stack.ex, 7),
            "miss_cache_false": lambda: checked(uncached, 7),
            "miss_fresh_input": lambda: checked(stack.ex, next(fresh)),
            "raw_zmq_one_hop": raw,
        }
        for _ in range(sizes["latency_warmup"]):
            for call in systems.values():
                call()
        hits_before = (stack.metrics().get("result_cache") or {}).get("hits", 0)
        n, blocks = sizes["latency"], sizes["blocks"]
        names = list(systems)
        lat: dict[str, list[float]] = {s: [] for s in names}
        block_p50: dict[str, list[float]] = {s: [] for s in names}
        for b in range(blocks):
            order = names[b % len(names) :] + names[: b % len(names)]  # rotate who goes first
            for name in order:
                call, samples = systems[name], []
                for _ in range(n // blocks + (b < n % blocks)):
                    start = time.perf_counter()
                    call()
                    samples.append(time.perf_counter() - start)
                lat[name] += samples
                block_p50[name].append(_ms(_percentile(sorted(samples), 0.5)))
        hits = (stack.metrics().get("result_cache") or {}).get("hits", 0) - hits_before
        sock.send(b"stop")
        sock.recv()
    finally:
        sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    notes = {
        "hit": f"{ref}, the same input every time: the manager answers from its result cache",
        "miss_cache_false": "the same call with with_options(cache=False): runs on a worker",
        "miss_fresh_input": "a new input each call: cache lookup misses, runs on a worker, stored",
        "raw_zmq_one_hop": "pyzmq REQ -> REP echo server process on 127.0.0.1, 128-byte message",
    }
    stats = {name: _stats(samples) for name, samples in lat.items()}
    for name in names:
        extra = {"manager_cache_hits": hits} if name == "hit" else {}
        emit(
            "cache_latency",
            name,
            **stats[name],
            blocks=blocks,
            block_p50_ms=block_p50[name],
            note=notes[name],
            **extra,
        )
    raw_p50 = stats["raw_zmq_one_hop"]["p50_ms"]
    emit(
        "cache_latency_ratio",
        "hit/raw_zmq_one_hop",
        p50_ratio=round(stats["hit"]["p50_ms"] / raw_p50, 2),
        p99_ratio=round(stats["hit"]["p99_ms"] / stats["raw_zmq_one_hop"]["p99_ms"], 2),
        miss_cache_false_over_hit_p50=round(stats["miss_cache_false"]["p50_ms"] / stats["hit"]["p50_ms"], 2),
        target="hit p50 <= 3x raw one-hop p50",
        met=stats["hit"]["p50_ms"] <= 3 * raw_p50,
    )


# ---------------------------------------------------------------- 3. repeated inputs


def measure_cache_throughput(stack: Stack, sizes: dict, emit) -> None:
    from dlhub.executor import Servable

    ref = stack.publish(
        Servable.from_function(
            work2ms,
            name="work2ms-bench",
            title="Sleeps 2 ms, returns its input",
            authors=["dlhub benchmarks"],
            examples=[((1,), 1)],
            deterministic=True,
        )
    )
    pool = list(range(-sizes["pool"], 0))
    stack.wait_all([stack.ex.submit(ref, v) for v in pool])  # the pool's results are now cached
    stack.wait_all(
        [stack.ex.with_options(cache=False).submit(ref, v) for v in range(-100, -100 + 4 * WORKERS)]
    )
    fresh = iter(range(5 * 10**9, 6 * 10**9))
    rnd = random.Random(0)
    n = sizes["cache_calls"]
    for i, share in enumerate(SHARES):
        repeated = round(n * share / 100)
        rates, hits = {}, None
        modes = ("on", "off") if i % 2 == 0 else ("off", "on")
        for mode in modes:
            values = [rnd.choice(pool) for _ in range(repeated)] + [next(fresh) for _ in range(n - repeated)]
            rnd.shuffle(values)
            ex = stack.ex if mode == "on" else stack.ex.with_options(cache=False)
            before = stack.metrics().get("result_cache") or {}
            start = time.perf_counter()
            got = stack.wait_all([ex.submit(ref, v) for v in values])
            took = time.perf_counter() - start
            after = stack.metrics().get("result_cache") or {}
            if got != values:
                raise AssertionError(f"{ref}: wrong results")
            rates[mode] = n / took
            if mode == "on":
                hits = {k: after.get(k, 0) - before.get(k, 0) for k in ("hits", "misses", "coalesced")}
        emit(
            "cache_throughput",
            f"repeat={share}%",
            share_pct=share,
            n=n,
            cache_on_calls_per_s=round(rates["on"], 1),
            cache_off_calls_per_s=round(rates["off"], 1),
            speedup=round(rates["on"] / rates["off"], 2),
            ideal_speedup=round(1 / (1 - share / 100), 2) if share < 100 else None,
            manager_cache=hits,
            order=list(modes),
        )


# ---------------------------------------------------------------- summary


def summary(records: list[dict]) -> str:
    by = {(r["metric"], r["system"], r.get("batch")): r for r in records}

    def get(metric, system, key, batch=None):
        return by.get((metric, system, batch), {}).get(key)

    def fmt(value, spec=".0f"):
        return "n/a" if value is None else format(value, spec)

    setup = by.get(("setup", "batching", None), {})
    lines = [
        f"1. predictions/s vs batch size (2 workers; single = N calls submitted at once, map = "
        f"ex.map(batch_size=B); N = {setup.get('calls')}, RF at B=1/plain {setup.get('rf_unbatched_calls')}; "
        f"{setup.get('rounds')} round(s))",
        f"{'B':>6} {'rf single':>10} {'rf map':>9} {'rf 1 proc':>10} {'noop single':>12} "
        f"{'noop map':>9}  {'rf batches formed (single)':<28} {'noop batches formed (single)':<28}",
    ]
    lines.append("-" * len(lines[-1]))
    for b in ("plain", *map(str, BATCH_SIZES)):
        inproc = get("rf_in_process", f"B={b}", "predictions_per_s")

        def formed(kind, b=b):
            rec = by.get(("batch_throughput", f"{kind}/single", b))
            if not rec or "mean_batch" not in rec:
                return "-"
            hist = rec["batch_size_histogram"]
            top = sorted(hist.items(), key=lambda kv: -kv[1])[:3]
            text = f"mean {fmt(rec['mean_batch'], '.1f')} [" + " ".join(f"{k}:{v}" for k, v in top) + "]"
            return text + ("*" if rec.get("histogram_stale") else "")

        lines.append(
            f"{b:>6} {fmt(get('batch_throughput', 'rf/single', 'predictions_per_s', b)):>10} "
            f"{fmt(get('batch_throughput', 'rf/map', 'predictions_per_s', b)):>9} "
            f"{fmt(inproc):>10} "
            f"{fmt(get('batch_throughput', 'noop/single', 'predictions_per_s', b)):>12} "
            f"{fmt(get('batch_throughput', 'noop/map', 'predictions_per_s', b)):>9}  "
            f"{formed('rf'):<28} {formed('noop'):<28}"
        )
    lines.append(
        "(plain = the same servable not vectorized; rf 1 proc = model.predict on B rows in this "
        "process; batches formed: mean size and the top histogram buckets, bucket:count)"
    )
    for kind, path in (("rf", "single"), ("rf", "map"), ("noop", "single"), ("noop", "map")):
        a = get("batch_throughput", f"{kind}/{path}", "predictions_per_s", "256")
        b1 = get("batch_throughput", f"{kind}/{path}", "predictions_per_s", "1")
        plain = get("batch_throughput", f"{kind}/single", "predictions_per_s", "plain")
        text = f"{kind} {path}: B=256 / B=1 = {fmt(a / b1 if a and b1 else None, '.1f')}x"
        text += f", B=256 / plain = {fmt(a / plain if a and plain else None, '.1f')}x"
        if (kind, path) == ("rf", "single"):
            text += f"  (target >= 50x: {'met' if a and b1 and a / b1 >= 50 else 'NOT met'})"
        lines.append(text)

    lines += ["", "2. serial latency, deterministic no-op (ms)"]
    lines.append(f"{'call':<22} {'p50':>8} {'p99':>8} {'n':>6}")
    lines.append("-" * len(lines[-1]))
    for name in ("hit", "miss_cache_false", "miss_fresh_input", "raw_zmq_one_hop"):
        lines.append(
            f"{name:<22} {fmt(get('cache_latency', name, 'p50_ms'), '.3f'):>8} "
            f"{fmt(get('cache_latency', name, 'p99_ms'), '.3f'):>8} "
            f"{fmt(get('cache_latency', name, 'n'), 'd'):>6}"
        )
    ratio = by.get(("cache_latency_ratio", "hit/raw_zmq_one_hop", None))
    if ratio:
        lines.append(
            f"hit p50 / raw one-hop p50 = {ratio['p50_ratio']:.2f} (target <= 3: "
            f"{'met' if ratio['met'] else 'NOT met'}); miss (cache=False) / hit p50 = "
            f"{ratio['miss_cache_false_over_hit_p50']:.2f}"
        )

    lines += [
        "",
        "3. calls/s of a deterministic 2 ms servable vs share of repeated inputs",
        f"{'repeated':>8} {'cache on':>9} {'cache off':>10} {'speedup':>8} {'ideal':>6}  manager cache (on)",
    ]
    lines.append("-" * len(lines[-1]))
    for share in SHARES:
        rec = by.get(("cache_throughput", f"repeat={share}%", None))
        if not rec:
            continue
        lines.append(
            f"{share:>7}% {fmt(rec['cache_on_calls_per_s']):>9} {fmt(rec['cache_off_calls_per_s']):>10} "
            f"{fmt(rec['speedup'], '.2f'):>8} {fmt(rec['ideal_speedup'], '.2f'):>6}  {rec['manager_cache']}"
        )
    for rec in records:
        if rec["metric"] == "error":
            lines.append(f"ERROR: {rec['error'].splitlines()[-1][:200] if rec['error'] else ''}")
    return "\n".join(lines)


def measure(stack: BenchStack, sizes: dict, emit, args) -> None:
    stack.__class__ = Stack  # the shared stack with this benchmark's helpers
    emit("setup", "stack", up_ready_s=round(stack.up(), 3))
    for part in (measure_batching, measure_cache_latency, measure_cache_throughput):
        t0 = time.perf_counter()
        part(stack, sizes, emit)
        emit("part", part.__name__, wall_s=round(time.perf_counter() - t0, 1))


def main(argv=None) -> int:
    return run_bench("batching", __doc__, FULL, QUICK, measure, summary, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
