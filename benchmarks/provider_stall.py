"""No-op round trips while the endpoint's scheduler command hangs (issue 11: the loops never wait).

An in-process manager and an endpoint with two pools: ``default`` (local workers, where the no-ops
run) and ``stuck`` (a ``slurm`` provider whose ``sbatch``/``sacct``/``scancel`` are scripts on
PATH: its job stays PENDING, so the endpoint asks about it every heartbeat). Phase ``baseline``
times sequential no-op calls; phase ``stall`` makes ``sacct`` hang for 30 s and times as many
calls during the hang. Prints JSON lines (one per phase: p50/p99/max in ms) and a summary with
the p99 ratio (the goal: within 2x).

    .venv/bin/python benchmarks/provider_stall.py            # 1,000 calls a phase
    .venv/bin/python benchmarks/provider_stall.py --quick    # 200 calls a phase (~15 s)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

from conftest import start_custom_stack, stop_custom_stack, wait_until  # noqa: E402
from test_provider_stall import STALL_S, fake_slurm, latencies, stalled_endpoint_config  # noqa: E402


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(1e3 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 calls a phase instead of 1,000")
    args = parser.parse_args(argv)
    calls = 200 if args.quick else 1000
    home = Path(tempfile.mkdtemp(prefix="bench-provider-stall-"))
    state = home / "fake-slurm"
    state.mkdir()
    os.environ["PATH"] = f"{fake_slurm(home)}{os.pathsep}{os.environ['PATH']}"
    os.environ["FAKE_SLURM_DIR"] = str(state)
    records = []
    cs = start_custom_stack(home / "stack", endpoint=stalled_endpoint_config(), workers=2)
    try:
        ex = cs.executor()
        latencies(ex, 50)
        for phase in ("baseline", "stall"):
            if phase == "stall":
                (state / "stall").write_text(str(max(STALL_S, calls // 20)))
                wait_until(lambda: (state / "stalled").exists(), 15, what="sacct to hang")
            samples = latencies(ex, calls)
            during = phase == "stall" and not (state / "stall-over").exists()
            record = {
                "bench": "provider_stall",
                "phase": phase,
                "calls": calls,
                "p50_ms": pct(samples, 0.5),
                "p99_ms": pct(samples, 0.99),
                "max_ms": pct(samples, 1.0),
                **({"all_during_the_hang": during} if phase == "stall" else {}),
            }
            print(json.dumps(record), flush=True)
            records.append(record)
    finally:
        (state / "stall").unlink(missing_ok=True)
        stop_custom_stack(cs)
        shutil.rmtree(home, ignore_errors=True)
    base, stall = records
    ratio = stall["p99_ms"] / base["p99_ms"]
    print(
        f"\nno-op p99 {base['p99_ms']} ms without the hang, {stall['p99_ms']} ms while sacct hangs "
        f"({ratio:.2f}x; goal <= 2x); max {base['max_ms']} / {stall['max_ms']} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
