"""The cost of CurveZMQ on the spine: no-op latency and throughput through a whole `dlhub up`
stack with CURVE (the default) and with `--insecure-loopback` (ZeroMQ PLAIN: tokens checked at the
handshake, no encryption), both up at once and measured in alternating rounds, so load on the
machine hits both alike.

    .venv/bin/python benchmarks/security.py            # 2,000 latency calls, 4 x 10,000 no-ops each
    .venv/bin/python benchmarks/security.py --quick    # 300 calls, 2 x 1,000 no-ops each (~40 s)

Output: one JSON line per measurement, then a summary with the CURVE/plain ratios. Every result
is checked (`noop()` returns "noop"); a wrong one or a failed step exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = {"latency_calls": 2000, "rounds": 4, "throughput_tasks": 10000}
QUICK = {"latency_calls": 300, "rounds": 2, "throughput_tasks": 1000}
ROUND = 50  # latency calls per system before switching to the other


def noop():
    return "noop"


def _dlhub(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlhub.executor.cli", *args], capture_output=True, text=True, timeout=180
    )


def _up(home: Path, insecure: bool) -> None:
    args = ["up", "--home", str(home), "--workers", "2", "--detach", "--no-examples"]
    proc = _dlhub(*args, *(["--insecure-loopback"] if insecure else []))
    if proc.returncode:
        raise RuntimeError(f"dlhub {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _check(value) -> None:
    if value != "noop":
        raise RuntimeError(f"noop() returned {value!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, every result checked")
    sizes = QUICK if parser.parse_args(argv).quick else FULL
    from dlhub.executor import Executor

    records: list[dict] = []

    def emit(**fields) -> None:
        record = {"bench": "security", **fields}
        records.append(record)
        print(json.dumps(record), flush=True)

    with tempfile.TemporaryDirectory(prefix="dlhub-security-") as tmp:
        homes = {"curve": Path(tmp) / "curve", "plain": Path(tmp) / "plain"}
        executors: dict[str, Executor] = {}
        try:
            for mode, home in homes.items():
                _up(home, insecure=mode == "plain")
                executors[mode] = Executor(endpoint="local", home=str(home))
                link = json.loads((home / "config.json").read_text()).get("manager_key")
                emit(system=mode, metric="setup", manager_key_pinned=bool(link))
            for ex in executors.values():  # warm: code shipped, workers loaded
                for _ in range(50):
                    _check(ex.submit(noop).result(60))
            samples: dict[str, list[float]] = {mode: [] for mode in executors}
            while min(len(s) for s in samples.values()) < sizes["latency_calls"]:
                for mode, ex in executors.items():
                    for _ in range(ROUND):
                        start = time.perf_counter()
                        _check(ex.submit(noop).result(60))
                        samples[mode].append(time.perf_counter() - start)
            for mode, s in samples.items():
                s.sort()
                emit(
                    system=mode,
                    metric="noop_latency",
                    p50_ms=round(s[len(s) // 2] * 1e3, 3),
                    p99_ms=round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3, 3),
                    n=len(s),
                )
            rates: dict[str, list[float]] = {mode: [] for mode in executors}
            for _ in range(sizes["rounds"]):
                for mode, ex in executors.items():
                    start = time.perf_counter()
                    futures = [ex.submit(noop) for _ in range(sizes["throughput_tasks"])]
                    for fut in futures:
                        _check(fut.result(300))
                    rates[mode].append(sizes["throughput_tasks"] / (time.perf_counter() - start))
            for mode, r in rates.items():
                emit(
                    system=mode,
                    metric="noop_throughput",
                    tasks_per_s=round(max(r), 1),
                    rounds=[round(x) for x in r],
                )
        except Exception as exc:
            emit(metric="error", error=f"{type(exc).__name__}: {exc}")
            return 1
        finally:
            for ex in executors.values():
                ex.shutdown(wait=False)
            for home in homes.values():
                _dlhub("down", "--home", str(home))

    get = {(r.get("system"), r["metric"]): r for r in records}
    lat = get["curve", "noop_latency"]["p50_ms"] / get["plain", "noop_latency"]["p50_ms"]
    thr = get["curve", "noop_throughput"]["tasks_per_s"] / get["plain", "noop_throughput"]["tasks_per_s"]
    print(
        f"\nCURVE vs plain (same run, alternating rounds):\n"
        f"  no-op p50   curve {get['curve', 'noop_latency']['p50_ms']:.3f} ms   "
        f"plain {get['plain', 'noop_latency']['p50_ms']:.3f} ms   ratio {lat:.2f}\n"
        f"  throughput  curve {get['curve', 'noop_throughput']['tasks_per_s']:.0f}/s   "
        f"plain {get['plain', 'noop_throughput']['tasks_per_s']:.0f}/s   ratio {thr:.2f}"
    )
    return 0


if __name__ == "__main__":
    os.environ.pop("DLHUB_MANAGER_KEY", None)  # each Executor pins its own stack's key
    sys.exit(main())
