"""DLHub's evaluation reproduced against the serving systems people use today (issue 15, item 3).

Usage: python benchmarks/evaluation.py [--quick] [--systems dlhub,fastapi,...] [--plots DIR]

The six example servables of executor/examples.py (noop, composition-featurizer, composition-rf,
diabetes-rf, digits-cnn, composition-pipeline) are trained once here with the examples' own
build functions; dlhub serves them published (`dlhub up` in a temp home), every peer serves the
SAME model files (joblib pickles, a TorchScript file; the featurizer is examples.py's own function)
from a subprocess of a separate venv, benchmarks/.venv-peers (created on demand from
benchmarks/peers-requirements.txt; PyTriton from its own, benchmarks/.venv-pytriton, from
peers-pytriton-requirements.txt: its Triton Python-backend stub is built for NumPy 1.x and hands
every tensor over as garbage under NumPy 2), driven over HTTP with httpx from this process:

    dlhub-off  dlhub, result cache off (`with_options(cache=False)`), diabetes-rf unbatched
    dlhub-on   the same stack, cache on, diabetes-rf vectorized (endpoint batching, max 256)
    fastapi    plain FastAPI + uvicorn (--workers N) calling the model
    litserve   LitServe, workers_per_device=N (batching: max_batch_size)
    ray        Ray Serve, num_replicas=N (batching: @serve.batch)
    mlserver   MLServer, parallel_workers=N (adaptive batching)
    pytriton   NVIDIA PyTriton, N model instances (Triton's dynamic batcher)
    htex       Parsl HighThroughputExecutor, N workers, a shipped function calling the model

Figures (each a ratio against the others, all from this run): serial p50/p99 per servable
(`latency`); diabetes-rf predictions/s vs concurrent callers (`throughput`); one call carrying B
rows of diabetes-rf, B = 1..1024 (`batch_sweep`: per-row time); calls/s of diabetes-rf as the share
of repeated inputs goes 0..100% (`memo`; systems without a cache recompute); predictions/s with 1
and 2 workers (`workers`); seconds from launching the system to its first prediction (`cold_start`).
A system that fails to install or start says why in a JSON line (`error`) and the rest still run.
One JSON line per measurement, then a summary; `--plots DIR` writes PNGs from the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _eval_peers import (  # noqa: E402
    EXAMPLES_PY,
    NAMES,
    PEERS_DIR,
    PEERS_PY,
    TIMEOUT,
    PeerSystem,
    ensure_peers_venv,
    venv_of,
)
from _eval_report import markdown, plots, summary  # noqa: E402
from _stack import Stack, kill_marked, stats  # noqa: E402

OWNER = "admin"
PEERS = ["fastapi", "litserve", "ray", "mlserver", "pytriton"]
ALL_SYSTEMS = ["dlhub", *PEERS, "htex"]

FULL = {
    "latency": 200,
    "concurrency": [1, 4, 16, 64],
    "calls": 2000,
    "batch_sizes": [1, 4, 16, 64, 256, 1024],
    "batch_reps": 10,
    "memo_shares": [0.0, 0.25, 0.5, 0.75, 1.0],
    "memo_calls": 1000,
    "memo_conc": 16,
    "workers_calls": 1000,
    "workers_conc": 16,
    "batch": 256,
    "full_workers": True,  # the batching variants are restarted with 1 worker too
    "max_s": 4.0,  # a throughput figure stops starting calls after this (Ray: ~40 s a figure otherwise)
}
QUICK = {
    "latency": 30,
    "concurrency": [1, 16],
    "calls": 160,
    "batch_sizes": [1, 32, 1024],
    "batch_reps": 3,
    "memo_shares": [0.0, 1.0],
    "memo_calls": 120,
    "memo_conc": 16,
    "workers_calls": 120,
    "workers_conc": 16,
    "batch": 256,
    "full_workers": False,
    "max_s": None,
}


# ---- the models and their inputs -----------------------------------------------------------


def build_models(model_dir: Path) -> dict:
    """Train the examples once; write the peers' files; return the dlhub servables by name."""
    from dlhub.executor import examples

    servables = {
        "noop": examples.build_noop(),
        "composition-featurizer": examples.build_featurizer(),
        "composition-rf": examples.build_composition_rf(),
        "diabetes-rf": examples.build_diabetes_rf(vectorized=True),
        "diabetes-rf-plain": examples.build_diabetes_rf(vectorized=False, name="diabetes-rf-plain"),
        "digits-cnn": examples.build_digits_cnn(),
        "composition-pipeline": examples.build_pipeline(OWNER),
    }
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "composition-rf.joblib").write_bytes(servables["composition-rf"].files["model.joblib"])
    (model_dir / "diabetes-rf.joblib").write_bytes(servables["diabetes-rf-plain"].files["model.joblib"])
    (model_dir / "digits-cnn.pt").write_bytes(servables["digits-cnn"].files["model.pt"])
    return servables


