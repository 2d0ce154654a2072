"""Servable benchmark: calling a published servable by name vs sending the function by value.

Usage: python benchmarks/servables.py [--quick] [--n 2000] [--home DIR]

On one local stack that it starts itself (``dlhub up --workers 2 --detach --no-examples`` in a
temp home, or in ``--home``; always stopped at the end) it measures:

1. ``noop_latency``: serial no-op calls, ``ex.submit(noop, 1)`` (by value) vs
   ``ex.submit("admin/noop-bench", 1)`` (the same function published with
   ``Servable.from_function``); p50/p99 over N calls each, taken in alternating blocks so that
   machine noise hits both alike.
2. ``noop_throughput``: 20,000 no-op calls submitted at once, then waited for; by value and by
   name alternate, two rounds each.
3. The scikit-learn RandomForestRegressor example (``build_diabetes_rf(vectorized=False)``, 100 trees, a 4 MB
   package), called by name with one row:

   - ``rf_cold_first_call``: the first call on a stack that never ran it (see COLD_NOTE: the stack
     is restarted and every cached copy outside the manager's DB deleted), median of 5 restarts,
     with a breakdown from the manager's task record;
   - ``rf_cold_fresh_process``: the in-process counterpart, a new Python process that imports
     scikit-learn, joblib-loads the same model file and predicts (run after each cold call);
   - ``rf_first_call_after_publish``: a new version's first call on the warm stack;
   - ``rf_warm_latency`` (serial, after every worker has loaded it) by name and, as the by-value
     baseline, a closure over the same model sent by value; plus the in-process baseline
     ``rf_predict`` (the same model's ``predict`` in this process); the three in alternating
     blocks.

``--quick`` (a smoke run, about 25 s) uses smaller sizes and one restart; ``--n`` sets the number
of serial no-op calls per system; ``--home DIR`` runs the stack in DIR (which must not have one
running; it is stopped but not deleted at the end) instead of a temp dir.

One JSON line per measurement goes to stdout, then a plain-text summary.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _stack import Stack as BenchStack  # noqa: E402
from _stack import median as _median  # noqa: E402
from _stack import ms as _ms  # noqa: E402
from _stack import percentile as _percentile  # noqa: E402
from _stack import run_bench  # noqa: E402
from _stack import stats as _stats  # noqa: E402

OWNER = "admin"
NOOP_NAME = "noop-bench"
RF_NAME = "diabetes-rf-bench"
FULL = {
    "warmup": 200,
    "latency": 2000,
    "blocks": 10,
    "throughput": 20_000,
    "rounds": 2,
    "cold": 5,
    "after_publish": 3,
    "warm": 200,
    "warm_blocks": 10,
}
QUICK = {
    "warmup": 20,
    "latency": 100,
    "blocks": 4,
    "throughput": 1000,
    "rounds": 2,
    "cold": 1,
    "after_publish": 1,
    "warm": 20,
    "warm_blocks": 2,
}
COLD_NOTE = (
    "first call of a published version on a stack that never ran it: `dlhub down`, delete the "
    "endpoint's package cache (HOME/endpoints/local/servables) and the workers' unpack cache "
    "(DLHUB_SERVABLE_CACHE), `dlhub up` (same manager DB), warm the stack with by-value and "
    "by-name no-op calls, then time one call: name resolution, package fetch from the manager's "
    "DB, endpoint disk write, worker unpack, import of scikit-learn and joblib load in a fresh "
    "worker process, predict on one row; median over the restarts"
)
FRESH_PROCESS_NOTE = (
    "the same model file in a new Python process: import numpy, joblib and sklearn.ensemble, "
    "joblib.load, predict one row; timed inside the process (interpreter start-up and loading "
    "the data set excluded), right after each cold call"
)
AFTER_PUBLISH_NOTE = (
    "a new version published on the warm stack (its verification already brought the package "
    "to the endpoint and loaded it on one worker under the verify: key), then its first call "
    "by name; median over the versions"
)


def noop(x=None):
    return x


class Stack(BenchStack):
    """The shared stack, plus dropping cached packages (cold calls) and small call helpers. Its
    Executor bypasses the result caches: this benchmark measures serving, not memoization."""

    def up(self) -> float:
        took = super().up()
        self.ex.cache = False
        return took

    def forget_packages(self) -> None:
        """Delete every cached copy of servable packages outside the manager's DB."""
        shutil.rmtree(self.home / "endpoints" / "local" / "servables", ignore_errors=True)
        shutil.rmtree(self.unpack_cache, ignore_errors=True)

    def call(self, fn, *args):
        return self.ex.submit(fn, *args).result(timeout=120)

    def run_many(self, fn, n: int) -> None:
        """``n`` no-op calls ``fn(1)`` at once; raises unless every one returned 1."""
        submit = self.ex.submit
        futures = [submit(fn, 1) for _ in range(n)]
        results = [fut.result(timeout=300) for fut in futures]
        if results != [1] * n:
            raise AssertionError(f"{fn}: {sum(r != 1 for r in results)} of {n} results wrong")


