"""Roundtrip benchmark: raw pyzmq chain vs Parsl HTEX vs the full dlhub path, on one machine.

Usage: python benchmarks/roundtrip.py [--quick] [--only raw,htex,dlhub] [--timeout 180]

For each system: no-op serial latency (p50/p99), no-op throughput (submit all, then wait all) and
the throughput of 10 ms sleeps with 2 workers (ideal: 200/s). Each system runs alone in its own
child process (own session, own temp dir) under a timeout, and is torn down before the next one
starts. One JSON line per measurement goes to stdout, then a plain-text summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM_NAMES = ("raw", "htex", "dlhub")
WORKERS = 2
FULL = {"warmup": 200, "latency": 2000, "throughput": 20_000, "sleep": 2000}
QUICK = {"warmup": 50, "latency": 200, "throughput": 1000, "sleep": 100}
MARK = "DLHUB_ROUNDTRIP_MARK"  # env var inherited by everything a child starts, for cleanup


def noop():
    return "noop"  # a value the run checks (the raw chain's workers return the same)


def sleep10():
    import time

    time.sleep(0.01)
    return "sleep10"


def checked_call(sut, fn):
    """One task; raises unless it returned what ``fn()`` returns here."""
    result = sut.call(fn)
    if result != fn():
        raise AssertionError(f"{fn.__name__} returned {result!r}, expected {fn()!r}")
    return result


# ---------------------------------------------------------------- child: measure one system


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def measure(system: str, tmp: Path, sizes: dict, emit) -> None:
    """Start ``system``, run the three measurements, tear it down."""
    sys.path.insert(0, str(HERE))
    from _systems import SYSTEMS

    start = time.perf_counter()
    sut = SYSTEMS[system](tmp, WORKERS)
    try:
        if sut.startup:  # dlhub: how long `dlhub up --detach` took to return ready
            emit("up_ready", **sut.startup)
        checked_call(sut, noop)
        emit("startup", ready_s=round(time.perf_counter() - start, 3), note=sut.note)
        for _ in range(sizes["warmup"] - 1):
            checked_call(sut, noop)
        lat, results = [], []
        for _ in range(sizes["latency"]):
            t0 = time.perf_counter()
            results.append(sut.call(noop))
            lat.append(time.perf_counter() - t0)
        if results != [noop()] * len(results):  # checked after timing, outside the loop
            raise AssertionError(f"noop: wrong results among {len(results)} serial calls")
        lat.sort()
        emit(
            "noop_latency",
            p50_ms=round(_percentile(lat, 0.5) * 1e3, 3),
            p99_ms=round(_percentile(lat, 0.99) * 1e3, 3),
            n=len(lat),
        )
        for metric, fn, n in (
            ("noop_throughput", noop, sizes["throughput"]),
            ("sleep10_throughput", sleep10, sizes["sleep"]),
        ):
            t0 = time.perf_counter()
            sut.run_many(fn, n)  # raises unless every task returned fn()
            rate = n / (time.perf_counter() - t0)
            extra = {}
            if fn is sleep10:  # ideal: every worker always busy, 100 tasks/s each
                extra["pct_of_ideal"] = round(100 * rate / (WORKERS / 0.01), 1)
            emit(metric, tasks_per_s=round(rate, 1), n=n, **extra)
    finally:
        sut.close()


def child_main(args) -> int:
    """Entry point of the per-system child process; writes JSON lines to ``args.results``."""
    with open(args.results, "a") as out:

        def emit(metric, **fields):
            record = {"bench": "roundtrip", "system": args.child, "metric": metric, **fields}
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
            out.flush()

        try:
            measure(args.child, Path(args.tmp), QUICK if args.quick else FULL, emit)
        except BaseException as exc:
            traceback.print_exc()
            emit("error", error=f"{type(exc).__name__}: {exc}".strip()[:2000])
            return 1
    return 0


# ---------------------------------------------------------------- parent: isolate and clean up


def _marked(tmp: str) -> list[int]:
    """Processes that carry this run's temp dir in their command line or environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if tmp.encode() in blob:  # also matches the MARK=tmp environment entry
            found.append(int(entry.name))
    return found


def _kill_marked(tmp: str) -> list[int]:
    """SIGTERM the leftover processes of this run, then SIGKILL the ones still there."""
    found = _marked(tmp)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in found if sig == signal.SIGTERM else _marked(tmp):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if found and sig == signal.SIGTERM:
            time.sleep(1.0)
    return found


