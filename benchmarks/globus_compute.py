"""The unmodified globus-compute-sdk Client against dlhub's Globus Compute API vs dlhub's own
Executor, same stack, same run (issue 13).

Usage: python benchmarks/globus_compute.py [--quick]

Starts a private ``dlhub up --detach --no-examples [--amqp]`` (manager with its GC API + ``local``
endpoint, 2 workers) in a temp home, then measures for each client: serial latency (p50/p99 of
one no-op task, submit to result: the SDK Client polls ``get_result`` every 5 ms, the Executors
wait on their future) and throughput (N no-ops submitted at once: ``batch_run`` + ``get_batch_result``
polling vs ``Executor.submit`` + waiting on the futures). One JSON line per measurement, then a
plain-text summary. The stack is stopped at the end (``dlhub down``).

The SDK's ``Executor`` (results over AMQP) is measured when RabbitMQ answers on 127.0.0.1:5672
(``scripts/rabbitmq-localhost.sh``). Its serial latency is taken over 4 tasks only: the SDK
rate-limits itself to ``api_burst_limit`` (4) submit calls of fewer than 4 tasks per
``api_burst_window_s`` (16 s), then one per 4 s; and its result watcher matches results to
futures every ``poll_period_s`` (0.5 s). Both are the SDK's design, not dlhub's.
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

FULL = {"latency": 500, "throughput": 5000}
QUICK = {"latency": 100, "throughput": 1000}
POLL_S = 0.005

SOURCE = "def noop(x):\n    return x\n"  # defined as a script's function: DillCode sends it by value


def _noop():
    ns: dict = {"__name__": "__main__"}
    exec(SOURCE, ns)
    return ns["noop"]


def dlhub(home: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dlhub.executor.cli", *args, "--home", str(home)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=home)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_sdk(home: Path, sizes: dict, emit) -> None:
    from globus_compute_sdk.errors import TaskPending

    from dlhub.compat.globus_compute import client, endpoint_id

    gcc = client(home=home)
    ep = endpoint_id("local")
    fid = gcc.register_function(_noop())
    lat = []
    for i in range(sizes["latency"]):
        t0 = time.perf_counter()
        tid = gcc.run(i, endpoint_id=ep, function_id=fid)
        while True:
            try:
                assert gcc.get_result(tid) == i
                break
            except TaskPending:
                time.sleep(POLL_S)
        lat.append(time.perf_counter() - t0)
    emit("latency", client="gc-sdk", n=len(lat), p50_ms=pct(lat, 0.5) * 1e3, p99_ms=pct(lat, 0.99) * 1e3)
    n = sizes["throughput"]
    t0 = time.perf_counter()
    batch = gcc.create_batch()
    for i in range(n):
        batch.add(fid, args=(i,))
    ids = gcc.batch_run(ep, batch)["tasks"][fid]
    done: dict = {}
    while len(done) < n:
        pending = [t for t in ids if t not in done]
        for s in range(0, len(pending), 1000):
            for t, r in gcc.get_batch_result(pending[s : s + 1000]).items():
                if not r["pending"]:
                    done[t] = r["result"]
        if len(done) < n:
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    assert [done[t] for t in ids] == list(range(n))
    emit("throughput", client="gc-sdk", n=n, wall_s=wall, tasks_per_s=n / wall)


def bench_sdk_executor(home: Path, sizes: dict, emit) -> None:
    from globus_compute_sdk import Executor

    from dlhub.compat.globus_compute import client, endpoint_id

    fn = _noop()
    with Executor(endpoint_id=endpoint_id("local"), client=client(home=home)) as ex:
        lat = []
        for i in range(4):  # within the SDK's free burst (see the module's docstring)
            t0 = time.perf_counter()
            assert ex.submit(fn, i).result(timeout=60) == i
            lat.append(time.perf_counter() - t0)
        p50, p99 = pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3
        emit("latency", client="gc-sdk-executor", n=len(lat), p50_ms=p50, p99_ms=p99)
        n = sizes["throughput"]
        t0 = time.perf_counter()
        futures = [ex.submit(fn, i) for i in range(n)]
        assert [f.result(timeout=300) for f in futures] == list(range(n))
        wall = time.perf_counter() - t0
        emit("throughput", client="gc-sdk-executor", n=n, wall_s=wall, tasks_per_s=n / wall)


def _broker_up() -> bool:
    import socket

    for port in (int(os.environ.get("RMQ_PORT", "5672")), int(os.environ.get("RMQ_MGMT_PORT", "15672"))):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            return False
    return True


def bench_executor(home: Path, sizes: dict, emit) -> None:
    from dlhub.executor import Executor

    fn = _noop()
    with Executor(endpoint="local", home=str(home)) as ex:
        assert ex.submit(fn, -1).result(timeout=60) == -1  # code sent, worker warm
        lat = []
        for i in range(sizes["latency"]):
            t0 = time.perf_counter()
            assert ex.submit(fn, i).result(timeout=60) == i
            lat.append(time.perf_counter() - t0)
        emit(
            "latency",
            client="dlhub-executor",
            n=len(lat),
            p50_ms=pct(lat, 0.5) * 1e3,
            p99_ms=pct(lat, 0.99) * 1e3,
        )
        n = sizes["throughput"]
        t0 = time.perf_counter()
        futures = [ex.submit(fn, i) for i in range(n)]
        assert [f.result(timeout=300) for f in futures] == list(range(n))
        wall = time.perf_counter() - t0
        emit("throughput", client="dlhub-executor", n=n, wall_s=wall, tasks_per_s=n / wall)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks (CI)")
    opts = parser.parse_args(argv)
    sizes = QUICK if opts.quick else FULL
    records: list[dict] = []

    def emit(metric, **fields):
        rec = {"benchmark": "globus_compute", "metric": metric, **fields}
        records.append(rec)
        print(json.dumps(rec, separators=(",", ":")), flush=True)

    with tempfile.TemporaryDirectory(prefix="dlhub-gc-bench-") as tmp:
        home = Path(tmp)
        os.environ["DLHUB_HOME"] = str(home)
        amqp = _broker_up()
        extra = ["--amqp"] if amqp else []
        up = dlhub(home, "up", "--detach", "--no-examples", "--workers", "2", *extra)
        if up.returncode != 0:
            print(up.stdout, up.stderr, file=sys.stderr)
            return 1
        try:
            bench_sdk(home, sizes, emit)
            if amqp:
                bench_sdk_executor(home, sizes, emit)
            else:
                emit(
                    "skipped",
                    client="gc-sdk-executor",
                    reason="no RabbitMQ on 127.0.0.1 (rabbitmq-localhost.sh)",
                )
            bench_executor(home, sizes, emit)
        finally:
            dlhub(home, "down")
    print()
    for r in records:
        if r["metric"] == "skipped":
            print(f"{r['client']:16} skipped: {r['reason']}")
        elif r["metric"] == "latency":
            print(f"{r['client']:16} serial latency  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms")
        else:
            print(f"{r['client']:16} throughput      {r['tasks_per_s']:9.0f} tasks/s ({r['n']} tasks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