def expect(value, expected, what: str) -> None:
    """A wrong result fails the run (exit status 1), whatever the timings."""
    import numpy as np

    if not np.allclose(value, expected):
        raise AssertionError(f"{what} returned {value!r}, expected {expected!r}")


# ---------------------------------------------------------------- measurements


def measure(stack: Stack, sizes: dict, emit) -> None:
    import numpy as np
    from sklearn.datasets import load_diabetes

    from dlhub.executor import Servable
    from dlhub.executor.examples import build_diabetes_rf

    up_s = stack.up()
    t0 = time.perf_counter()
    noop_servable = Servable.from_function(
        noop,
        name=NOOP_NAME,
        title="No-op for the servables benchmark",
        authors=["dlhub benchmarks"],
        examples=[((1,), 1)],
    )
    noop_ref = stack.client.publish(noop_servable)
    noop_publish_s = time.perf_counter() - t0
    by_name = f"{OWNER}/{NOOP_NAME}"
    emit("setup", "stack", up_ready_s=round(up_s, 3), noop_publish_s=round(noop_publish_s, 3), ref=noop_ref)

    # 1. serial latency, by value and by name in alternating blocks
    for _ in range(sizes["warmup"]):
        expect(stack.call(noop, 1), 1, "noop by value")
        expect(stack.call(by_name, 1), 1, by_name)
    n, blocks = sizes["latency"], sizes["blocks"]
    lat: dict[str, list[float]] = {"by_value": [], "by_name": []}
    block_p50: dict[str, list[float]] = {"by_value": [], "by_name": []}
    for b in range(blocks):
        order = (("by_value", noop), ("by_name", by_name))
        for system, fn in order if b % 2 == 0 else order[::-1]:
            samples, results = [], []
            for _ in range(n // blocks + (b < n % blocks)):  # the blocks add up to n
                start = time.perf_counter()
                results.append(stack.call(fn, 1))
                samples.append(time.perf_counter() - start)
            if results != [1] * len(results):
                raise AssertionError(f"{system}: wrong results among {len(results)} serial no-op calls")
            lat[system] += samples
            block_p50[system].append(_ms(_percentile(sorted(samples), 0.5)))
    stats = {s: _stats(v) for s, v in lat.items()}
    for system in ("by_value", "by_name"):
        emit("noop_latency", system, **stats[system], blocks=blocks, block_p50_ms=block_p50[system])
    emit(
        "noop_latency_ratio",
        "by_name/by_value",
        p50_ratio=round(stats["by_name"]["p50_ms"] / stats["by_value"]["p50_ms"], 3),
        p99_ratio=round(stats["by_name"]["p99_ms"] / stats["by_value"]["p99_ms"], 3),
    )

    # 2. throughput: submit all, then wait for all; alternate rounds
    total = sizes["throughput"]
    rates: dict[str, list[float]] = {"by_value": [], "by_name": []}
    elapsed = {"by_value": 0.0, "by_name": 0.0}
    for r in range(sizes["rounds"]):
        order = (("by_value", noop), ("by_name", by_name))
        for system, fn in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            stack.run_many(fn, total)
            took = time.perf_counter() - start
            elapsed[system] += took
            rates[system].append(round(total / took, 1))
    tput = {s: total * sizes["rounds"] / elapsed[s] for s in elapsed}
    for system in ("by_value", "by_name"):
        emit(
            "noop_throughput",
            system,
            tasks_per_s=round(tput[system], 1),
            n=total,
            rounds=sizes["rounds"],
            round_tasks_per_s=rates[system],
        )
    emit("noop_throughput_ratio", "by_name/by_value", ratio=round(tput["by_name"] / tput["by_value"], 3))

    # 3. the random forest: in-process baseline, cold, first call after publish, warm
    t0 = time.perf_counter()
    rf = build_diabetes_rf(vectorized=False, name=RF_NAME)  # rows in, like the by-value closure
    build_s = time.perf_counter() - t0
    import joblib

    model = joblib.load(io.BytesIO(rf.files["model.joblib"]))  # the very bytes that get published
    model_path = stack.home / "bench-model.joblib"
    model_path.write_bytes(rf.files["model.joblib"])
    x, _ = load_diabetes(return_X_y=True)
    row = np.ascontiguousarray(x[:1])
    expected = model.predict(row)

    t0 = time.perf_counter()
    rf_ref = stack.client.publish(rf)
    publish_s = time.perf_counter() - t0
    emit("setup", "rf", model_build_s=round(build_s, 3), publish_s=round(publish_s, 3), ref=rf_ref)
    rf_pinned = rf_ref  # admin/diabetes-rf-bench:1: the version every cold and warm call runs

    cold, cold_parts, restarts, fresh_process = [], [], [], []
    for _ in range(sizes["cold"]):
        stack.down()
        stack.forget_packages()
        restarts.append(round(stack.up(), 3))
        # both workers up and warm for plain calls, the manager's DB and resolver warm
        for fut in [stack.ex.submit(noop, 1) for _ in range(50)]:
            fut.result(timeout=120)
        stack.call(by_name, 1)
        submitted = time.time()
        start = time.perf_counter()
        fut = stack.ex.submit(rf_pinned, row)
        value = fut.result(timeout=300)
        cold.append(time.perf_counter() - start)
        returned = time.time()
        if not np.allclose(value, expected):
            raise AssertionError(f"{rf_pinned} returned {value!r}, expected {expected!r}")
        cold_parts.append(_breakdown(stack.ex.task_info(fut), submitted, returned))
        fresh_process.append(_fresh_process_predict(model_path))  # same machine state, no stack work
    parts = {k: _ms(_median([p[k] for p in cold_parts])) for k in cold_parts[0]} if cold_parts else {}
    emit(
        "rf_cold_first_call",
        "by_name",
        p50_ms=_ms(_median(cold)),
        samples_ms=[_ms(s) for s in cold],
        n=len(cold),
        median_breakdown_ms=parts,
        restart_up_ready_s=restarts,
        note=COLD_NOTE,
    )
    emit(
        "rf_cold_fresh_process",
        "in_process",
        p50_ms=_ms(_median([f["total"] for f in fresh_process])),
        samples_ms=[_ms(f["total"]) for f in fresh_process],
        n=len(fresh_process),
        median_breakdown_ms={k: _ms(_median([f[k] for f in fresh_process])) for k in fresh_process[0]},
        note=FRESH_PROCESS_NOTE,
    )

    after = []
    for _ in range(sizes["after_publish"]):
        rf.record["description"] += " "  # a new record digest: a new version and package
        rf.validate()
        ref = stack.client.publish(rf)
        start = time.perf_counter()
        value = stack.call(ref, row)
        after.append(time.perf_counter() - start)
        expect(value, expected, ref)
    emit(
        "rf_first_call_after_publish",
        "by_name",
        p50_ms=_ms(_median(after)),
        samples_ms=[_ms(s) for s in after],
        n=len(after),
        note=AFTER_PUBLISH_NOTE,
    )

    # warm: by name, the same model's predict sent by value, and in-process, in alternating
    # blocks; first make sure every worker has loaded both (20 calls each at once)
    by_value_predict = _predict_by_value(model)
    for fut in [stack.ex.submit(f, row) for f in (rf_pinned, by_value_predict) for _ in range(20)]:
        expect(fut.result(timeout=120), expected, "the warm-up predictions")
    for _ in range(20):
        model.predict(row)
    calls = {
        "by_name": lambda: stack.ex.submit(rf_pinned, row),
        "by_value": lambda: stack.ex.submit(by_value_predict, row),
        "in_process": lambda: model.predict(row),
    }
    order = list(calls)
    blocks = max(1, min(sizes["warm_blocks"], sizes["warm"]))
    warm: dict[str, list[float]] = {k: [] for k in calls}
    futs: dict[str, list] = {"by_name": [], "by_value": []}
    for b in range(blocks):
        for system in order if b % 2 == 0 else order[::-1]:
            call = calls[system]
            for _ in range(sizes["warm"] // blocks + (b < sizes["warm"] % blocks)):
                start = time.perf_counter()
                fut = call()
                if system != "in_process":
                    fut.result(timeout=120)
                    futs[system].append(fut)
                warm[system].append(time.perf_counter() - start)
    for system, done in futs.items():
        for fut in done:
            expect(fut.result(0), expected, f"a warm call {system}")
    emit(
        "rf_predict",
        "in_process",
        **_stats(warm["in_process"]),
        note="model.predict(one row) in this process",
    )
    for system, what in (
        ("by_name", rf_pinned),
        ("by_value", "a closure over the same model, sent by value once"),
    ):
        spans = sorted(
            info["t_finished"] - info["t_started"]
            for info in (stack.ex.task_info(f) for f in futs[system])
            if info.get("t_started") is not None and info.get("t_finished") is not None
        )
        emit(
            "rf_warm_latency",
            system,
            **_stats(warm[system]),
            worker_to_manager_p50_ms=_ms(_percentile(spans, 0.5)) if spans else None,
            note=f"{what}, one row, serial; worker_to_manager: from the worker starting the call "
            "to the manager receiving its result (task record t_finished - t_started)",
        )


def _predict_by_value(model):
    """``model.predict`` as a plain function that dill ships by value, model included."""

    def predict(x):
        return model.predict(x)

    return predict


def _fresh_process_predict(model_path: Path) -> dict:
    """Import, load and predict in a new Python process, timed inside it (start-up excluded)."""
    script = (
        "import json, time\n"
        "t0 = time.perf_counter()\n"
        "import joblib, numpy, sklearn.ensemble\n"
        "from sklearn.datasets import load_diabetes\n"
        "t1 = time.perf_counter()\n"
        f"model = joblib.load({str(model_path)!r})\n"
        "t2 = time.perf_counter()\n"
        "row = load_diabetes(return_X_y=True)[0][:1]\n"
        "t3 = time.perf_counter()\n"
        "model.predict(row)\n"
        "t4 = time.perf_counter()\n"
        "print(json.dumps({'total': (t2 - t0) + (t4 - t3), 'imports': t1 - t0, "
        "'joblib_load': t2 - t1, 'predict': t4 - t3}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _breakdown(info: dict, submitted: float, returned: float) -> dict:
    """Where the cold call's time went, from the manager's task record (wall clocks, one host):
    ``t_received`` and ``t_finished`` are the manager's, ``t_started`` the worker's."""
    t_rx, t_start, t_end = info.get("t_received"), info.get("t_started"), info.get("t_finished")
    if None in (t_rx, t_start, t_end):
        return {}
    return {
        "client_to_manager": t_rx - submitted,
        # name resolution, package fetch from the manager's DB, endpoint disk write, dispatch
        "manager_to_worker_start": t_start - t_rx,
        # the worker's unpack, import, joblib load, predict; then the result's trip to the manager
        "worker_start_to_manager": t_end - t_start,
        "manager_to_client": returned - t_end,
    }


# ---------------------------------------------------------------- summary


def summary(records: list[dict]) -> str:
    by = {(r["metric"], r["system"]): r for r in records}

    def get(metric, system, key):
        return by.get((metric, system), {}).get(key)

    def fmt(value, spec=".3g"):
        return "n/a" if value is None else format(value, spec)

    lines = [f"{'measurement':<44} {'by value':>10} {'by name':>10} {'ratio':>7}", "-" * 74]
    for label, metric, key, spec in (
        ("no-op latency p50 (ms)", "noop_latency", "p50_ms", ".3f"),
        ("no-op latency p99 (ms)", "noop_latency", "p99_ms", ".3f"),
        ("no-op throughput (tasks/s)", "noop_throughput", "tasks_per_s", ".0f"),
    ):
        a, b = get(metric, "by_value", key), get(metric, "by_name", key)
        ratio = b / a if a and b is not None else None
        lines.append(f"{label:<44} {fmt(a, spec):>10} {fmt(b, spec):>10} {fmt(ratio, '.2f'):>7}")
    head = f"{'RandomForestRegressor (100 trees), one row':<44} {'p50 ms':>10} {'p99 ms':>10} {'n':>5}"
    lines += ["", head, "-" * len(head)]
    for label, metric, system in (
        ("in-process model.predict", "rf_predict", "in_process"),
        ("by value (predict closure), warm", "rf_warm_latency", "by_value"),
        ("  worker start -> result at manager", "rf_warm_latency", "by_value"),
        ("by name, warm", "rf_warm_latency", "by_name"),
        ("  worker start -> result at manager", "rf_warm_latency", "by_name"),
        ("by name, first call after publish (median)", "rf_first_call_after_publish", "by_name"),
        ("cold, fresh Python process (median)", "rf_cold_fresh_process", "in_process"),
        ("by name, cold: fresh stack (median)", "rf_cold_first_call", "by_name"),
    ):
        key = "worker_to_manager_p50_ms" if label.startswith("  worker") else "p50_ms"
        lines.append(
            f"{label:<44} {fmt(get(metric, system, key), '.3f'):>10} "
            f"{fmt(None if key != 'p50_ms' else get(metric, system, 'p99_ms'), '.3f'):>10} "
            f"{fmt(get(metric, system, 'n'), 'd'):>5}"
        )
    lines.append("")
    warm = get("rf_warm_latency", "by_name", "p50_ms")
    base = get("rf_predict", "in_process", "p50_ms")
    if warm is not None and base is not None:
        noop_p50 = fmt(get("noop_latency", "by_name", "p50_ms"), ".3f")
        lines.append(
            f"serving overhead, warm p50 by name - in-process p50: {warm - base:.3f} ms "
            f"(a no-op by name: {noop_p50} ms p50)"
        )
    by_value = get("rf_warm_latency", "by_value", "p50_ms")
    if warm is not None and by_value:
        lines.append(f"warm p50 by name / by value: {warm / by_value:.2f}")
    for metric, system, label in (
        ("rf_cold_first_call", "by_name", "cold call by name"),
        ("rf_cold_fresh_process", "in_process", "cold fresh process"),
    ):
        parts = get(metric, system, "median_breakdown_ms")
        if parts:
            text = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
            lines.append(f"{label}, median breakdown (ms): {text}")
    for rec in records:
        if rec["metric"] == "error":
            lines.append(f"ERROR: {rec['error'].splitlines()[-1][:200] if rec['error'] else ''}")
    return "\n".join(lines)


def _positive(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _add_arguments(parser) -> None:
    parser.add_argument("--n", type=_positive, help="serial no-op calls per system (default 2000, quick 300)")


def _measure(stack: BenchStack, sizes: dict, emit, args) -> None:
    if args.n is not None:
        sizes["latency"] = args.n
        sizes["blocks"] = min(sizes["blocks"], args.n)
    stack.__class__ = Stack  # the shared stack with this benchmark's helpers
    measure(stack, sizes, emit)


def main(argv=None) -> int:
    return run_bench("servables", __doc__, FULL, QUICK, _measure, summary, _add_arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
