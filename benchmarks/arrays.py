"""A large float64 array echo through dlhub against a raw zero-copy pyzmq chain (issue 15, item 1).

    .venv/bin/python benchmarks/arrays.py            # 1, 10 and 100 MB
    .venv/bin/python benchmarks/arrays.py --quick    # 1 and 10 MB (< 60 s)
    .venv/bin/python benchmarks/arrays.py --profile  # then py-spy each dlhub process, largest size

Same run, one machine, two transports:

- ``dlhub``: one ``dlhub up`` stack (manager, endpoint ``local``, 2 workers) on 127.0.0.1, as
  deployed: CURVE-encrypted links (client-manager, manager-endpoint, endpoint-worker);
  ``Executor.submit(echo, a).result()`` where ``echo`` returns its argument (a numpy float64 array);
- ``dlhub-plain``: a second stack started with ``dlhub up --insecure-loopback``: the same links
  unencrypted (ZeroMQ PLAIN, tokens and the workers' session password still checked);
- ``raw``: three processes, client DEALER -> broker ROUTER/ROUTER -> worker DEALER and back; the
  array goes as its own frame with ``copy=False`` (its buffer, no pickling of the data), the broker
  forwards the frames untouched and the worker rebuilds it with ``np.frombuffer`` and sends the same
  buffer back zero-copy. Unencrypted: the baseline of ``dlhub-plain``;
- ``raw-curve``: the same chain with both of the broker's sockets CURVE servers: the baseline of
  ``dlhub`` (the same encryption on 2 hops each way where dlhub has 3).

Per size: the median wall time of N calls for each (after one warm-up call), the ratio of each
dlhub stack to its baseline (target: within 3x at 100 MB) and to the unencrypted raw chain, and
afterwards each dlhub process's peak RSS (``VmHWM`` of manager, endpoint, workers; the client's
``ru_maxrss``, both stacks' clients being this process). Every echoed array is checked.
JSON lines as they come, then a summary.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from _stack import Stack, marked, median, run_bench
from data import peak_rss

FULL = {"mb": [1, 10, 100], "n": {1: 20, 10: 10, 100: 5}}
QUICK = {"mb": [1, 10], "n": {1: 10, 10: 5}}


def echo(x):
    return x


def make_array(mb: int) -> np.ndarray:
    return np.random.default_rng(mb).random(mb * 1_000_000 // 8)


# ---------------------------------------------------------------- raw zero-copy chain


def curve_client(sock: zmq.Socket, server_key: str | None) -> None:
    """With a server key: this socket speaks CURVE (a fresh client key pair), as dlhub's do."""
    if server_key:
        public, secret = zmq.curve_keypair()
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key.encode(), public, secret


def run_broker(curve: bool) -> None:
    """Forward [client, header, data] to the worker and back, frames untouched (copy=False);
    with ``curve`` both of its sockets are CURVE servers (the same encryption as dlhub's links)."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    public, secret = zmq.curve_keypair()
    for sock in (front, back) if curve else ():
        sock.curve_server, sock.curve_secretkey = True, secret
    ports = [s.bind_to_random_port("tcp://127.0.0.1") for s in (front, back)]
    print(*ports, public.decode() if curve else "-", flush=True)
    worker = back.recv_multipart()[0]  # the worker's hello
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is front:
                frames = front.recv_multipart(copy=False)
                if frames[1].bytes == b"STOP":
                    return
                back.send_multipart([worker, *frames], copy=False)
            else:
                frames = back.recv_multipart(copy=False)
                front.send_multipart(frames[1:], copy=False)


def run_worker(addr: str, server_key: str | None) -> None:
    """Rebuild the array from its frame (np.frombuffer, no copy) and send the same buffer back."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    curve_client(sock, server_key)
    sock.connect(addr)
    sock.send(b"hello")
    while True:
        client, header, data = sock.recv_multipart(copy=False)
        dtype, shape = header.bytes.decode().split(";")
        arr = np.frombuffer(data.buffer, dtype=dtype).reshape([int(n) for n in shape.split(",")])
        out = echo(arr)
        sock.send_multipart([client, header, memoryview(out)], copy=False)


