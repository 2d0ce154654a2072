"""Fair share between users: bob's single no-op call, idle and while alice has a backlog of
no-ops on the same endpoint (issue 10, item 7: p50 no worse than 3x idle).

A manager (`dlhub-manager serve`, its own process), one endpoint whose policy lets alice and bob
submit, 2 workers. alice submits her no-ops from her own process as fast as it can; bob's serial
calls start once she has submitted all of her backlog and 1,000 of it wait for the endpoint (in
its queue, or held at the manager beyond her fair share in flight there), and stop within a time
budget. The endpoint serves users
round-robin, so bob waits behind at most what is already prefetched at the workers (about
``prefetch_target_ms``, 2 ms, of work each); the manager paces her tasks while bob submits, so
its loop is not saturated by her flood (``manager/fair_share.py``).

    .venv/bin/python benchmarks/fairshare.py            # alice: 100,000 no-ops; bob: 200 calls
    .venv/bin/python benchmarks/fairshare.py --quick    # alice: 20,000 no-ops; bob: 50 calls

Output: JSON lines (bob idle, bob under alice's backlog, the ratio of the p50s); exit 1 when a
step fails or a result is wrong.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

FULL = {"alice_tasks": 100_000, "bob_calls": 200, "budget_s": 120}
QUICK = {"alice_tasks": 20_000, "bob_calls": 50, "budget_s": 60}

ALICE = """
import sys, threading, time
from dlhub.executor import Executor

def nap(seconds):
    if seconds:
        time.sleep(seconds)
    return "noop"

manager, token, home, endpoint, total, task_s = sys.argv[1:7]
ex = Executor(endpoint=endpoint, manager=manager, token=token, home=home)
lock, state = threading.Lock(), {"open": 0, "submitted": 0, "wrong": 0}

def done(future):
    with lock:
        state["open"] -= 1
        if not stop.is_set() and (future.exception() is not None or future.result() != "noop"):
            state["wrong"] += 1

def report():
    while True:
        print(state["submitted"], state["open"], state["wrong"], flush=True)
        time.sleep(0.05)

threading.Thread(target=report, daemon=True).start()
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
while not stop.is_set():  # keep `total` open until bob is done (stdin closes)
    if state["open"] >= int(total):
        time.sleep(0.005)
        continue
    future = ex.submit(nap, float(task_s))
    with lock:
        state["open"] += 1
        state["submitted"] += 1
    future.add_done_callback(done)
