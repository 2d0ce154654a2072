"""Raw pyzmq + msgpack chain: client DEALER -> broker ROUTER/ROUTER -> worker DEALERs and back.

The raw limit for the roundtrip benchmark: no framework, no serialization of code.

- Flow control: each worker announces ``CREDITS`` slots; the broker never has more than that many
  tasks outstanding at a worker and queues the rest in its own memory (never at a socket).
  Both broker ROUTERs set ``ROUTER_MANDATORY`` and send non-blocking, keeping what would block in
  an outbox, so a full peer is back-pressure, never a silent drop.
- Batching: every hop forwards what is already waiting as one message (client chunks of
  ``CLIENT_CHUNK`` tasks; broker and workers coalesce). There is no timer on the latency path.

Run as ``python _raw_chain.py broker`` (prints its two ports) or ``... worker ADDR``;
:class:`RawChain` starts one broker and the workers as subprocesses.
"""

from __future__ import annotations

import collections
import itertools
import subprocess
import sys
import time

import msgpack
import zmq

CREDITS = 32  # tasks outstanding per worker (prefetch)
CLIENT_CHUNK = 256  # tasks per client -> broker message
FLUSH_AFTER_S = 0.001  # a worker flushes results once a batch has taken this long
KINDS = {"noop": 0, "sleep10": 1}
NAMES = {kind: name for name, kind in KINDS.items()}
NOTE = (
    f"pyzmq+msgpack, 1 broker + N worker subprocesses; credit flow control ({CREDITS}/worker); "
    f"batched hops (client chunks of {CLIENT_CHUNK}, broker and workers coalesce waiting messages)"
)

pack = msgpack.packb
unpack = msgpack.unpackb


def _router(ctx: zmq.Context) -> tuple[zmq.Socket, int]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    return sock, sock.bind_to_random_port("tcp://127.0.0.1")


def _drain(sock: zmq.Socket, limit: int = 1000):
    """Yield the multipart messages already waiting on ``sock`` (at most ``limit``)."""
    for _ in range(limit):
        if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return
        yield sock.recv_multipart(zmq.NOBLOCK)


def _send_all(sock: zmq.Socket, outbox: collections.deque) -> None:
    """Send queued multipart messages until the outbox is empty or the peer pushes back."""
    while outbox:
        try:
            sock.send_multipart(outbox[0], zmq.NOBLOCK)
        except zmq.Again:
            return
        outbox.popleft()


def run_broker() -> None:
    """Broker loop: queue client tasks, hand them to workers by credit, return results."""
    ctx = zmq.Context()
    front, front_port = _router(ctx)
    back, back_port = _router(ctx)
    print(front_port, back_port, flush=True)
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    try:
        _broker_loop(front, back, poller)
    finally:
        front.close(0)
        back.close(0)
        ctx.term()


def _broker_loop(front: zmq.Socket, back: zmq.Socket, poller: zmq.Poller) -> None:
    pending: collections.deque = collections.deque()  # tasks waiting for a worker credit
    credits: dict[bytes, int] = {}
    owner: dict[int, bytes] = {}  # task id -> client identity
    to_front: collections.deque = collections.deque()
    to_back: collections.deque = collections.deque()
    blocked = False
    while True:
        if to_front or to_back:  # a peer pushed back: also wake when it can take more
            poller.modify(front, zmq.POLLIN | (zmq.POLLOUT if to_front else 0))
            poller.modify(back, zmq.POLLIN | (zmq.POLLOUT if to_back else 0))
            blocked = True
        elif blocked:
            poller.modify(front, zmq.POLLIN)
            poller.modify(back, zmq.POLLIN)
            blocked = False
        poller.poll()
        for client, body in _drain(front):
            if body == b"STOP":
                return
            for task in unpack(body):
                owner[task[0]] = client
                pending.append(task)
        results: dict[bytes, list] = collections.defaultdict(list)
        for worker, kind, body in _drain(back):
            items = unpack(body)
            if kind == b"H":
                credits[worker] = credits.get(worker, 0) + items
                continue
            credits[worker] += len(items)
            for item in items:
                results[owner.pop(item[0])].append(item)
        for client, items in results.items():
            to_front.append([client, pack(items)])
        for worker, free in credits.items():
            if not pending:
                break
            if free:
                batch = [pending.popleft() for _ in range(min(free, len(pending)))]
                credits[worker] = free - len(batch)
                to_back.append([worker, pack(batch)])
        _send_all(front, to_front)
        _send_all(back, to_back)


