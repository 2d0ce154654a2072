"""Serial no-op latency of this tree against an earlier commit, both stacks up at once.

    .venv/bin/python benchmarks/ab.py --baseline 872119a              # 10 rounds of 4 blocks of 200 calls
    .venv/bin/python benchmarks/ab.py --baseline HEAD~5 --rounds 4    # fewer (~1 min)
    .venv/bin/python benchmarks/ab.py                                 # uncommitted changes vs HEAD
    .venv/bin/python benchmarks/ab.py --quick                         # 2 rounds of 4 blocks of 50 (CI)

Why: a before/after figure taken as two runs minutes apart mostly measures what else the shared
machine did meanwhile (serial p50s of one tree moved 0.89-1.05 ms between runs here). Here the
baseline is checked out in a temporary git worktree, imported through a ``PYTHONPATH`` shim (a
folder whose ``dlhub`` links to that worktree; its processes inherit it), and each side is one
`dlhub up --workers 2` stack with its Executor in a child process. The driver asks the two
children for blocks of serial no-op calls in ABBA order (baseline, this tree, this tree,
baseline; then the other way round), so drift and load hit both alike. Each call's legs come
from its task record (the manager's ``t_received`` and ``t_finished``, the worker's
``t_started``; one host, one clock): where a difference is, not only how large.

Output: one JSON line per side and per leg, then a summary with this tree's / baseline's ratios.
Every result is checked (``noop(1) == 1``); a failed step exits 1. The baseline must have
``benchmarks/_stack.py`` (any commit since the servables benchmark, 2026-11-28).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LEGS = ("client_to_manager", "manager_to_worker_start", "worker_start_to_manager_finished", "to_client")
ABBA = (("baseline", "this", "this", "baseline"), ("this", "baseline", "baseline", "this"))


def noop(x=None):
    return x


# ---- one side: a stack and its Executor, driven over stdin/stdout ----------------------------


def child(bench_dir: str) -> None:
    """Bring up a stack from ``bench_dir``'s ``_stack`` (the baseline's own), then answer each
    line ``N`` with N serial calls' latencies and legs (a JSON list); ``0`` ends."""
    sys.path.insert(0, bench_dir)
    from _stack import Stack, kill_marked

    home = Path(tempfile.mkdtemp(prefix="dlhub-ab-"))
    stack = Stack(home)
    try:
        stack.up()
        for _ in range(300):  # warm: code sent, workers warm, caches filled
            if stack.ex.submit(noop, 1).result(timeout=60) != 1:
                raise SystemExit("warm-up call returned a wrong result")
        print("ready", flush=True)
        for line in sys.stdin:
            n = int(line)
            if n <= 0:
                break
            calls = []
            for _ in range(n):
                t0 = time.time()
                fut = stack.ex.submit(noop, 1)
                if fut.result(timeout=60) != 1:
                    raise SystemExit("a call returned a wrong result")
                calls.append((fut, t0, time.time()))
            rows = []  # (a task record's query waits for its row's group commit itself)
            for fut, t0, t1 in calls:
                info = stack.ex.task_info(fut)
                rx, start, end = info["t_received"], info["t_started"], info["t_finished"]
                rows.append([t1 - t0, rx - t0, start - rx, end - start, t1 - end])
            print(json.dumps(rows), flush=True)
    finally:
        try:
            stack.down()
        finally:
            kill_marked(str(home))
            shutil.rmtree(home, ignore_errors=True)


# ---- the driver ------------------------------------------------------------------------------


def start_child(bench_dir: Path, pythonpath: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "ab.py"), "--child", str(bench_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),  # not the project root: the shim, not this tree, must be found
    )
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise SystemExit(f"the stack from {bench_dir} did not come up")
    return proc


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="commit to compare against (default HEAD)")
    parser.add_argument("--rounds", type=int, default=10, help="ABBA rounds (default 10)")
    parser.add_argument("--block", type=int, default=200, help="serial calls per block (default 200)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of blocks of 50")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    rounds, block = (2, 50) if args.quick else (args.rounds, args.block)
    rev = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline], capture_output=True, text=True
    )
    if rev.returncode != 0:
        raise SystemExit(f"--baseline {args.baseline!r}: {rev.stderr.strip()}")
    baseline = rev.stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="dlhub-ab-tree-"))
    tree, shim = scratch / "tree", scratch / "shim"
    git = ["git", "-C", str(ROOT), "worktree"]
    subprocess.run([*git, "add", "--detach", "-q", str(tree), baseline], check=True)
    shim.mkdir()
    (shim / "dlhub").symlink_to(tree)
    sides: dict[str, subprocess.Popen] = {}
    samples: dict[str, list[list[float]]] = {"baseline": [], "this": []}
    started = time.monotonic()
    try:
        sides["baseline"] = start_child(tree / "benchmarks", str(shim))
        sides["this"] = start_child(HERE, None)
        for r in range(rounds):
            for side in ABBA[r % 2]:
                proc = sides[side]
                proc.stdin.write(f"{block}\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise SystemExit(f"the {side} side stopped (see its output above)")
                samples[side] += json.loads(line)
    finally:
        for proc in sides.values():
            try:
                proc.stdin.write("0\n")
                proc.stdin.flush()
                proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
        subprocess.run([*git, "remove", "--force", str(tree)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    figures = {}
    for side, rows in samples.items():
        total = [r[0] for r in rows]
        figures[side] = {
            "p50_us": round(statistics.median(total) * 1e6),
            "p99_us": round(percentile(total, 0.99) * 1e6),
        }
        for i, leg in enumerate(LEGS):
            figures[side][f"{leg}_p50_us"] = round(statistics.median(r[i + 1] for r in rows) * 1e6)
        commit = baseline if side == "baseline" else "this tree"
        line = {"bench": "ab", "side": side, "commit": commit, "calls": len(rows), **figures[side]}
        print(json.dumps(line))
    b, t = figures["baseline"], figures["this"]
    print(f"\nserial no-op, both stacks up at once, {rounds} ABBA rounds of {block} calls "
          f"({time.monotonic() - started:.0f} s); baseline {baseline}")  # fmt: skip
    print(f"{'':42s}{'baseline':>10s}{'this tree':>11s}{'ratio':>8s}{'diff':>8s}")
    for key in ("p50_us", "p99_us", *(f"{leg}_p50_us" for leg in LEGS)):
        print(f"{key:42s}{b[key]:>10d}{t[key]:>11d}{t[key] / max(b[key], 1):>8.2f}{t[key] - b[key]:>+8d}")
    print("(legs: from each call's task record; the four add up to about the p50 of the whole)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