def diabetes_rows():
    from sklearn.datasets import load_diabetes

    return load_diabetes(return_X_y=True)[0]


def inputs() -> dict:
    """One JSON-able input per servable (dlhub gets numpy arrays where its servable wants them)."""
    from sklearn.datasets import load_digits

    from dlhub.executor.examples import featurize

    return {
        "noop": 1,
        "composition-featurizer": "Fe2O3",
        "composition-rf": [featurize("NaCl")],
        "diabetes-rf": diabetes_rows()[0].tolist(),
        "digits-cnn": (load_digits().images[:1] / 16.0).reshape(1, 1, 8, 8).tolist(),
        "composition-pipeline": "Fe2O3",
    }


# ---- the systems: call(name, x) -> output, one thread-safe client each ------------------------


class DlhubSystem:
    """One `dlhub up` stack; ``cache``/``batched`` pick the dlhub-off or dlhub-on row."""

    def __init__(self, home: Path, workers: int, servables: dict | None):
        self.stack = Stack(home, workers)
        self.stack.up()
        if servables is not None:  # first start: publish (kept in the home's DB for restarts)
            for name in [
                "noop",
                "composition-featurizer",
                "composition-rf",
                "diabetes-rf",
                "diabetes-rf-plain",
                "digits-cnn",
                "composition-pipeline",
            ]:
                self.stack.client.publish(servables[name])
        self.mode("on")

    def mode(self, mode: str) -> None:
        self.on = mode == "on"
        self.ex = self.stack.ex.with_options(cache=self.on)

    def call(self, name: str, x):
        import numpy as np

        if name in ("composition-rf", "digits-cnn"):
            x = np.asarray(x, dtype=np.float32 if name == "digits-cnn" else np.float64)
        elif name == "diabetes-rf" and not self.on:
            return self.ex.submit(f"{OWNER}/diabetes-rf-plain", np.asarray([x])).result(TIMEOUT).tolist()[0]
        elif name == "diabetes-rf-rows":
            return self.ex.submit(f"{OWNER}/diabetes-rf-plain", np.asarray(x)).result(TIMEOUT).tolist()
        out = self.ex.submit(f"{OWNER}/{name}", x).result(TIMEOUT)
        return out.tolist() if hasattr(out, "tolist") else out

    def close(self) -> None:
        self.stack.down()


class HtexSystem:
    """Parsl HTEX (benchmarks/_systems.py); the task is a shipped function calling the model."""

    def __init__(self, tmp: Path, workers: int, model_dir: Path):
        from _systems import HtexSystem as Htex

        self.htex = Htex(tmp, workers)
        self.model_dir = str(model_dir)

    def call(self, name: str, x):
        return self.htex.ex.submit(
            _htex_task, {}, str(PEERS_DIR), self.model_dir, str(EXAMPLES_PY), name, x
        ).result(timeout=TIMEOUT)

    def close(self) -> None:
        self.htex.close()


def _htex_task(peers_dir, model_dir, examples_py, name, x):
    import os
    import sys

    os.environ["EVAL_EXAMPLES_PY"] = examples_py
    if peers_dir not in sys.path:
        sys.path.insert(0, peers_dir)
    import models

    return models.cached(model_dir)[name][0](x)


# ---- the measurements ----------------------------------------------------------------------


