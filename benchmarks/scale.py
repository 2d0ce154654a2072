"""One manager, many endpoints: 10, 100 and 1,000 simulated endpoints holding 100,000 workers.

    client (raw DEALER) --Submit--> manager (real, its own process) --Tasks--> simulated endpoints
                        <--Results--                               <--Results-- (answer at once)

The manager is the real one (``Manager``/``ManagerConfig``, SQLite, CURVE) in its own process.
An endpoint is simulated by one DEALER socket that speaks the endpoint protocol: Hello, a
Heartbeat every ``--heartbeat-s`` with the counts a real endpoint sends (``workers`` is its share of
``--workers``), and a Results message answering each Tasks message at once, so the figures are
the manager's own. Up to 500 simulated endpoints share one process (``_sim_endpoints`` below).

Figures per size, each a ratio against the smallest size in the same run:

- tasks/s of no-op tasks spread evenly over the endpoints, and the manager's CPU per task
- manager memory per endpoint (RSS with the endpoints registered minus RSS before)
- heartbeat cost: manager CPU per heartbeat (an idle phase, minus the idle manager's CPU)
- time to notice a silent endpoint (one simulated endpoint stops sending; the manager's
  ``endpoint_timeout_s`` is ``--endpoint-timeout-s``), read from the manager's status
- lost and duplicated tasks (must be zero)

Run: ``python benchmarks/scale.py`` (sizes 10,100,1000; ~3 min) or ``--quick`` (10,100; fewer tasks).
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

import psutil
import zmq

from dlhub.protocol import curve
from dlhub.protocol import messages as m
from dlhub.protocol.serialize import code_digest, serialize, serialize_function

ENDPOINTS_PER_PROCESS = 500
SUBMIT_CHUNK = 500  # tasks per Submit message


def _noop():
    return None


# ---- the manager, in its own process -----------------------------------------------------------

MANAGER_MAIN = """
import sys, logging
from pathlib import Path
from dlhub.manager.broker import Manager, ManagerConfig
logging.basicConfig(level=logging.WARNING, filename=str(Path(sys.argv[1]) / "manager.log"))
mgr = Manager(ManagerConfig(home=Path(sys.argv[1]), endpoint_timeout_s=float(sys.argv[2]),
                            rest_port=None, result_cache_mb=0))