class RawArrayChain:
    """Client side of the raw chain: one broker and one worker subprocess."""

    def __init__(self, curve: bool = False) -> None:
        cmd = [sys.executable, __file__, "--raw"]
        broker = cmd + ["broker", "curve" if curve else "plain"]
        self.procs = [subprocess.Popen(broker, stdout=subprocess.PIPE, text=True)]
        front, back, key = self.procs[0].stdout.readline().split()
        self.procs.append(subprocess.Popen(cmd + ["worker", f"tcp://127.0.0.1:{back}", key]))
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        curve_client(self.sock, None if key == "-" else key)
        self.sock.connect(f"tcp://127.0.0.1:{front}")

    def call(self, arr: np.ndarray) -> np.ndarray:
        header = f"{arr.dtype.str};{','.join(map(str, arr.shape))}".encode()
        self.sock.send_multipart([header, memoryview(arr)], copy=False)
        header, data = self.sock.recv_multipart(copy=False)
        dtype, shape = header.bytes.decode().split(";")
        return np.frombuffer(data.buffer, dtype=dtype).reshape([int(n) for n in shape.split(",")])

    def close(self) -> None:
        try:
            self.sock.send_multipart([b"STOP"], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.sock.close(0)
        self.ctx.term()
        self.procs[1].kill()
        try:
            self.procs[0].wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.procs[0].kill()
        for proc in self.procs:
            proc.wait()
        self.procs[0].stdout.close()


# ---------------------------------------------------------------- measurement


def timed(call, arr: np.ndarray, n: int) -> list[float]:
    """n timed calls (after one untimed warm-up); raises unless each echo equals ``arr``."""
    if not np.array_equal(call(arr), arr):
        raise AssertionError(f"echo of {arr.nbytes} bytes came back different")
    took = []
    for _ in range(n):
        t = time.perf_counter()
        out = call(arr)
        took.append(time.perf_counter() - t)
        if not np.array_equal(out, arr):
            raise AssertionError(f"echo of {arr.nbytes} bytes came back different")
        del out
    return took


def measure(stack, sizes, emit, args) -> None:
    """Per size, in turn: raw chain (no encryption), dlhub --insecure-loopback (PLAIN links, no
    encryption: the same transport), raw chain with CURVE, dlhub as deployed (CURVE links)."""
    raws = {"raw": RawArrayChain(curve=False), "raw-curve": RawArrayChain(curve=True)}
    plain_home = Path(tempfile.mkdtemp(prefix="bench-arrays-plain-"))  # not a prefix of the other
    plain = Stack(plain_home, up_args=("--insecure-loopback",))
    try:
        emit("startup", "dlhub", up_s=round(stack.up(), 3))
        emit("startup", "dlhub-plain", up_s=round(plain.up(), 3))
        pairs = (("dlhub-plain", plain, "raw"), ("dlhub", stack, "raw-curve"))
        for mb in sizes["mb"]:
            arr, n = make_array(mb), sizes["n"][mb]
            raw_s = {}
            for name, chain in raws.items():
                raw_s[name] = median(timed(chain.call, arr, n))
                emit("echo", name, mb=mb, n=n, median_s=round(raw_s[name], 4))
            for system, st, baseline in pairs:
                dl_s = median(timed(lambda a, ex=st.ex: ex.submit(echo, a).result(600), arr, n))
                emit(
                    "echo",
                    system,
                    mb=mb,
                    n=n,
                    median_s=round(dl_s, 4),
                    baseline=baseline,
                    ratio=round(dl_s / raw_s[baseline], 2),
                    ratio_vs_raw=round(dl_s / raw_s["raw"], 2),
                )
            del arr
        emit("peak_rss_mib", "dlhub", **peak_rss(stack))
        emit("peak_rss_mib", "dlhub-plain", **peak_rss(plain))
        if args.profile:
            profile(stack, make_array(sizes["mb"][-1]), sizes["n"][sizes["mb"][-1]], emit)
    finally:
        for chain in raws.values():
            chain.close()
        try:
            plain.down()
        except RuntimeError as exc:  # say it, without hiding what failed before
            print(f"stopping the --insecure-loopback stack: {exc}", file=sys.stderr)
        shutil.rmtree(plain_home, ignore_errors=True)


def _roles(home: Path) -> dict[int, str]:
    roles = {}
    for pid in marked(str(home)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "dlhub.endpoint.worker" in cmd:
            roles[pid] = f"worker{pid}"
        elif "dlhub-manager" in cmd or "dlhub.manager" in cmd:
            roles[pid] = "manager"
        elif "endpoint" in cmd and "start" in cmd and "dlhub.endpoint.pool" not in cmd:
            roles[pid] = "endpoint"
    return roles


def profile(stack, arr: np.ndarray, n: int, emit) -> None:
    """py-spy (200 Hz, non-blocking) on manager, endpoint and workers during ``n`` echoes of
    ``arr``: per process, the CPU seconds per call of its busiest lines (idle threads excluded)."""
    if not shutil.which("py-spy"):
        emit("profile", "dlhub", error="py-spy not found (pip install py-spy)")
        return
    ex, out_dir = stack.ex, stack.home / "profile"
    out_dir.mkdir(exist_ok=True)
    ex.submit(echo, arr).result(600)
    spies = {}
    for pid, role in _roles(stack.home).items():
        cmd = ["py-spy", "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", "raw"]
        cmd += ["-o", str(out_dir / f"{role}.txt")]
        spies[role] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # py-spy attached
    took = [time.perf_counter()]
    for _ in range(n):
        ex.submit(echo, arr).result(600)
    took = (time.perf_counter() - took[0]) / n
    for proc in spies.values():
        proc.send_signal(signal.SIGINT)
    for role, proc in spies.items():
        proc.wait(timeout=60)
        lines: collections.Counter = collections.Counter()
        path = out_dir / f"{role}.txt"
        for line in path.read_text().splitlines() if path.exists() else []:
            stack_text, _, count = line.rpartition(" ")
            lines[stack_text.split(";")[-1]] += int(count)
        if not lines:
            continue
        per_call = {k: round(v / 200 / n, 3) for k, v in lines.most_common(8)}
        total = round(sum(lines.values()) / 200 / n, 3)
        emit(
            "profile",
            role.rstrip("0123456789"),
            mb=arr.nbytes // 1_000_000,
            s_per_call=round(took, 3),
            cpu_s_per_call=total,
            top=per_call,
        )


def summary(records: list[dict]) -> str:
    by = {(r["metric"], r["system"], r.get("mb")): r for r in records}
    lines = ["float64 array echo: dlhub Executor vs raw zero-copy pyzmq chain (same run, median of n)"]
    head = f"  {'MB':>5} {'n':>3} {'transport':>9} {'raw s':>9} {'dlhub s':>9} {'dlhub/raw':>10}"
    lines.append(head)
    for mb in sorted({r["mb"] for r in records if r["metric"] == "echo"}):
        for system, transport in (("dlhub-plain", "plain"), ("dlhub", "CURVE")):
            rec = by.get(("echo", system, mb))
            if rec is None:
                continue
            raw = by[("echo", rec["baseline"], mb)]
            times = f"{raw['median_s']:>9.4f} {rec['median_s']:>9.4f}"
            lines.append(f"  {mb:>5} {rec['n']:>3} {transport:>9} {times} {rec['ratio']:>9.2f}x")
    for system in ("dlhub-plain", "dlhub"):
        rss = by.get(("peak_rss_mib", system, None))
        if rss:
            fields = {k: v for k, v in rss.items() if k not in ("bench", "system", "metric")}
            rss_text = ", ".join(f"{k} {v}" for k, v in sorted(fields.items()))
            lines.append(f"  peak RSS MiB after the run ({system}): {rss_text}")
    for rec in records:
        if rec["metric"] == "profile" and "top" in rec:
            lines.append(f"  profile {rec['system']}: {rec['cpu_s_per_call']} CPU s per {rec['mb']} MB call")
            lines += [f"      {s:6.3f} s  {where}" for where, s in rec["top"].items()]
    error = by.get(("error", "stack", None))
    if error:
        lines.append(f"  FAILED: {error['error']}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--profile", action="store_true", help="then py-spy each dlhub process during the largest echo"
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--raw":
        if sys.argv[2] == "broker":
            run_broker(sys.argv[3] == "curve")
        else:
            run_worker(sys.argv[3], None if sys.argv[4] == "-" else sys.argv[4])
    else:
        sys.exit(run_bench("arrays", __doc__, FULL, QUICK, measure, summary, add_arguments))