def serial_latency(call, name, varied, counter, n) -> dict:
    for _ in range(max(3, n // 10)):
        call(name, varied.get(name, next(counter)))
    samples = []
    for _ in range(n):
        x = varied.get(name, next(counter))
        t0 = time.perf_counter()
        call(name, x)
        samples.append(time.perf_counter() - t0)
    return stats(samples)


def throughput(call, work: list, conc: int, max_s: float | None = None) -> float:
    """``work`` = [(name, x)], run by ``conc`` threads; calls/s. With ``max_s``, no call starts
    after that many seconds (a slow system's figure is then over fewer calls, and the run stays
    under its 20 minutes): the rate is the calls done over the time they took."""
    it = iter(work)
    lock = threading.Lock()
    errors: list = []
    done = [0]
    deadline = None if max_s is None else time.perf_counter() + max_s

    def worker():
        while True:
            with lock:
                item = None if deadline is not None and time.perf_counter() > deadline else next(it, None)
            if item is None:
                return
            try:
                call(*item)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
                return
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return done[0] / took


def memo_work(rows, share: float, n: int, seed: int = 0) -> list:
    """n diabetes-rf calls; ``share`` of them repeat one input, the rest are all distinct."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if rng.random() < share:
            out.append(("diabetes-rf", rows[0].tolist()))
        else:
            row = rows[i % len(rows)] - (i + 1) * 1e-9 - seed * 1e-5  # distinct from every other call
            out.append(("diabetes-rf", row.tolist()))
    return out


class Varied:
    """Distinct inputs per call (``get(name, i)``), so that no figure but ``memo`` is a cache hit:
    formulas cycle through examples' binary formulas, numbers move by a tiny offset."""

    def __init__(self, ins: dict, rows):
        import numpy as np

        from dlhub.executor.examples import _binary_formulas, featurize

        self.np, self.rows = np, rows
        self.counter = iter(range(10**9))
        self.formulas = _binary_formulas(4096, seed=7)
        self.features = [featurize(f) for f in self.formulas]
        self.image = np.asarray(ins["digits-cnn"], dtype=np.float64)

    def get(self, name: str, i: int):
        if name == "noop":
            return i
        if name in ("composition-featurizer", "composition-pipeline"):
            return self.formulas[i % len(self.formulas)]
        if name == "composition-rf":
            return [[v + i * 1e-9 for v in self.features[i % len(self.features)]]]
        if name == "diabetes-rf":
            return self.row(i)
        return (self.image + (i % 997) * 1e-6).tolist()

    def row(self, i: int) -> list:
        return (self.rows[i % len(self.rows)] + (i + 1) * 1e-9).tolist()


def measure_system(label, call, sizes, emit, ins, rows, verify, varied):
    counter = varied.counter  # one count for the whole run: no input is ever sent twice
    for name in NAMES:
        got = call(name, ins[name])
        verify(label, name, got)
        emit("latency", label, servable=name, **serial_latency(call, name, varied, counter, sizes["latency"]))
    for conc in sizes["concurrency"]:
        work = [("diabetes-rf", varied.row(next(counter))) for _ in range(sizes["calls"])]
        emit(
            "throughput",
            label,
            servable="diabetes-rf",
            concurrency=conc,
            calls_per_s=round(throughput(call, work, conc, sizes["max_s"]), 1),
        )
    for b in sizes["batch_sizes"]:
        samples = []
        for _ in range(sizes["batch_reps"]):
            x = [varied.row(next(counter)) for _ in range(b)]
            t0 = time.perf_counter()
            out = call("diabetes-rf-rows", x)
            samples.append(time.perf_counter() - t0)
            assert len(out) == b, (label, b, len(out))
        s = stats(samples)
        emit("batch_sweep", label, rows=b, p50_ms=s["p50_ms"], per_row_us=round(s["p50_ms"] * 1e3 / b, 2))
    for k, share in enumerate(sizes["memo_shares"]):
        work = memo_work(rows, share, sizes["memo_calls"], seed=k + (17 if label.endswith("on") else 0))
        emit(
            "memo",
            label,
            share=share,
            calls_per_s=round(throughput(call, work, sizes["memo_conc"], sizes["max_s"]), 1),
        )


def make_verifier(expected: dict, emit):
    import numpy as np

    def verify(label, name, got):
        ok = (
            np.allclose(
                np.asarray(got, dtype=float).ravel(),
                np.asarray(expected[name], dtype=float).ravel(),
                rtol=1e-4,
                atol=1e-6,
            )
            if name not in ("noop",)
            else got == expected[name]
        )
        if not ok:
            raise AssertionError(f"{label}/{name}: {got!r} != {expected[name]!r}")

    return verify


def run(sizes: dict, systems: list[str], emit, tmp: Path) -> None:
    model_dir = tmp / "models"
    os.environ["EVAL_EXAMPLES_PY"] = str(EXAMPLES_PY)
    servables = build_models(model_dir)
    ins, rows = inputs(), diabetes_rows()
    sys.path.insert(0, str(PEERS_DIR))
    import models as local_models

    table = local_models.load(str(model_dir))
    expected = {name: table[name][0](ins[name]) for name in NAMES}
    verify = make_verifier(expected, emit)
    wc = sizes["workers_calls"]
    varied = Varied(ins, rows)

    def wwork():  # fresh inputs for each workers figure
        return [("diabetes-rf", varied.row(next(varied.counter))) for _ in range(wc)]

    def wthroughput(call) -> float:
        return throughput(call, wwork(), sizes["workers_conc"], sizes["max_s"])

    probe = ("diabetes-rf", ins["diabetes-rf"])

    for name in sorted({venv_of(s) for s in systems if s in PEERS}):
        error = ensure_peers_venv(emit, name)
        if error:
            for s in systems:
                if s in PEERS and venv_of(s) == name:
                    emit("error", s, error=error)
            systems = [s for s in systems if not (s in PEERS and venv_of(s) == name)]

    for system in systems:
        try:
            if system == "dlhub":
                home = tmp / "dlhub-home"
                home.mkdir()
                try:
                    DlhubSystem(home, 2, servables).close()  # publish once
                    for workers in (2, 1):
                        t0 = time.perf_counter()
                        d = DlhubSystem(home, workers, None)
                        try:
                            d.call(*probe)
                            emit(
                                "cold_start",
                                "dlhub",
                                workers=workers,
                                seconds=round(time.perf_counter() - t0, 2),
                                note="dlhub up (manager, endpoint, workers) to the first diabetes-rf result",
                            )
                            for mode in ("off", "on"):
                                d.mode(mode)
                                label = f"dlhub-{mode}"
                                if workers == 2:
                                    measure_system(label, d.call, sizes, emit, ins, rows, verify, varied)
                                emit(
                                    "workers",
                                    label,
                                    workers=workers,
                                    concurrency=sizes["workers_conc"],
                                    calls_per_s=round(wthroughput(d.call), 1),
                                )
                        finally:
                            d.close()
                finally:
                    kill_marked(str(home))
                continue
            for workers in (2, 1):
                variants = [("", 1)]
                if system in ("litserve", "ray", "mlserver", "pytriton") and (
                    workers == 2 or sizes["full_workers"]
                ):
                    variants.append(("-batch", sizes["batch"]))
                for suffix, batch in variants:
                    label = system + suffix
                    t0 = time.perf_counter()
                    if system == "htex":
                        s = HtexSystem(tmp / f"htex-{workers}", workers, model_dir)
                        s.call(*probe)
                    else:
                        s = PeerSystem(system, tmp, workers, batch, model_dir)
                    try:
                        if system != "htex":
                            s.wait_ready(*probe)
                        emit("cold_start", label, workers=workers, seconds=round(time.perf_counter() - t0, 2))
                        if workers == 2:
                            measure_system(label, s.call, sizes, emit, ins, rows, verify, varied)
                        emit(
                            "workers",
                            label,
                            workers=workers,
                            concurrency=sizes["workers_conc"],
                            calls_per_s=round(wthroughput(s.call), 1),
                        )
                    finally:
                        s.close()
        except Exception as exc:  # noqa: BLE001 - this system failed; the others still run
            traceback.print_exc()
            text = f"{type(exc).__name__}: {exc}"
            emit("error", system, error=text if len(text) < 3000 else text[:500] + " ... " + text[-2500:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (~7 min; full ~14 min)")
    parser.add_argument(
        "--systems", default=",".join(ALL_SYSTEMS), help="comma-separated subset of " + ",".join(ALL_SYSTEMS)
    )
    parser.add_argument("--plots", help="write PNG figures to this folder (matplotlib from either venv)")
    parser.add_argument(
        "--markdown", action="store_true", help="print the README tables instead of the summary"
    )
    parser.add_argument("--from-json", help="only plot/summarize an earlier run's JSON lines file")
    args = parser.parse_args(argv)
    records: list[dict] = []
    if args.from_json:
        records = [
            json.loads(line) for line in Path(args.from_json).read_text().splitlines() if line.startswith("{")
        ]
    else:

        def emit(metric, system, **fields):
            record = {"bench": "evaluation", "system": system, "metric": metric, **fields}
            print(json.dumps(record, separators=(",", ":")), flush=True)
            records.append(record)

        systems = [s for s in args.systems.split(",") if s]
        tmp = Path(tempfile.mkdtemp(prefix="bench-evaluation-"))
        t0 = time.perf_counter()
        try:
            run(dict(QUICK if args.quick else FULL), systems, emit, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        emit("run", "all", wall_s=round(time.perf_counter() - t0, 1), quick=args.quick)
    if args.plots:
        try:
            print("plots:", plots(records, Path(args.plots)))
        except ImportError:  # matplotlib lives in the peers venv: plot from there
            subprocess.run(
                [str(PEERS_PY), __file__, "--from-json", "/dev/stdin", "--plots", args.plots],
                input="\n".join(json.dumps(r) for r in records),
                text=True,
                check=False,
            )
    if args.markdown:
        print(markdown(records))
        return 0
    print()
    print(summary(records))
    return 1 if any(r["metric"] == "error" and r["system"].startswith("dlhub") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
