"""What the servable benchmarks share: statistics, one `dlhub up` stack with its Executor and
Client, cleanup of everything the stack started, and the run harness (JSON lines, a summary).

    run_bench("batching", __doc__, FULL, QUICK, measure_parts, summary)

The stack's processes inherit a marker variable naming the run's home, so whatever `dlhub down`
leaves behind is found in /proc and killed; a temp home is removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path

from _systems import dlhub_command, dlhub_down

MARK = "DLHUB_BENCH_MARK"  # inherited by everything the stack starts, for cleanup
WORKERS = 2


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def stats(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_ms": ms(percentile(s, 0.5)), "p99_ms": ms(percentile(s, 0.99)), "n": len(s)}


class Stack:
    """``dlhub up`` / ``dlhub down`` on one home, its Executor and Client, and its metrics."""

    def __init__(self, home: Path, workers: int = WORKERS, up_args: tuple[str, ...] = ()):
        self.home, self.workers = home, workers
        self.up_args = list(up_args)  # more `dlhub up` options, e.g. --insecure-loopback
        self.unpack_cache = home / "unpacked"  # the workers' DLHUB_SERVABLE_CACHE, kept in the home
        self.ex = None
        self.client = None
        self.rest_url = self.token = None

    def up(self) -> float:
        """Start the stack; seconds until `dlhub up` returned ready."""
        env = {
            **os.environ,
            "DLHUB_HOME": str(self.home),
            "DLHUB_SERVABLE_CACHE": str(self.unpack_cache),
            MARK: str(self.home),
        }
        cmd = dlhub_command() + ["up", "--home", str(self.home), "--workers", str(self.workers)]
        cmd += ["--detach", "--no-examples", *self.up_args]
        log = self.home / "bench-dlhub-up.log"
        start = time.perf_counter()
        with open(log, "a") as out:  # a file, not a pipe: a detached daemon may keep it open
            proc = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, timeout=120
            )
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
        took = time.perf_counter() - start
        config = json.loads((self.home / "config.json").read_text())
        self.rest_url, self.token = config["rest_url"], config["token"]
        from dlhub.executor import Client, Executor

        self.ex = Executor(endpoint="local", home=str(self.home))
        self.client = Client(home=str(self.home))
        return took

    def close_clients(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=False)
            self.ex = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def down(self) -> None:
        self.close_clients()
        error = dlhub_down(self.home)
        if error:
            raise RuntimeError(error)

    def metrics(self) -> dict:
        """GET /api/v1/metrics: the manager's status with every endpoint's counts."""
        req = urllib.request.Request(
            f"{self.rest_url}/api/v1/metrics", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)

    def endpoint_info(self, snapshot: dict) -> dict:
        return (snapshot.get("endpoints", {}).get("local") or {}).get("info") or {}


def running_pid(home: Path) -> int | None:
    try:
        pid = json.loads((home / "manager" / "manager.json").read_text())["pid"]
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, KeyError, TypeError):
        return None


def marked(home: str) -> list[int]:
    """Processes that carry this run's home in their command line or environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{MARK}={home}".encode() in blob:
            found.append(int(entry.name))
    return found


def kill_marked(home: str) -> list[int]:
    found = marked(home)
    for pid in found:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    if found:
        time.sleep(1.0)
        for pid in marked(home):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    return found


Emit = Callable[..., None]


def run_bench(
    name: str,
    doc: str,
    full: dict,
    quick: dict,
    measure: Callable[[Stack, dict, Emit, argparse.Namespace], None],
    summary: Callable[[list[dict]], str],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Parse --quick/--home (and the benchmark's own flags), run ``measure`` on one stack that is
    always stopped, print JSON lines as they come and the summary at the end."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run, < 60 s)")
    parser.add_argument("--home", help="dlhub home for the stack (default: a temp dir, removed after)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    sizes = dict(quick if args.quick else full)
    if args.home:
        home = Path(args.home).resolve()
        home.mkdir(parents=True, exist_ok=True)
        if running_pid(home):
            parser.error(f"a dlhub stack is already running in {home}: `dlhub down --home {home}` first")
        owned = False
    else:
        home = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        owned = True
    records: list[dict] = []

    def emit(metric, system, **fields):
        record = {"bench": name, "system": system, "metric": metric, **fields}
        print(json.dumps(record, separators=(",", ":")), flush=True)
        records.append(record)

    stack = Stack(home)
    started = time.perf_counter()
    failed = False
    try:
        measure(stack, sizes, emit, args)
    except BaseException as exc:
        failed = True
        traceback.print_exc()
        emit("error", "stack", error=f"{type(exc).__name__}: {exc}".strip()[:2000])
    finally:
        try:
            stack.down()
        except Exception as exc:  # noqa: BLE001 - still clean up below
            print(f"dlhub down failed: {exc}", file=sys.stderr)
        leftovers = kill_marked(str(home))
        if leftovers:
            print(f"killed leftover processes: {leftovers}", file=sys.stderr)
        if owned:
            shutil.rmtree(home, ignore_errors=True)
    emit("run", "stack", wall_s=round(time.perf_counter() - started, 1), quick=args.quick)
    print()
    print(summary(records))
    return 1 if failed else 0
