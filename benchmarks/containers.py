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
  (``--images-only``: just this figure);
- image built from requirements (podman, when installed): an endpoint with ``image_cache.build:
  true`` and a podman pool (the test image imported into a private store, also the build's base)
  started twice on one home, publishing a servable whose requirements (a wheel made here, pip run
  offline) no image has: the first start builds the image at verification (pip wheel + podman
  build), the second finds it in the image cache. Each start's endpoint start -> servable ready ->
  first result, the build time the endpoint logs, builds counted from the cache index, and the
  call's result checked to come from the built image (``--build-only``: just this figure).

    .venv/bin/python benchmarks/containers.py            # 3 cold starts, 3,000 serial calls, 20,000 mapped
    .venv/bin/python benchmarks/containers.py --quick    # 1 cold start, 600 serial, 4,000 mapped, 1 build
    # --quick: ~41 s idle without the build figure; 97 s with it at load ~5

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


BUILD_PKG, BUILD_VERSION = "dlhub_bench_pkg", "4.5.6"


def built_probe(x):
    import dlhub_bench_pkg

    return x, dlhub_bench_pkg.VERSION, dlhub_bench_pkg.__file__


def image_build_restart(base: Path, image: str) -> dict:
    """See the module doc: the build at the first start vs a warm image cache at the second."""
    import re
    import uuid

    from buildwheel import make_wheel
    from conftest import podman_store

    from dlhub.executor import Client, Servable

    if shutil.which("podman") is None or shutil.which("runc") is None:
        return {
            "bench": "containers",
            "metric": "image_build_restart",
            "skipped": "podman/runc not installed",
        }
    env = podman_store(base / "podman-build")
    os.environ.update(env)  # the endpoints started below inherit the private store
    tar = subprocess.Popen(["tar", "-C", image, "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        ["podman", "import", "-q", "-", "localhost/dlhub-bench-base"],
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        timeout=120,
    )
    tar.wait()
    if imported.returncode != 0:
        raise SystemExit(f"podman import failed: {imported.stderr[-2000:]}")
    wheels = base / "bench-wheels"
    make_wheel(wheels, BUILD_PKG, BUILD_VERSION, f"VERSION = {BUILD_VERSION!r}\n")
    home, name = base / "build-restart", "buildpool"
    endpoint = {
        "pool": {
            "workers_per_node": 1,
            "container": {"type": "podman", "image": "localhost/dlhub-bench-base"},
        },
        "image_cache": {"build": True},
        "build": {
            "base": "localhost/dlhub-bench-base",
            "pip_options": ["--no-index", "--find-links", str(wheels)],
        },
    }
    starts = []
    try:
        for start in range(2):
            t0 = time.perf_counter()
            cs = start_custom_stack(home, endpoint=endpoint, name=name, workers=1)
            try:
                up = time.perf_counter() - t0
                with Client(cs.manager.api.url, cs.token, home=str(cs.home)) as client:
                    ref = client.publish(
                        Servable.from_function(
                            built_probe,
                            name=f"bench-built-{start}-{uuid.uuid4().hex[:6]}",
                            title="runs in an image built from its requirements",
                            authors=["Bench, Mark"],
                            requirements=[f"{BUILD_PKG}=={BUILD_VERSION}"],
                        )
                    )
                ready = time.perf_counter() - t0
                out = cs.executor().submit(ref, 3).result(120)
                first = time.perf_counter() - t0
                if tuple(out) != (3, BUILD_VERSION, f"/dlhub/requirements/{BUILD_PKG}.py"):
                    raise SystemExit(f"image build: the call did not run in the built image: {out}")
                log = "\n".join(p.read_text(errors="replace") for p in cs.endpoint_dir.glob("*.log*"))
            finally:
                stop_custom_stack(cs)
            built = re.findall(r"servable image build://\S+ fetched in ([0-9.]+) s", log)
            earlier = sum(len(st[3]) for st in starts)  # the log carries over from the first start
            index = _cache_index(home, name)
            starts.append((up, ready, first, built[earlier:], index))
    finally:
        subprocess.run(["podman", "system", "reset", "-f"], capture_output=True, timeout=120)
        for k in env:
            os.environ.pop(k, None)
    (_, ready1, first1, built1, before), (_, ready2, first2, built2, after) = starts
    builds_second = sum(
        1 for key, e in after.items() if key not in before or e.get("created") != before[key].get("created")
    )
    return {
        "bench": "containers",
        "metric": "image_build_restart",
        "runtime": "podman",
        "builds_first_start": len(before),
        "builds_second_start": builds_second,
        # "servable image build://... fetched in X s" lines of each start (the second: a warm get)
        "build_s_logged": [float(b) for b in built1],
        "warm_get_s_logged": [float(b) for b in built2],
        "first_ready_s": round(ready1, 3),
        "first_result_s": round(first1, 3),
        "second_ready_s": round(ready2, 3),
        "second_result_s": round(first2, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 cold start, 600 serial, 4,000 mapped")
    parser.add_argument("--cold", type=int, default=None, help="cold starts per runtime (3)")
    parser.add_argument("--serial", type=int, default=None, help="serial no-ops per runtime (3,000)")
    parser.add_argument("--n", type=int, default=None, help="mapped no-ops per runtime (20,000)")
    parser.add_argument("--cache-only", action="store_true", help="only the warm-cache restart figure")
    parser.add_argument("--images-only", action="store_true", help="only the servable-images figure")
    parser.add_argument("--build-only", action="store_true", help="only the image-build figure (podman)")
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
        if args.build_only:
            b = image_build_restart(base, image)
            emit(b)
            print_build(b)
            return 0 if "skipped" in b or b["builds_second_start"] == 0 else 1
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
        emit(image_build_restart(base, image))
        b = records[-1]
        if "skipped" not in b and (b["builds_first_start"] != 1 or b["builds_second_start"] != 0):
            raise SystemExit(f"image build: expected 1 build then none, got {b}")
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
    print_build(next(r for r in records if r["metric"] == "image_build_restart"))
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


def print_build(b: dict) -> None:
    if "skipped" in b:
        print(f"image built from requirements: skipped ({b['skipped']})")
        return
    print(
        f"image built from requirements (podman): builds {b['builds_first_start']} then"
        f" {b['builds_second_start']}; the build {', '.join(f'{s:.1f} s' for s in b['build_s_logged'])}"
        f" vs {', '.join(f'{s:.1f} s' for s in b['warm_get_s_logged'])} warm (endpoint log);"
        f" endpoint start -> servable ready {b['first_ready_s']:.2f} s building vs"
        f" {b['second_ready_s']:.2f} s warm cache (x{b['first_ready_s'] / b['second_ready_s']:.1f}),"
        f" -> first result {b['first_result_s']:.2f} s vs {b['second_result_s']:.2f} s (same run)"
    )


if __name__ == "__main__":
    sys.exit(main())