def _run_child(cmd: list[str], env: dict, log: Path, timeout: float) -> str | None:
    """Run the child in its own session; return a failure description or None."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
            return f"child exited with status {rc}" if rc else None
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f} s"
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except OSError:
                    pass
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass


def run_system(system: str, quick: bool, timeout: float) -> list[dict]:
    """Run one system in a child process under ``timeout``; always clean up after it."""
    tmp = tempfile.mkdtemp(prefix=f"rt-{system}-")
    results, log = Path(tmp) / "results.jsonl", Path(tmp) / "child.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        system,
        "--tmp",
        tmp,
        "--results",
        str(results),
    ] + (["--quick"] if quick else [])
    env = {**os.environ, MARK: tmp, "PYTHONUNBUFFERED": "1"}
    failure = "interrupted"
    try:
        failure = _run_child(cmd, env, log, timeout)
    finally:
        if failure and system == "dlhub":  # the child may not have reached `dlhub down`
            sys.path.insert(0, str(HERE))
            from _systems import dlhub_down

            dlhub_down(Path(tmp), timeout=30)
        leftovers = _kill_marked(tmp)
        if leftovers:
            print(f"[{system}] killed leftover processes: {leftovers}", file=sys.stderr)
        records = []
        if results.exists():
            records = [json.loads(ln) for ln in results.read_text().splitlines() if ln.strip()]
        if failure:
            print(f"[{system}] {failure}; last lines of its log:", file=sys.stderr)
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    if failure and not any(r["metric"] == "error" for r in records):
        records.append({"bench": "roundtrip", "system": system, "metric": "error", "error": failure})
    return records


# ---------------------------------------------------------------- summary


def _fmt(value, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def summary(records: list[dict], systems: list[str]) -> str:
    """A plain-text table of the JSON records, plus the dlhub/raw and dlhub/htex ratios."""
    table: dict[str, dict] = {s: {} for s in systems}
    for rec in records:
        table[rec["system"]][rec["metric"]] = rec

    def get(system, metric, key):
        return table.get(system, {}).get(metric, {}).get(key)

    def ratio(a, b):
        return a / b if a is not None and b else None

    head = (
        f"{'system':<7} {'ready_s':>8} {'up_ready_s':>10} {'p50_ms':>8} {'p99_ms':>8} "
        f"{'noop/s':>9} {'sleep10/s':>9} {'%ideal':>7}"
    )
    lines = [head, "-" * len(head)]
    for s in systems:
        lines.append(
            f"{s:<7} {_fmt(get(s, 'startup', 'ready_s')):>8} "
            f"{_fmt(get(s, 'up_ready', 'up_ready_s')):>10} "
            f"{_fmt(get(s, 'noop_latency', 'p50_ms')):>8} "
            f"{_fmt(get(s, 'noop_latency', 'p99_ms')):>8} "
            f"{_fmt(get(s, 'noop_throughput', 'tasks_per_s'), '.0f'):>9} "
            f"{_fmt(get(s, 'sleep10_throughput', 'tasks_per_s'), '.0f'):>9} "
            f"{_fmt(get(s, 'sleep10_throughput', 'pct_of_ideal'), '.1f'):>7}"
        )
        if "error" in table[s]:
            last = [ln for ln in table[s]["error"]["error"].splitlines() if ln.strip()][-1:]
            lines.append(f"  {s} ERROR: {' '.join(last).strip()[:90]}")
    lines.append("")
    for label, a, b, metric, key in (
        ("dlhub/raw p50 latency", "dlhub", "raw", "noop_latency", "p50_ms"),
        ("htex/raw p50 latency", "htex", "raw", "noop_latency", "p50_ms"),
        ("dlhub/htex noop throughput", "dlhub", "htex", "noop_throughput", "tasks_per_s"),
        ("dlhub/htex sleep10 throughput", "dlhub", "htex", "sleep10_throughput", "tasks_per_s"),
    ):
        lines.append(f"{label:<30} {_fmt(ratio(get(a, metric, key), get(b, metric, key)), '.2f')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sample sizes")
    parser.add_argument(
        "--only",
        default=",".join(SYSTEM_NAMES),
        help="comma-separated systems to run (default: raw,htex,dlhub)",
    )
    parser.add_argument("--timeout", type=float, default=180, help="seconds per system")
    for hidden in ("--child", "--tmp", "--results"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    systems = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEM_NAMES)
    if unknown:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    records = []
    for system in systems:
        for rec in run_system(system, args.quick, args.timeout):
            print(json.dumps(rec, separators=(",", ":")), flush=True)
            records.append(rec)
    print()
    print(summary(records, systems))
    return 1 if any(r["metric"] == "error" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
