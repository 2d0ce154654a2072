"""kill -9 soak: a whole `dlhub up` stack under load, with the manager, the endpoint (with its pools
and workers), one pool or one worker killed at random, for a fixed time. Each round submits a batch
of no-op tasks, kills one component once part of the batch finished, restarts what needs it, and
waits for every future. Each task appends its number to a log file (O_APPEND) when it starts, so
lost and duplicate RUNS are counted from what actually ran.

    .venv/bin/python benchmarks/soak.py                 # 5 minutes, rounds of 5,000 tasks
    .venv/bin/python benchmarks/soak.py --quick         # 20 s of kills (~30 s), rounds of 3,000 tasks
    .venv/bin/python benchmarks/soak.py --seconds 600 --tasks 5000 --seed 7

Output: one JSON line per round ({"component", "tasks", "open_at_kill", "lost", "worker_lost",
"duplicates", "duplicates_not_open"}), then a summary per component. ``lost``: futures never
answered, or answered "succeeded" without a run. ``worker_lost``: tasks running on a killed worker
or pool, which fail with WorkerLost by design (no retry unless asked). Exits 1 when a task is lost
or answered wrongly, when a task ran twice after a manager kill, or when a task whose result had
arrived before a kill ran again.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import psutil

COMPONENTS = ("manager", "endpoint", "pool", "worker")
ROUND_TIMEOUT_S = 300


def mark(i: int, log: str) -> int:
    """A no-op that records that it ran: one O_APPEND write of its number."""
    import os

    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)
    return i


def _cli(*args: str, module: str = "dlhub.executor.cli", timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(pids: list[int]) -> None:
    pids = [p for p in pids if p and p > 0 and p != os.getpid()]  # never 0: that is our own group
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            psutil.Process(pid).wait(10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
            pass


class Stack:
    """A `dlhub up` stack in a private home; knows how to find, kill and restart its parts."""

    def __init__(self, home: Path, workers: int):
        self.home = home
        proc = _cli("up", "--home", str(home), "--workers", str(workers), "--detach", "--no-examples")
        if proc.returncode:
            raise RuntimeError(f"dlhub up failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        info = self.manager_info()
        self.client_port = urlparse(info["client_url"]).port
        self.endpoint_port = urlparse(info["endpoint_url"]).port
        self.managers: list[subprocess.Popen] = []
        self.workers = workers
        self.wait_workers()

    def manager_info(self) -> dict:
        return _read_json(self.home / "manager" / "manager.json")

    def endpoint_pid(self) -> int | None:
        try:
            return int((self.home / "endpoints" / "local" / "endpoint.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def wait_workers(self) -> None:
        status = self.home / "endpoints" / "local" / "status.json"
        _wait(lambda: _read_json(status).get("workers", 0) >= self.workers, 120, "the workers")

    def endpoint_tree(self) -> list[psutil.Process]:
        pid = self.endpoint_pid()
        if pid is None or not _alive(pid):
            return []
        try:
            proc = psutil.Process(pid)
            return [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _named(self, module: str) -> list[int]:
        """Processes of this stack running ``module`` (found by the home in their command line:
        pools run in sessions of their own, and outlive a killed endpoint)."""
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or ())
            if module in cmdline and str(self.home) in cmdline and p.pid != os.getpid():
                out.append(p.pid)
        return out

    def kill(self, component: str, rng: random.Random) -> None:
        if component == "manager":
            pid = self.manager_info()["pid"]
            _kill([pid])
        elif component == "endpoint":  # the daemon with its pools and workers
            _kill([p.pid for p in self.endpoint_tree()] + self._named("dlhub.endpoint."))
        else:
            module = "dlhub.endpoint.pool" if component == "pool" else "dlhub.endpoint.worker"
            pids = _wait(lambda: self._named(module), 60, f"a {component} process to kill")
            _kill([rng.choice(pids)])

    def restart(self, component: str) -> None:
        if component == "manager":
            old = self.manager_info().get("pid")
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dlhub.manager.cli",
                    "serve",
                    "--home",
                    str(self.home / "manager"),
                    "--client-port",
                    str(self.client_port),
                    "--endpoint-port",
                    str(self.endpoint_port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.managers.append(proc)
            _wait(
                lambda: self.manager_info().get("pid") not in (None, old) or proc.poll() is not None,
                60,
                "the restarted manager",
            )
            if proc.poll() is not None:
                raise RuntimeError("the restarted manager exited")
        elif component == "endpoint":
            proc = _cli("start", "local", "--home", str(self.home), "--detach", module="dlhub.endpoint.cli")
            if proc.returncode:
                raise RuntimeError(
                    f"dlhub-endpoint start failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
                )
            self.wait_workers()
        # a killed pool or worker: the endpoint notices and starts another itself

    def down(self) -> None:
        leftovers = (
            [p.pid for p in self.endpoint_tree()]
            + self._named("dlhub.endpoint.")
            + [self.manager_info().get("pid") or 0]
        )
        try:
            _cli("down", "--home", str(self.home), timeout=60)
        except subprocess.TimeoutExpired:
            pass
        _kill(leftovers + [p.pid for p in self.managers])


def run_round(ex, stack: Stack, component: str, n: int, log: Path, rng: random.Random) -> dict:
    """Submit ``n`` tasks, kill ``component`` once a random fraction finished, restart, wait."""
    at = rng.uniform(0.1, 0.7)
    futures: list = []
    done = [0]
    lock = threading.Lock()
    open_at_kill: set[int] = set()
    killed: list[BaseException | None] = []

    def count(_f):
        with lock:
            done[0] += 1

    def killer():  # kills while the main thread may still be submitting: a loaded, lagging client
        try:
            deadline = time.monotonic() + ROUND_TIMEOUT_S
            while done[0] < n * at and time.monotonic() < deadline:
                time.sleep(0.001)
            with lock:
                open_at_kill.update(i for i, f in enumerate(futures) if not f.done())
                open_at_kill.update(range(len(futures), n))
            stack.kill(component, rng)
            stack.restart(component)
            killed.append(None)
        except BaseException as exc:  # reported by the main thread
            killed.append(exc)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    for i in range(n):
        f = ex.submit(mark, i, str(log))
        f.add_done_callback(count)
        with lock:
            futures.append(f)
    thread.join(ROUND_TIMEOUT_S)
    if not killed or killed[0] is not None:
        raise RuntimeError(f"killing the {component} failed: {killed[0] if killed else 'timed out'}")
    finished, not_done = cf.wait(futures, ROUND_TIMEOUT_S)
    worker_lost = wrong = 0
    for i, f in enumerate(futures):
        if f not in finished:
            continue
        exc = f.exception()
        if exc is not None and type(exc).__name__ == "WorkerLost" and component in ("worker", "pool"):
            worker_lost += 1  # by design: the task running on a killed worker fails (no retry)
        elif exc is not None or f.result() != i:
            wrong += 1
    time.sleep(0.5)  # a late duplicate run shows up in the log
    ran = Counter(int(v) for v in log.read_text().split())
    twice = {i for i, c in ran.items() if c > 1}
    succeeded_unrun = sum(
        1 for i, f in enumerate(futures) if f in finished and not f.exception() and not ran[i]
    )
    return {
        "bench": "soak",
        "component": component,
        "tasks": n,
        "kill_at_fraction": round(at, 2),
        "open_at_kill": len(open_at_kill),
        "lost": len(not_done) + succeeded_unrun,
        "worker_lost": worker_lost,
        "wrong_results": wrong,
        "duplicates": len(twice),
        "duplicates_not_open": len(twice - open_at_kill),
    }


def failed(rec: dict) -> bool:
    if rec["lost"] or rec["wrong_results"] or rec["duplicates_not_open"]:
        return True
    return rec["component"] == "manager" and rec["duplicates"] > 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 s, rounds of 3,000 tasks")
    parser.add_argument("--seconds", type=float, default=None, help="how long to keep killing (300)")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per round (5000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument(
        "--components", default=",".join(COMPONENTS), help=f"what to kill, any of {','.join(COMPONENTS)}"
    )
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (20.0 if args.quick else 300.0)
    tasks = args.tasks if args.tasks is not None else (3000 if args.quick else 5000)
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown or not components:
        parser.error(
            f"--components: unknown {', '.join(unknown) or '(none given)'}; use {', '.join(COMPONENTS)}"
        )
    if tasks < 10 or seconds <= 0:
        parser.error("--tasks must be at least 10 and --seconds positive")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    from dlhub.executor import Executor

    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dlhub-soak-") as tmp:
        home = Path(tmp) / "home"
        stack = Stack(home, workers=2)
        try:
            with Executor(endpoint="local", home=str(home), connect_timeout_s=30) as ex:
                # every component once first (in random order), then at random
                order = rng.sample(components, len(components))
                deadline = time.monotonic() + seconds
                round_no = 0
                while round_no < len(order) or time.monotonic() < deadline:
                    component = order[round_no] if round_no < len(order) else rng.choice(components)
                    rec = run_round(ex, stack, component, tasks, Path(tmp) / f"ran-{round_no}.log", rng)
                    rec.update(round=round_no, seed=seed)
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
                    round_no += 1
                    if failed(rec):
                        break
        finally:
            stack.down()
    summary: dict[str, dict] = {}
    for rec in records:
        s = summary.setdefault(
            rec["component"],
            dict.fromkeys(
                (
                    "kills",
                    "tasks",
                    "open_at_kill",
                    "lost",
                    "worker_lost",
                    "duplicates",
                    "duplicates_not_open",
                ),
                0,
            ),
        )
        s["kills"] += 1
        for key in ("tasks", "open_at_kill", "lost", "worker_lost", "duplicates", "duplicates_not_open"):
            s[key] += rec[key]
    ok = bool(records) and not any(failed(r) for r in records)
    print(json.dumps({"bench": "soak", "summary": summary, "seed": seed, "seconds": seconds, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
