"""One worker process: runs tasks one at a time, keeps functions warm, reports results.

    endpoint ROUTER <--tcp-- DEALER [worker]: local FIFO of prefetched tasks
                                     |  run head: load code (cached by digest), unpack args,
                                     |  call with captured stdout/stderr and a time limit,
                                     v  pack the result with the caller's serializer
                               results, coalesced while tasks are very short

Before starting each task the worker drains its socket without blocking, so a ``Cancel`` for a
prefetched task arrives in time. Results are sent at once when the queue empties or the last task
took over a millisecond; only runs of very short tasks are coalesced (up to 64), so no timer is
ever on the latency path. The worker exits when its pool (parent process) goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import time
from collections import deque
from typing import Any

import zmq

from dlhub.protocol import errors
from dlhub.protocol import messages as m
from dlhub.protocol.serialize import deserialize, load_function, runtime_versions, serialize

_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)

COALESCE_MAX = 64
SHORT_TASK_S = 0.001


class BoundedText(io.TextIOBase):
    """A stdout/stderr stand-in that keeps the first ``limit`` characters."""

    def __init__(self, limit: int):
        self.limit, self.parts, self.size, self.truncated = limit, [], 0, False

    def write(self, s: str) -> int:
        room = self.limit - self.size
        if room > 0:
            piece = s[:room]
            self.parts.append(piece)
            self.size += len(piece)
        if len(s) > max(room, 0):
            self.truncated = True
        return len(s)

    def getvalue(self) -> str | None:
        if not self.parts:
            return None
        text = "".join(self.parts)
        return text + "\n[... output truncated by dlhub]\n" if self.truncated else text


class _Timeout(BaseException):
    """Raised by SIGALRM inside user code (BaseException so bare `except Exception` can't eat it)."""


def _on_alarm(signum, frame):
    raise _Timeout()


class Worker:
    def __init__(self, config: dict[str, Any], worker_id: str, pool_id: str):
        self.config = config
        self.worker_id, self.pool_id = worker_id, pool_id
        self.payload_limit = int(config.get("payload_limit_bytes", 256 * 1024 * 1024))
        self.output_limit = int(config.get("output_limit_bytes", 64 * 1024))
        self.functions: dict[str, Any] = {}
        self.servables: dict[str, Any] = {}  # record digest -> LoadedServable (warm)
        self.code: dict[str, bytes] = {}
        self.local: deque[list] = deque()
        self.cancelled: set[bytes] = set()
        self.unsent: list[list] = []
        self.parent = os.getppid()
        signal.signal(signal.SIGALRM, _on_alarm)

    def connect(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"w:{self.worker_id}".encode())
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(self.config["endpoint_url"])
        hello = m.Hello(
            "worker",
            self.worker_id,
            self.config["token"],
            self.worker_id,
            {**runtime_versions(), "protocol": m.PROTOCOL_VERSION},
            {
                "pool_id": self.pool_id,
                "pool_name": self.config.get("pool_name", "default"),
                "pid": os.getpid(),
            },
        )
        self.sock.send(m.pack(hello))

    def run(self) -> None:
        self.connect()
        try:
            while True:
                if not self.local:
                    self._flush()
                    if not self.sock.poll(1000):
                        if os.getppid() != self.parent:
                            return  # the pool is gone
                        continue
                if not self._drain():
                    return
                if self.local:
                    self._run_one()
        finally:
            self._flush()
            self.sock.close(linger=2000)
            self.ctx.term()

    def _drain(self) -> bool:
        """Read every waiting message; False when told to shut down."""
        while True:
            if not self.sock.get(_EVENTS) & _POLLIN:  # cheaper than a raised zmq.Again
                return True
            frame = self.sock.recv(zmq.NOBLOCK)
            try:
                msg = m.unpack(frame)
            except errors.ProtocolError as exc:
                print(f"dlhub worker {self.worker_id}: bad frame: {exc}", file=sys.stderr)
                continue
            if isinstance(msg, m.Tasks):
                for digest, blob in msg.code.items():
                    if m.package_key(digest) not in self.servables:  # else: loaded already
                        self.code[digest] = blob
                self.local.extend(msg.tasks)
            elif isinstance(msg, m.Cancel):
                self._cancel(msg.task_ids)
            elif isinstance(msg, m.Shutdown):
                return False
            elif isinstance(msg, m.Refused):
                print(f"dlhub worker {self.worker_id}: refused: {msg.message}", file=sys.stderr)
                return False

    def _cancel(self, task_ids: list[bytes]) -> None:
        queued = {t[m.T_ID] for t in self.local}
        refused = []
        for task_id in task_ids:
            if task_id in queued:
                self.cancelled.add(task_id)
            else:
                refused.append(task_id)
        if refused:
            self.sock.send(m.pack(m.CancelRefused(refused, "already running or finished")))

    def _run_one(self) -> None:
        rec = self.local.popleft()
        task_id = rec[m.T_ID]
        if task_id in self.cancelled:
            self.cancelled.discard(task_id)
            err = errors.infra_error("cancelled", "task was cancelled before it started")
            self.unsent.append(m.result_record(task_id, "cancelled", error=err))
            self._flush()
            return
        started = time.time()
        res = self.execute(rec)
        finished = time.time()
        res[m.R_TIMING] = [started, finished]
        self.unsent.append(res)
        if not self.local or finished - started >= SHORT_TASK_S or len(self.unsent) >= COALESCE_MAX:
            self._flush()

    def _flush(self) -> None:
        if self.unsent:
            self.sock.send(m.pack(m.Results(self.unsent)), copy=False)
            self.unsent = []

    # ---- running one task --------------------------------------------------------------------

    def _function(self, digest: str):
        fn = self.functions.get(digest)
        if fn is None:
            package = m.package_key(digest)
            servable = self.servables.get(package) if package is not None else None
            if servable is None:
                blob = self.code.get(digest)
                if blob is None:
                    raise errors.SerializationError(f"function code {digest} was never sent")
                if package is None:
                    fn = self.functions[digest] = load_function(blob)
                    return fn
                from .servables import load_package

                servable = self.servables[package] = load_package(blob)
            # ``verify:`` and ``servable:`` share one loaded copy: the version checked at publish
            # is warm for its first call; its package bytes are no longer needed here
            for prefix in (m.RUN_PREFIX, m.VERIFY_PREFIX):
                self.code.pop(prefix + package, None)
            fn = self.functions[digest] = servable.verify if digest.startswith(m.VERIFY_PREFIX) else servable
        return fn

    def execute(self, rec: list) -> list:
        task_id, digest, payload, timeout_s, serializer = rec[: m.T_RESOURCES]
        out, err = BoundedText(self.output_limit), BoundedText(self.output_limit)
        try:
            fn = self._function(digest)
            args, kwargs = deserialize(payload)
        except BaseException as exc:  # noqa: BLE001 - any loading failure is the task's error
            return m.result_record(task_id, "failed", error=errors.error_record(exc))
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            if timeout_s:
                signal.setitimer(signal.ITIMER_REAL, float(timeout_s))
            try:
                value = fn(*args, **kwargs)
            finally:
                if timeout_s:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except _Timeout:
            state, body, error = (
                "failed",
                None,
                errors.infra_error("task-timeout", f"task exceeded its time limit of {timeout_s} s"),
            )
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            state, body, error = "failed", None, errors.error_record(exc)
        else:
            state, body, error = self._pack_result(value, serializer)
        finally:
            sys.stdout, sys.stderr = old_out, old_err
        o, e = out.getvalue(), err.getvalue()
        return m.result_record(task_id, state, body, error, None, [o, e] if o or e else None)

    def _pack_result(self, value: Any, serializer: str):
        try:
            body = serialize(value, serializer)
        except errors.SerializationError as exc:
            return (
                "failed",
                None,
                errors.infra_error(
                    "serialization",
                    f"result of type {type(value).__module__}.{type(value).__qualname__} "
                    f"cannot be serialized: {exc}",
                ),
            )
        if len(body) > self.payload_limit:
            return (
                "failed",
                None,
                errors.infra_error(
                    "payload-too-large",
                    f"result of {len(body):,} bytes exceeds the limit of {self.payload_limit:,} bytes",
                ),
            )
        return "succeeded", body, None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="dlhub worker (started by a dlhub pool)")
    parser.add_argument("--config", required=True, help="pool config JSON written by the endpoint")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--pool-id", required=True)
    args = parser.parse_args(argv)
    with open(args.config) as f:
        config = json.load(f)
    with contextlib.suppress(KeyboardInterrupt):
        Worker(config, args.worker_id, args.pool_id).run()


if __name__ == "__main__":
    main()