ex.shutdown(wait=False, cancel_futures=True)
"""


def noop():
    return "noop"


def _cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip()


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _stats(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "calls": len(samples),
        "p50_ms": round(1000 * statistics.median(ordered), 3),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
    }


def _where(mgr_home: Path, calls: list[tuple[str, float, float]]) -> dict:
    """Where bob's calls spent their time (medians, ms), from the manager's task rows: to the
    manager, from there to a worker starting it, from then until the manager has the result,
    and from there back to bob."""
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{mgr_home / 'dlhub.db'}")
    parts = []
    with engine.connect() as conn:
        for task_id, sent, answered in calls:
            row = conn.execute(
                sa.text("SELECT t_received, t_started, t_finished FROM tasks WHERE task_id = :t"),
                {"t": bytes.fromhex(task_id)},
            ).first()
            if row is not None and None not in row:
                parts.append((row[0] - sent, row[1] - row[0], row[2] - row[1], answered - row[2]))
    engine.dispose()
    names = ("to_manager", "manager_to_worker_start", "run_and_result_to_manager", "manager_to_client")
    if not parts:
        return {}
    where = {n: round(1000 * statistics.median(p[i] for p in parts), 2) for i, n in enumerate(names)}
    slowest = sorted(parts, key=sum)[-3:]  # where the tail went: the three slowest calls, in full
    where["slowest_calls"] = [{n: round(1000 * p[i], 2) for i, n in enumerate(names)} for p in slowest]
    return where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (~1 minute)")
    parser.add_argument(
        "--alice-task-ms",
        type=float,
        default=0.0,
        help="alice's tasks sleep this long (default 0: no-ops); 1 keeps her backlog at the endpoint "
        "on a small machine, where no-ops saturate the manager first",
    )
    parser.add_argument(
        "--prefetch-target-ms",
        type=float,
        default=None,
        help="the endpoint's pool.prefetch_target_ms (default: the config's, 2): the work each "
        "worker keeps queued behind its running task, which another user's call waits behind",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    prefetch = {} if args.prefetch_target_ms is None else {"prefetch_target_ms": args.prefetch_target_ms}
    from dlhub.executor import Executor

    def emit(**fields) -> None:
        print(json.dumps({"bench": "fairshare", **fields}), flush=True)

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="dlhub-fairshare-") as tmp:
        home = Path(tmp)
        mgr_home = home / "manager"
        try:
            manager = subprocess.Popen(
                [sys.executable, "-m", "dlhub.manager.cli", "serve", "--home", str(mgr_home), "--no-rest"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(manager)
            info = _wait(lambda: _read_json(mgr_home / "manager.json"), 60, "the manager")
            admin = (mgr_home / "admin.token").read_text().strip()
            tokens = {
                user: _cli("dlhub.manager.cli", "user", "add", user, "--home", str(mgr_home)).splitlines()[-1]
                for user in ("alice", "bob")
            }
            ep_dir = home / "endpoints" / "shared"
            ep_dir.mkdir(parents=True)
            config = {
                "name": "shared",
                "manager": {"address": info["endpoint_url"], "token": admin},
                "pool": {"workers_per_node": 2, **prefetch},
                "heartbeat_s": 0.5,
                "policy": {"allowed_users": ["alice", "bob"]},
            }
            (ep_dir / "config.yaml").write_text(yaml.safe_dump(config))
            endpoint = subprocess.Popen(
                [sys.executable, "-m", "dlhub.endpoint.cli", "start", "shared", "--home", str(home)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                cwd=home,
            )
            procs.append(endpoint)
            status = ep_dir / "status.json"
            _wait(lambda: _read_json(status).get("workers", 0) >= 2, 120, "the endpoint's workers")

            bob = Executor(endpoint="shared", manager=info["client_url"], token=tokens["bob"], home=str(home))

            calls: list[tuple[str, float, float]] = []  # (task id, sent, answered), wall clock

            def call() -> float:
                start, sent = time.perf_counter(), time.time()
                future = bob.submit(noop)
                value = future.result(120)
                if value != "noop":
                    raise RuntimeError(f"noop() returned {value!r}")
                calls.append((future.task_id, sent, time.time()))
                return time.perf_counter() - start

            for _ in range(20):  # warm: code shipped, run time measured
                call()
            calls.clear()
            idle = [call() for _ in range(sizes["bob_calls"])]
            emit(phase="idle", user="bob", **_stats(idle))
            idle_calls, calls = list(calls), []

            alice = subprocess.Popen(
                [sys.executable, "-c", ALICE, info["client_url"], tokens["alice"], str(home), "shared"]
                + [str(sizes["alice_tasks"]), str(args.alice_task_ms / 1000)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(alice)
            progress = {"submitted": 0, "open": 0, "wrong": 0}

            def read() -> None:
                for line in alice.stdout:
                    progress.update(zip(("submitted", "open", "wrong"), map(int, line.split()), strict=True))

            threading.Thread(target=read, daemon=True).start()
            queued = lambda: _read_json(status).get("queued", 0)  # noqa: E731
            watcher = Executor(endpoint="shared", manager=info["client_url"], token=admin, home=str(home))

            def held() -> int:  # hers waiting at the manager for her fair share of the endpoint
                return watcher.status()["endpoints"].get("shared", {}).get("held", 0)

            # her backlog is in place: all of it submitted, and 1,000 waiting (queued at the
            # endpoint, or held at the manager beyond her share in flight there)
            total = sizes["alice_tasks"]
            _wait(
                lambda: (
                    (progress["submitted"] >= total and queued() + held() >= 1_000)
                    or alice.poll() is not None
                ),
                120,
                "alice's backlog",
            )
            queued_first, held_first = queued(), held()
            busy, deadline = [], time.monotonic() + sizes["budget_s"]
            while len(busy) < sizes["bob_calls"] and time.monotonic() < deadline:
                busy.append(call())
            queued_last, held_last, alice_open = queued(), held(), progress["open"]
            alice.stdin.close()
            emit(
                phase="busy",
                user="bob",
                **_stats(busy),
                alice_tasks=sizes["alice_tasks"],
                alice_task_ms=args.alice_task_ms,
                alice_queued_at_endpoint_first=queued_first,
                alice_queued_at_endpoint_last=queued_last,
                alice_held_at_manager_first=held_first,
                alice_held_at_manager_last=held_last,
                alice_open_last=alice_open,
                alice_submitted=progress["submitted"],
            )
            alice.wait(600)
            time.sleep(1.0)  # the manager's last commits
            for phase, done in (("idle", idle_calls), ("busy", calls)):
                emit(phase=phase, user="bob", metric="where_ms_p50", **_where(mgr_home, done))
            if alice.returncode or progress["wrong"]:
                raise RuntimeError(f"alice's run failed (exit {alice.returncode}, {progress['wrong']} wrong)")
            emit(
                metric="ratio",
                p50_busy_over_idle=round(statistics.median(busy) / statistics.median(idle), 2),
                p99_busy_over_idle=round(_stats(busy)["p99_ms"] / _stats(idle)["p99_ms"], 2),
                target="p50 <= 3x idle",
            )
            bob.shutdown()
            watcher.shutdown()
        except Exception as exc:
            emit(error=f"{type(exc).__name__}: {exc}")
            return 1
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            if endpoint_alive := [p for p in procs if p.poll() is None]:
                for p in endpoint_alive:
                    p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
