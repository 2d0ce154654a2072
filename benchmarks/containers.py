"""Containerized worker pools against bare ones (issue 12): what a container costs per call once
warm, and at a pool's cold start.

Three endpoints on one in-process manager, each with a pool of 2 workers: ``bare`` (no
container), ``charliecloud`` (each worker under ``ch-run`` in the test image) and ``apptainer``
(dlhub's Singularity/Apptainer code path: spython builds the ``apptainer exec`` line, and
``tests/bin/apptainer``, a shim that runs the same container with ``ch-run``, stands in for the
binary: its figure is the code path plus the shim, not real Apptainer). The image is
``scripts/build-test-image.sh``'s host copy (Debian's python3; dlhub bound in from this checkout).

- cold start: the endpoint process started -> its first no-op result (the pool's block, its
  workers' container starts and imports), per runtime, ``--cold`` times each;
- warm: serial no-op calls in blocks of 100, alternating between the three endpoints (all up at
  once, so the machine's noise falls on all of them alike): p50/p99 and the ratio to bare (the
  issue's target: within 5 %); then the throughput of ``--n`` no-ops submitted at once each, in
  4 alternating rounds (median);
- warm image cache: an endpoint whose pool image is a URI started twice on one home: fetches
  counted from the cache index (1, then 0) and each start's first result (``--cache-only``: just
  this figure);
- servable images: one Charliecloud endpoint, a pool of 2 workers, three servables each in its
  own image (hard-linked copies of the test image, each naming itself in /dlhub-image-name).
  Called in turn a, b, c, a ..., each call's image is the one not warm (2 workers, 3 images: the
  least recently used image's worker is retired for it): that first call (a worker started in
  its image, the servable loaded) against the median of 5 calls that follow it on the now warm
  worker, same run, and the ratio; every result is checked to come from its own image
  (``--images-only``: just this figure).

    .venv/bin/python benchmarks/containers.py            # 3 cold starts, 3,000 serial calls, 20,000 mapped
    .venv/bin/python benchmarks/containers.py --quick    # 1 cold start, 600 serial, 4,000 mapped (~41 s idle)

Prints JSON lines, then a human summary. Exits 1 when a result is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from conftest import start_custom_stack, stop_custom_stack  # noqa: E402

WORKERS = 2
BLOCK = 100
THROUGHPUT_ROUNDS = 4


def noop():
    return None


def square(x):
    return x * x


def build_image(dest: Path) -> str:
    """The test image (or $SERVABLE_TEST_IMAGE when it is built already)."""
    given = os.environ.get("SERVABLE_TEST_IMAGE")
    if given and Path(given, "dlhub-test-image").exists():
        return given
    path = given or str(dest)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-test-image.sh"), path],
        env={**os.environ, "INSTALL": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise SystemExit(f"scripts/build-test-image.sh failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return path


def endpoint_config(runtime: str, image: str, images: dict | None = None) -> dict:
    pool: dict = {"workers_per_node": WORKERS}
    if runtime != "bare":
        pool["container"] = {"type": runtime, "image": image}
    return {"pool": pool, **({"images": images} if images else {})}


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(1e3 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)


def cold_start(base: Path, runtime: str, image: str, round_no: int) -> dict:
    """Endpoint start -> first result, in a stack of its own (so nothing is warm)."""
    t0 = time.perf_counter()
    cs = start_custom_stack(
        base / f"cold-{runtime}-{round_no}",
        endpoint=endpoint_config(runtime, image),
        name=f"cold{round_no}",
        workers=1,
    )
    try:
        registered = time.perf_counter() - t0
        ex = cs.executor()
        if ex.submit(square, 7).result(120) != 49:
            raise SystemExit(f"{runtime}: wrong result at cold start")
        first = time.perf_counter() - t0
    finally:
        stop_custom_stack(cs)
    return {
        "bench": "containers",
        "metric": "cold_start",
        "runtime": runtime,
        "round": round_no,
        "first_worker_s": round(registered, 3),
        "first_result_s": round(first, 3),
    }


def _cache_index(home: Path, name: str) -> dict:
    index = home / "endpoints" / name / "images" / "index.json"
    return json.loads(index.read_text()) if index.exists() else {}


def warm_cache_restart(base: Path, image: str) -> dict:
    """An endpoint whose pool image is a URI (``dir://`` the test image: a real copy into the
    endpoint's image cache) started twice on one home: the first start fetches, the second finds
    the cache warm. Fetches are counted from the cache's index (an entry's ``created`` changes
    only when it is fetched again), not assumed."""
    home = base / "warm-cache"
    name = "cachepool"
    starts = []
    for _ in range(2):
        t0 = time.perf_counter()
        cs = start_custom_stack(
            home, endpoint=endpoint_config("charliecloud", f"dir://{image}"), name=name, workers=1
        )
        try:
            if cs.executor().submit(square, 7).result(120) != 49:
                raise SystemExit("warm cache: wrong result")
            first = time.perf_counter() - t0
        finally:
            stop_custom_stack(cs)
        starts.append((round(first, 3), _cache_index(home, name)))
    (first_s, before), (second_s, after) = starts
    fetches_second = sum(
        1 for key, e in after.items() if key not in before or e.get("created") != before[key].get("created")
    )
    return {
        "bench": "containers",
        "metric": "warm_cache_restart",
        "entries": len(after),
        "fetches_first_start": len(before),
        "fetches_second_start": fetches_second,
        "first_start_first_result_s": first_s,
        "second_start_first_result_s": second_s,
    }


def which_image(x):
    try:
        with open("/dlhub-image-name") as f:
            return x, f.read().strip()
    except OSError:
        return x, None


IMAGE_NAMES = "abc"


def servable_image_catalogue(base: Path, image: str) -> dict[str, str]:
    """``images:`` for the endpoint YAML: site:a/b/c -> hard-linked copies of the test image."""
    images = {}
    for k in IMAGE_NAMES:
        dest = base / f"servable-img-{k}"
        if subprocess.run(["cp", "-al", image, str(dest)], capture_output=True).returncode != 0:
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(image, dest, symlinks=True)
        (dest / "dlhub-image-name").write_text(k)
        images[f"site:{k}"] = str(dest)
    return images


def servable_images(cs, cycles: int) -> dict:
    """First call of a servable whose image is not warm vs warm calls (see the module doc), on
    a Charliecloud endpoint of WORKERS workers whose catalogue has servable_image_catalogue."""
    import statistics

    from dlhub.executor import Client, Servable

    names = IMAGE_NAMES
    starts_before = cs.status().get("image_starts", 0)
    ex = cs.executor()
    with Client(cs.manager.api.url, cs.token, home=str(cs.home)) as client:
        refs = {
            k: client.publish(
                Servable.from_function(
                    which_image,
                    name=f"bench-img-{k}",
                    title="which image",
                    authors=["Bench, Mark"],
                    container=f"site:{k}",
                    examples=[((1,), (1, k))],
                )
            )
            for k in names
        }  # verified in turn: a, b, then c retires a -> b and c are warm
    cold, warm = [], []
    for n in range(cycles * len(names)):
        k = names[n % len(names)]
        t = time.perf_counter()
        out = ex.submit(refs[k], n).result(120)
        cold.append(time.perf_counter() - t)
        if tuple(out) != (n, k):
            raise SystemExit(f"servable images: call {n} of {k} ran in {out}")
        for i in range(5):
            t = time.perf_counter()
            out = ex.submit(refs[k], i).result(60)
            warm.append(time.perf_counter() - t)
            if tuple(out) != (i, k):
                raise SystemExit(f"servable images: warm call of {k} ran in {out}")
    deadline = time.monotonic() + 5  # status.json is rewritten at each worker join and heartbeat
    while (starts := cs.status().get("image_starts", 0) - starts_before) < 3 + len(cold):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if starts < 3 + len(cold):  # the verifications (a, b, c) and one per cold call
        raise SystemExit(f"servable images: {starts} worker starts in an image, expected >= {3 + len(cold)}")
    cold_p50, warm_p50 = statistics.median(cold), statistics.median(warm)
    return {
        "bench": "containers",
        "metric": "servable_image_first_call",
        "runtime": "charliecloud",
        "workers": WORKERS,
        "images": len(names),
        "cold_calls": len(cold),
        "warm_calls": len(warm),
        "cold_p50_ms": round(1e3 * cold_p50, 1),
        "cold_max_ms": round(1e3 * max(cold), 1),
        "warm_p50_ms": round(1e3 * warm_p50, 2),
        "cold_over_warm": round(cold_p50 / warm_p50, 1),
        "image_starts": starts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 cold start, 600 serial, 4,000 mapped")
    parser.add_argument("--cold", type=int, default=None, help="cold starts per runtime (3)")
    parser.add_argument("--serial", type=int, default=None, help="serial no-ops per runtime (3,000)")
    parser.add_argument("--n", type=int, default=None, help="mapped no-ops per runtime (20,000)")
    parser.add_argument("--cache-only", action="store_true", help="only the warm-cache restart figure")
    parser.add_argument("--images-only", action="store_true", help="only the servable-images figure")
    args = parser.parse_args(argv)
    cold = args.cold if args.cold is not None else (1 if args.quick else 3)
    serial = args.serial if args.serial is not None else (600 if args.quick else 3000)
    mapped = args.n if args.n is not None else (4000 if args.quick else 20000)
    if shutil.which("ch-run") is None:
        raise SystemExit(
            "ch-run is not installed: apt-get install -y --no-install-recommends charliecloud-runtime"
        )
    os.environ.setdefault("USER", "root" if os.getuid() == 0 else str(os.getuid()))
    os.environ["PATH"] = f"{ROOT / 'tests' / 'bin'}{os.pathsep}{os.environ['PATH']}"  # the apptainer shim
    base = Path(tempfile.mkdtemp(prefix="bench-containers-"))
    runtimes = ["bare", "charliecloud", "apptainer"]
    records: list[dict] = []

    def emit(record: dict) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)

    try:
        t_image = time.perf_counter()
        image = build_image(base / "image")
        emit(
            {
                "bench": "containers",
                "metric": "image",
                "path": image,
                "build_s": round(time.perf_counter() - t_image, 2),
            }
        )
        catalogue = servable_image_catalogue(base, image)
        cycles = 1 if args.quick else 4
        if args.images_only:
            cs = start_custom_stack(
                base / "servable-images",
                endpoint=endpoint_config("charliecloud", image, catalogue),
                name="imgbench",
                workers=WORKERS,
            )
            try:
                images = servable_images(cs, cycles)
            finally:
                stop_custom_stack(cs)
            emit(images)
            print(
                f"servable image first call: {images['cold_p50_ms']:.0f} ms not warm vs"
                f" {images['warm_p50_ms']:.1f} ms warm (x{images['cold_over_warm']})"
            )
            return 0
        cache = warm_cache_restart(base, image)
        emit(cache)
        if cache["fetches_first_start"] != 1 or cache["fetches_second_start"] != 0:
            raise SystemExit(f"warm cache: expected 1 fetch then none, got {cache}")
        if args.cache_only:
            return 0
        for round_no in range(cold):
            for runtime in runtimes:
                emit(cold_start(base, runtime, image, round_no))

        stacks = {}
        try:
            for runtime in runtimes:
                stacks[runtime] = start_custom_stack(
                    base / f"warm-{runtime}",
                    # the servable images' catalogue: used only after the warm figures
                    endpoint=endpoint_config(
                        runtime, image, catalogue if runtime == "charliecloud" else None
                    ),
                    name=runtime,
                    workers=WORKERS,
                )
            executors = {r: cs.executor() for r, cs in stacks.items()}
            for ex in executors.values():  # warm: both workers have the function
                if list(ex.map(square, range(50))) != [x * x for x in range(50)]:
                    raise SystemExit("wrong results while warming up")
            lat: dict[str, list[float]] = {r: [] for r in runtimes}
            for block in range(max(1, serial // BLOCK)):
                order = runtimes if block % 2 == 0 else runtimes[::-1]
                for runtime in order:
                    ex = executors[runtime]
                    for _ in range(BLOCK):
                        t = time.perf_counter()
                        ex.submit(noop).result(60)
                        lat[runtime].append(time.perf_counter() - t)
            for runtime in runtimes:
                emit(
                    {
                        "bench": "containers",
                        "metric": "warm_noop_latency",
                        "runtime": runtime,
                        "n": len(lat[runtime]),
                        "p50_ms": pct(lat[runtime], 0.5),
                        "p99_ms": pct(lat[runtime], 0.99),
                    }
                )
            rates: dict[str, list[float]] = {r: [] for r in runtimes}
            for round_no in range(THROUGHPUT_ROUNDS):
                order = runtimes if round_no % 2 == 0 else runtimes[::-1]
                for runtime in order:
                    t = time.perf_counter()
                    futures = [executors[runtime].submit(noop) for _ in range(mapped // THROUGHPUT_ROUNDS)]
                    out = [f.result(120) for f in futures]
                    if any(v is not None for v in out):
                        raise SystemExit(f"{runtime}: a no-op returned something")
                    rates[runtime].append(len(out) / (time.perf_counter() - t))
            for runtime in runtimes:
                emit(
                    {
                        "bench": "containers",
                        "metric": "warm_noop_throughput",
                        "runtime": runtime,
                        "n": mapped,
                        "tasks_per_s": round(sorted(rates[runtime])[len(rates[runtime]) // 2], 1),  # median
                        "rounds_tasks_per_s": [round(r, 1) for r in rates[runtime]],
                    }
                )
            # last: it replaces the charliecloud pool's workers with ones in the servables' images
            emit(servable_images(stacks["charliecloud"], cycles))
        finally:
            for cs in stacks.values():
                stop_custom_stack(cs)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    by = {(r["metric"], r.get("runtime")): r for r in records}

    def ratio(metric: str, key: str, runtime: str) -> float:
        return round(by[(metric, runtime)][key] / by[(metric, "bare")][key], 3)

    print("\nruntime        cold start (median): first worker / first result | warm no-op p50 / p99 (x bare)")
    for runtime in runtimes:
        colds = sorted(
            (r for r in records if r["metric"] == "cold_start" and r["runtime"] == runtime),
            key=lambda r: r["first_result_s"],
        )
        mid = colds[len(colds) // 2]
        warm, thr = by[("warm_noop_latency", runtime)], by[("warm_noop_throughput", runtime)]
        print(
            f"{runtime:14s} {mid['first_worker_s']:6.2f} s / {mid['first_result_s']:6.2f} s"
            f" | {warm['p50_ms']:6.3f} / {warm['p99_ms']:6.3f} ms"
            f" (x{ratio('warm_noop_latency', 'p50_ms', runtime)})"
            f" | {thr['tasks_per_s']:9.0f} tasks/s (x{ratio('warm_noop_throughput', 'tasks_per_s', runtime)})"
        )
    c = by[("warm_cache_restart", None)]
    print(
        f"image cache: fetches {c['fetches_first_start']} then {c['fetches_second_start']};"
        f" first result {c['first_start_first_result_s']:.2f} s cold cache,"
        f" {c['second_start_first_result_s']:.2f} s warm"
    )
    i = by[("servable_image_first_call", "charliecloud")]
    print(
        f"servable image first call (p50 of {i['cold_calls']}): {i['cold_p50_ms']:.0f} ms not warm vs"
        f" {i['warm_p50_ms']:.1f} ms warm (x{i['cold_over_warm']}, same run)"
    )
    summary = {
        "bench": "containers",
        "summary": {
            r: {
                "warm_p50_ratio_to_bare": ratio("warm_noop_latency", "p50_ms", r),
                "throughput_ratio_to_bare": ratio("warm_noop_throughput", "tasks_per_s", r),
            }
            for r in runtimes
        },
        "target": "warm per-call overhead within 5 % of bare",
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
