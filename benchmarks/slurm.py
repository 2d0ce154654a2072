"""Endpoint on a real (local) Slurm: start-up, block replacement, and one block vs two.

Usage: python benchmarks/slurm.py [--quick] [--tasks 10000]   (needs Slurm up: scripts/slurm-localhost.sh)

1. ``start_to_first_result_s``: from ``dlhub-endpoint start`` to the first task result, with
   ``init_blocks: 1`` (sbatch, the job starting, the pool and its worker registering, one task).
2. ``block_replaced_s``: ``scancel`` of the only block, until a task submitted right after it
   completes on the replacement block (missed heartbeats or the provider notice the loss, Parsl's
   strategy submits a new job, its pool registers).
3. ``throughput``: N short tasks (1 ms of work) across one Slurm block vs two (1 worker each).

Every result is checked (task i returns i*i and the id of the Slurm job it ran in, which must be
one of the endpoint's blocks; two blocks must both run tasks); a wrong result prints an ``error``
line and exits 1. ``--quick`` (a smoke run, ~20 s) runs 200 tasks per throughput measurement.
Prints JSON lines and a table. Each endpoint runs against an in-process manager on 127.0.0.1,
from a temp directory (the jobs' working directory: nothing is written where it was started).
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
import traceback
from pathlib import Path

import yaml

from dlhub.executor import Executor
from dlhub.manager import Manager, ManagerConfig

QUICK_TASKS = 200


def work(x: int) -> tuple[int, str | None]:
    """1 ms of CPU; ``(x*x, the Slurm job it ran in)``."""
    t = time.perf_counter()
    while time.perf_counter() - t < 0.001:
        pass
    return x * x, os.environ.get("SLURM_JOB_ID")


def ran_in_job(ex: Executor, x: int, timeout: float) -> str:
    """Run ``work(x)``; check its value and return the Slurm job it ran in."""
    value, job = ex.submit(work, x).result(timeout)
    if value != x * x or not job:
        raise AssertionError(f"work({x}) returned {(value, job)!r}: expected ({x * x}, a Slurm job id)")
    return job


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout} s")


def partition() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout
    return out.split()[0].rstrip("*")


class SlurmEndpoint:
    def __init__(self, home: Path, manager: Manager, name: str, max_blocks: int, init_blocks: int):
        self.home, self.name = home, name
        self.dir = home / "endpoints" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        config = {
            "name": name,
            "manager": {
                "address": manager.endpoint_url,
                "token": (Path(manager.config.home) / "admin.token").read_text().strip(),
            },
            "provider": {
                "type": "slurm",
                "partition": partition(),
                "exclusive": False,
                "cores_per_node": 1,
                "walltime": "00:10:00",
                "init_blocks": init_blocks,
                "min_blocks": init_blocks,
                "max_blocks": max_blocks,
                "launcher": {"type": "single-node"},
            },
            "pool": {"workers_per_node": 1},
            "heartbeat_s": 0.5,
            "heartbeat_threshold_s": 3.0,
            "strategy_period_s": 1.0,
            "max_idletime_s": 600.0,
        }
        (self.dir / "config.yaml").write_text(yaml.safe_dump(config))
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dlhub.endpoint.cli", "start", name, "--home", str(home)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=home,  # sbatch runs the jobs here: stray scheduler output never lands in the caller's cwd
        )

    def status(self) -> dict:
        try:
            return json.loads((self.dir / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def jobs(self) -> list[str]:
        blocks = self.status().get("blocks", {}).get("default", {})
        return [b["job_id"] for b in blocks.values() if b.get("state") in ("RUNNING", "PENDING")]

    def close(self) -> None:
        leftover = self.jobs()
        self.proc.send_signal(2)  # SIGINT: stop now; the endpoint cancels its blocks
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if leftover:  # belt and braces: only this endpoint's own jobs
            subprocess.run(["scancel", *leftover], capture_output=True)


def run(tasks: int) -> list[dict]:
    results: list[dict] = []
    home = Path(tempfile.mkdtemp(prefix="dlhub-bench-slurm-"))
    manager = Manager(ManagerConfig(home=home / "manager"))
    manager.start_thread()
    try:
        client = {
            "manager": manager.client_url,
            "token": (home / "manager" / "admin.token").read_text().strip(),
        }
        # 1 + 2: start-up and replacement, one block
        ep = SlurmEndpoint(home, manager, "bench1", max_blocks=1, init_blocks=1)
        try:
            wait(lambda: manager.router.endpoints.get("bench1"), 60, "registration")
            with Executor(endpoint="bench1", **client) as ex:
                job = ran_in_job(ex, 7, 120)
                results.append(
                    {
                        "metric": "start_to_first_result_s",
                        "value": round(time.perf_counter() - ep.started, 2),
                        "job_id": job,
                    }
                )
                victim = job
                t0 = time.perf_counter()
                subprocess.run(["scancel", str(victim)], check=True)
                replacement = victim
                while replacement == victim:  # tasks may still finish on the dying job at first
                    replacement = ran_in_job(ex, 3, 180)
                results.append(
                    {
                        "metric": "block_replaced_s",
                        "value": round(time.perf_counter() - t0, 2),
                        "cancelled_job": victim,
                        "new_job": replacement,
                    }
                )
                one = throughput(ex, tasks, blocks=1)
        finally:
            ep.close()
        # 3: two blocks
        ep2 = SlurmEndpoint(home, manager, "bench2", max_blocks=2, init_blocks=2)
        try:
            wait(lambda: ep2.status().get("workers", 0) >= 2, 120, "two blocks' workers")
            with Executor(endpoint="bench2", **client) as ex:
                two = throughput(ex, tasks, blocks=2)
        finally:
            ep2.close()
        results.append({"metric": "throughput_tasks_per_s", "blocks": 1, "value": one, "n": tasks})
        results.append({"metric": "throughput_tasks_per_s", "blocks": 2, "value": two, "n": tasks})
        results.append({"metric": "two_vs_one_block", "value": round(two / one, 2)})
    finally:
        manager.stop()
        shutil.rmtree(home, ignore_errors=True)
    return results


def throughput(ex: Executor, n: int, blocks: int) -> float:
    """Tasks/s of ``n`` tasks submitted at once; checks every result and that ``blocks`` jobs ran them."""
    ran_in_job(ex, 1, 60)
    t0 = time.perf_counter()
    futures = [ex.submit(work, i) for i in range(n)]
    results = [f.result(600) for f in futures]
    rate = round(n / (time.perf_counter() - t0), 1)
    wrong = [i for i, (value, job) in enumerate(results) if value != i * i or not job]
    if wrong:
        raise AssertionError(
            f"{len(wrong)} of {n} results wrong, e.g. task {wrong[0]}: {results[wrong[0]]!r}"
        )
    jobs = {job for _, job in results}
    if len(jobs) != blocks:
        raise AssertionError(
            f"{n} tasks ran in {len(jobs)} Slurm jobs {sorted(jobs)}, expected {blocks} blocks"
        )
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK_TASKS} tasks (~20 s)")
    parser.add_argument("--tasks", type=int, help="tasks per throughput measurement (default 10000)")
    args = parser.parse_args(argv)
    if shutil.which("sinfo") is None:
        sys.exit("Slurm is not installed: run scripts/slurm-localhost.sh first")
    tasks = args.tasks or (QUICK_TASKS if args.quick else 10_000)
    try:
        results = run(tasks)
    except Exception as exc:  # a wrong result or a failed step: say which, exit 1
        traceback.print_exc()
        print(
            json.dumps({"bench": "slurm", "metric": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]})
        )
        return 1
    for r in results:
        print(json.dumps({"bench": "slurm", **r}))
    print("\nmetric                               value")
    for r in results:
        label = r["metric"] + (
            f" ({r['blocks']} block{'s' if r['blocks'] > 1 else ''})" if "blocks" in r else ""
        )
        print(f"{label:36} {r['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