mgr.start()
mgr.run()
"""


def start_manager(home: Path, endpoint_timeout_s: float) -> tuple[subprocess.Popen, dict, str]:
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", MANAGER_MAIN, str(home), str(endpoint_timeout_s)], start_new_session=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the manager exited with {proc.returncode} (log: {home / 'manager.log'})")
        try:
            info = json.loads((home / "manager.json").read_text())
            token = (home / "admin.token").read_text().strip()
            return proc, info, token
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the manager did not write manager.json within 60 s")


# ---- simulated endpoints, in helper processes ---------------------------------------------------


def _sim_endpoints(address: str, key: str, token: str, names: list[str], workers: int, beat_s: float) -> None:
    """Run simulated endpoints until stdin closes; stdin lines: ``silence NAME``. Prints one
    JSON line when every endpoint has its Welcome, then one per ``silence`` done."""
    import select

    ctx = zmq.Context()
    poller = zmq.Poller()
    socks: dict[zmq.Socket, dict] = {}
    payload = serialize(None)
    for name in names:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.identity = f"sim-{name}".encode()
        curve.secure_dealer(sock, address, token, key)
        sock.connect(address)
        session = os.urandom(8).hex()
        hello = m.Hello(
            "endpoint", name, token, session, {"protocol": m.PROTOCOL_VERSION}, {"pid": os.getpid()}
        )
        sock.send(m.pack(hello))
        socks[sock] = {"name": name, "welcomed": False, "silent": False, "completed": 0, "received": 0}
        poller.register(sock, zmq.POLLIN)
    announced = False
    next_beat = time.monotonic() + beat_s
    stdin_fd = sys.stdin.fileno()
    while True:
        for sock, _ in poller.poll(50):
            state = socks[sock]
            while True:
                try:
                    msg = m.unpack(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if state["silent"]:
                    continue
                if isinstance(msg, m.Welcome):
                    state["welcomed"] = True
                elif isinstance(msg, m.Tasks):
                    state["received"] += len(msg.tasks)
                    results = [m.result_record(t[m.T_ID], "succeeded", payload) for t in msg.tasks]
                    sock.send(m.pack(m.Results(results)), zmq.NOBLOCK)
                    state["completed"] += len(results)
        if not announced and all(s["welcomed"] for s in socks.values()):
            print(json.dumps({"registered": len(socks)}), flush=True)
            announced = True
        now = time.monotonic()
        if now >= next_beat:
            for sock, state in socks.items():
                if state["welcomed"] and not state["silent"]:
                    info = {
                        "workers": workers,
                        "queued": 0,
                        "outstanding": 0,
                        "busy_workers": 0,
                        "on_workers": 0,
                        "received": state["received"],
                        "completed": state["completed"],
                        "failed": 0,
                        "heartbeat_s": beat_s,
                    }
                    sock.send(m.pack(m.Heartbeat(info)), zmq.NOBLOCK)
            next_beat = now + beat_s
        if select.select([stdin_fd], [], [], 0)[0]:
            line = sys.stdin.readline()
            if not line:
                break
            verb, _, name = line.strip().partition(" ")
            if verb == "silence":
                for state in socks.values():
                    if state["name"] == name:
                        state["silent"] = True
                print(json.dumps({"silenced": name}), flush=True)
    for sock in socks:
        sock.close(0)
    ctx.term()


def start_sims(
    info: dict, token: str, count: int, workers_total: int, beat_s: float
) -> list[subprocess.Popen]:
    names = [f"sim{i:04d}" for i in range(count)]
    per_endpoint = max(1, workers_total // count)
    procs = []
    for start in range(0, count, ENDPOINTS_PER_PROCESS):
        args = {
            "address": info["endpoint_url"],
            "key": info.get("curve_public_key"),
            "token": token,
            "names": names[start : start + ENDPOINTS_PER_PROCESS],
            "workers": per_endpoint,
            "beat_s": beat_s,
        }
        here = str(Path(__file__).parent)
        code = (
            f"import sys, json; sys.path.insert(0, {here!r}); import scale; "
            "scale._sim_endpoints(**json.loads(sys.argv[1]))"
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    return procs


# ---- the client ------------------------------------------------------------------------------


class Client:
    """A raw client connection: Hello, PutCode once, Submit in chunks, count Results by id."""

    def __init__(self, info: dict, token: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        curve.secure_dealer(self.sock, info["client_url"], token, info.get("curve_public_key"))
        self.sock.connect(info["client_url"])
        self.sock.send(m.pack(m.Hello("client", "", token, os.urandom(8).hex(), {}, {})))
        self.welcome = self._wait(m.Welcome, 30)
        self.blob = serialize_function(_noop)
        self.digest = code_digest(self.blob)
        self.sock.send(m.pack(m.PutCode(self.digest, self.blob)))
        self.request = 0

    def _wait(self, kind: type, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                msg = m.unpack(self.sock.recv())
                if isinstance(msg, kind):
                    return msg
                if isinstance(msg, m.Refused):
                    raise RuntimeError(f"manager refused: {msg.code}: {msg.message}")
        raise TimeoutError(f"no {kind.__name__} within {timeout} s")

    def run(self, endpoints: list[str], n: int, timeout: float) -> dict:
        """Submit ``n`` no-ops round-robin over ``endpoints``; wait for every result."""
        ids = [os.urandom(m.TASK_ID_BYTES) for _ in range(n)]
        by_endpoint: dict[str, list] = {}
        for i, task_id in enumerate(ids):
            rec = m.task_record(task_id, self.digest, serialize(((), {})), None, "auto")
            by_endpoint.setdefault(endpoints[i % len(endpoints)], []).append(rec)
        seen: dict[bytes, int] = {}
        started = time.perf_counter()
        for name, recs in by_endpoint.items():
            for i in range(0, len(recs), SUBMIT_CHUNK):
                self.sock.send(m.pack(m.Submit(name, recs[i : i + SUBMIT_CHUNK])))
        deadline = time.monotonic() + timeout
        failed = 0
        while len(seen) < n and time.monotonic() < deadline:
            if not self.sock.poll(200):
                continue
            msg = m.unpack(self.sock.recv())
            if isinstance(msg, m.Results):
                for res in msg.results:
                    seen[res[m.R_ID]] = seen.get(res[m.R_ID], 0) + 1
                    failed += res[m.R_STATE] != "succeeded"
        elapsed = time.perf_counter() - started
        wanted = set(ids)
        return {
            "elapsed_s": elapsed,
            "lost": len(wanted - set(seen)),
            "duplicates": sum(c - 1 for c in seen.values() if c > 1),
            "failed": failed,
        }

    def status(self) -> dict:
        self.request += 1
        self.sock.send(m.pack(m.StatusRequest(self.request)))
        while True:
            msg = self._wait(m.Status, 30)
            if msg.request_id == self.request:
                return msg.info

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def measure(count: int, args, emit) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"dlhub-scale-{count}-"))
    mgr, info, token = start_manager(tmp / "manager", args.endpoint_timeout_s)
    ps = psutil.Process(mgr.pid)
    sims: list[subprocess.Popen] = []
    client = None
    try:
        time.sleep(1.0)
        rss_before = ps.memory_info().rss
        c0, t0 = cpu_s(ps), time.monotonic()
        time.sleep(args.idle_s)
        idle_cpu_per_s = (cpu_s(ps) - c0) / (time.monotonic() - t0)

        started = time.monotonic()
        sims = start_sims(info, token, count, args.workers, args.heartbeat_s)
        for p in sims:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError("a simulated endpoint process exited before registering")
        register_s = time.monotonic() - started
        time.sleep(args.heartbeat_s * 2)  # every endpoint has sent heartbeats: steady state
        rss_after = ps.memory_info().rss

        c0, t0 = cpu_s(ps), time.monotonic()
        time.sleep(args.idle_s)
        beat_cpu_per_s = (cpu_s(ps) - c0) / (time.monotonic() - t0)
        beats_per_s = count / args.heartbeat_s

        client = Client(info, token)
        names = [f"sim{i:04d}" for i in range(count)]
        client.run(names, min(2000, args.tasks), args.timeout_s)  # warm-up
        c0 = cpu_s(ps)
        run = client.run(names, args.tasks, args.timeout_s)
        task_cpu = cpu_s(ps) - c0

        status = client.status()
        connected = sum(1 for e in status.get("endpoints", {}).values() if e.get("connected"))

        victim = names[-1]
        sims[-1].stdin.write(f"silence {victim}\n")
        sims[-1].stdin.flush()
        sims[-1].stdout.readline()
        silenced = time.monotonic()
        detect_s = None
        while time.monotonic() - silenced < args.endpoint_timeout_s * 3 + 10:
            ep = client.status().get("endpoints", {}).get(victim, {})
            if not ep.get("connected", True):
                detect_s = time.monotonic() - silenced
                break
            time.sleep(0.1)

        rec = {
            "metric": "scale",
            "endpoints": count,
            "workers_total": args.workers,
            "tasks": args.tasks,
            "tasks_per_s": round(args.tasks / run["elapsed_s"], 1),
            "manager_cpu_us_per_task": round(task_cpu / args.tasks * 1e6, 1),
            "lost": run["lost"],
            "duplicates": run["duplicates"],
            "failed": run["failed"],
            "connected": connected,
            "register_s": round(register_s, 2),
            "rss_mb_before": round(rss_before / 2**20, 1),
            "rss_mb_after": round(rss_after / 2**20, 1),
            # below ~1 MB in all the RSS change is allocator noise, not the endpoints' state
            "kb_per_endpoint": (
                round((rss_after - rss_before) / count / 1024, 1)
                if rss_after - rss_before >= 1 << 20
                else None
            ),
            "idle_cpu_pct": round(idle_cpu_per_s * 100, 2),
            "heartbeat_cpu_pct": round(beat_cpu_per_s * 100, 2),
            "heartbeats_per_s": beats_per_s,
            # psutil's CPU times tick every 10 ms: under 5 ticks over the sample it is not a figure
            "us_per_heartbeat": (
                round((beat_cpu_per_s - idle_cpu_per_s) / beats_per_s * 1e6, 1)
                if (beat_cpu_per_s - idle_cpu_per_s) * args.idle_s >= 0.05
                else None
            ),
            "endpoint_timeout_s": args.endpoint_timeout_s,
            "silent_detected_s": None if detect_s is None else round(detect_s, 2),
        }
        emit(rec)
        return rec
    finally:
        if client is not None:
            client.close()
        for p in sims:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in sims:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        mgr.terminate()
        try:
            mgr.wait(30)
        except subprocess.TimeoutExpired:
            mgr.kill()


def summary(records: list[dict]) -> str:
    base = records[0]
    lines = [
        f"{'endpoints':>9} {'tasks/s':>9} {'x base':>7} {'CPU us/task':>11} {'x base':>7} "
        f"{'KB/endpoint':>11} {'us/heartbeat':>12} {'silent seen':>11} {'lost':>5} {'dup':>4}"
    ]
    for r in records:
        lines.append(
            f"{r['endpoints']:>9} {r['tasks_per_s']:>9.0f} {r['tasks_per_s'] / base['tasks_per_s']:>7.2f} "
            f"{r['manager_cpu_us_per_task']:>11.1f} "
            f"{r['manager_cpu_us_per_task'] / base['manager_cpu_us_per_task']:>7.2f} "
            f"{_figure(r['kb_per_endpoint']):>11} {_figure(r['us_per_heartbeat']):>12} "
            f"{str(r['silent_detected_s']) + ' s':>11} {r['lost']:>5} {r['duplicates']:>4}"
        )
    lines.append(
        f"(workers simulated in total: {base['workers_total']}; endpoint_timeout_s "
        f"{base['endpoint_timeout_s']}; ratios against {base['endpoints']} endpoints, same run)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000", help="endpoint counts, comma-separated")
    parser.add_argument("--workers", type=int, default=100_000, help="simulated workers in total")
    parser.add_argument("--tasks", type=int, default=20_000, help="no-op tasks per size")
    parser.add_argument("--heartbeat-s", type=float, default=2.0, help="simulated endpoints' heartbeat")
    parser.add_argument("--endpoint-timeout-s", type=float, default=5.0, help="the manager's setting")
    parser.add_argument("--idle-s", type=float, default=4.0, help="length of each idle CPU sample")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="longest wait for one run's results")
    parser.add_argument("--quick", action="store_true", help="sizes 10,100 and 5,000 tasks (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.tasks, args.idle_s = "10,100", 5000, 2.0
    sizes = [int(s) for s in args.sizes.split(",")]
    records: list[dict] = []

    def emit(rec: dict) -> None:
        print(json.dumps(rec), flush=True)

    for count in sizes:
        records.append(measure(count, args, emit))
    print()
    print(summary(records))
    bad = [
        r for r in records if r["lost"] or r["duplicates"] or r["failed"] or r["connected"] != r["endpoints"]
    ]
    if bad:
        print(f"FAILED: lost, duplicated or failed tasks, or endpoints not connected: {bad}", file=sys.stderr)
        return 1
    if any(r["silent_detected_s"] is None for r in records):
        print("FAILED: a silent endpoint was never marked disconnected", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