def run_worker(addr: str) -> None:
    """Worker loop: execute tasks in order, flushing results when idle or after FLUSH_AFTER_S."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    sock.send_multipart([b"H", pack(CREDITS)])
    todo: collections.deque = collections.deque()
    while True:
        if not todo:
            todo.extend(unpack(sock.recv()))
        done, started = [], time.perf_counter()
        while todo:
            tid, kind = todo.popleft()
            if kind == KINDS["sleep10"]:
                time.sleep(0.01)
            done.append([tid, NAMES[kind]])  # what the benchmark's function of that name returns
            if not todo:
                for body in _drain(sock, 100):
                    todo.extend(unpack(body[0]))
            if time.perf_counter() - started >= FLUSH_AFTER_S:
                break
        sock.send_multipart([b"R", pack(done)])


class RawChain:
    """Client side: starts broker + workers, offers ``call`` and ``run_many``."""

    note = NOTE

    def __init__(self, workers: int = 2) -> None:
        cmd = [sys.executable, __file__]
        self.procs = [subprocess.Popen(cmd + ["broker"], stdout=subprocess.PIPE, text=True)]
        line = self.procs[0].stdout.readline().split()
        if len(line) != 2:
            self.close()
            raise RuntimeError("raw broker did not report its ports")
        front_port, back_port = (int(x) for x in line)
        back = f"tcp://127.0.0.1:{back_port}"
        self.procs += [subprocess.Popen(cmd + ["worker", back]) for _ in range(workers)]
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{front_port}")
        self.ids = itertools.count()

    def call(self, fn_name: str):
        """One task, blocking until its result is back."""
        tid = next(self.ids)
        self.sock.send(pack([[tid, KINDS[fn_name]]]))
        ((rid, result),) = unpack(self.sock.recv())
        if rid != tid:
            raise AssertionError(f"raw chain: result of task {rid} came back for task {tid}")
        return result

    def run_many(self, fn_name: str, n: int) -> None:
        """Submit ``n`` tasks (in chunks), then wait for all ``n`` results."""
        kind = KINDS[fn_name]
        first = next(self.ids)
        for start in range(0, n, CLIENT_CHUNK):
            chunk = [[first + i, kind] for i in range(start, min(n, start + CLIENT_CHUNK))]
            self.sock.send(pack(chunk))
        self.ids = itertools.count(first + n)
        seen: set[int] = set()
        while len(seen) < n:
            for rid, result in unpack(self.sock.recv()):
                if rid in seen or not first <= rid < first + n or result != fn_name:
                    raise AssertionError(f"raw chain: unexpected result {[rid, result]} (tasks {first}..)")
                seen.add(rid)

    def close(self) -> None:
        """Stop the broker, kill the workers, reap everything."""
        if hasattr(self, "sock"):
            try:
                self.sock.send(b"STOP", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.sock.close(0)
            self.ctx.term()
        for proc in self.procs[1:]:
            proc.kill()
        try:
            self.procs[0].wait(timeout=1)
        except subprocess.TimeoutExpired:
            self.procs[0].kill()
        for proc in self.procs:
            proc.wait()
            if proc.stdout:
                proc.stdout.close()


if __name__ == "__main__":
    if sys.argv[1] == "broker":
        run_broker()
    else:
        run_worker(sys.argv[2])
