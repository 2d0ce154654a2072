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
from dlhub.protocol import gc_serialize as gc
from dlhub.protocol import messages as m
from dlhub.protocol.curve import secure_link_client
from dlhub.protocol.refs import File as RefFile
from dlhub.protocol.refs import needs_staging
from dlhub.protocol.serialize import deserialize, load_function, runtime_versions, serialize

from .warm import OutputCache, WarmServables

_new_tuple = tuple.__new__  # a record made from a tuple of its fields, without argument parsing

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
        self.functions: dict[str, Any] = {}  # plain functions by code digest
        cache = config.get("worker_cache") or {}
        budget = cache.get("memory_budget_mb")
        self.warm = WarmServables(
            int(cache.get("max_warm_servables", 16)), int(budget * 2**20) if budget else None
        )
        self.outputs = OutputCache(int(float(cache.get("output_cache_mb", 64.0)) * 2**20))
        self.data_cache = None  # inputs by reference: made when the first one arrives
        self.groups: dict[bytes, list[bytes]] = {}  # first task id -> the ids of its batch
        self.code: dict[str, bytes] = {}
        self.local: deque[list] = deque()
        self.cancelled: set[bytes] = set()
        self.unsent: list[list] = []
        # tasks (hex ids) whose result names an output this worker stored for the caller: the
        # manager must not give it to another caller from its result cache (it cannot download it)
        self.uncacheable: list[str] = []
        self._send_blocked = False  # the last send found no connection to the endpoint
        self.parent = os.getppid()
        signal.signal(signal.SIGALRM, _on_alarm)

    def connect(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"w:{self.worker_id}".encode())
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        secure_link_client(self.sock, self.config)  # CurveZMQ with the endpoint session's keys
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
                **({"image": self.config["image"]} if self.config.get("image") else {}),
            },
        )
        self._send(hello)

    def _send(self, msg: m.Message) -> bool:
        """Send without ever blocking (as the pool's ``_send``): with no connection to the endpoint
        (refused at the handshake, e.g. after it restarted with new session keys) a plain send
        would block forever. False: not sent (said once per outage on stderr, which the pool
        logs); results stay in ``unsent`` for the next flush, the rest is dropped."""
        try:
            m.send_message(self.sock, msg, zmq.NOBLOCK)  # a large result: a frame of its own
        except zmq.Again:
            if not self._send_blocked:
                print(
                    f"dlhub worker {self.worker_id}: no connection to the endpoint "
                    f"({self.config.get('endpoint_url')}): holding results until it is back",
                    file=sys.stderr,
                )
            self._send_blocked = True
            return False
        self._send_blocked = False
        return True

    def run(self) -> None:
        self.connect()
        poller = zmq.Poller()  # one for the worker's life (Socket.poll builds one per call)
        poller.register(self.sock, zmq.POLLIN)
        try:
            while True:
                if not self.local:
                    self._flush()
                    if not poller.poll(1000):
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
            try:  # a large payload comes as a frame of its own: its buffer, not a copy
                msg = m.unpack(frame, extra=m.recv_rest(self.sock))
            except errors.ProtocolError as exc:
                print(f"dlhub worker {self.worker_id}: bad frame: {exc}", file=sys.stderr)
                continue
            if isinstance(msg, m.Tasks):
                for digest, blob in msg.code.items():
                    if m.package_key(digest) not in self.warm:  # else: loaded already
                        self.code[digest] = blob
                for group in msg.batches:
                    if group:
                        self.groups[group[0]] = list(group)
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
            self._send(m.CancelRefused(refused, "already running or finished"))

    def _run_one(self) -> None:
        rec = self.local.popleft()
        task_id = rec[m.T_ID]
        group = self.groups.pop(task_id, None)
        records = [rec]
        if group is not None:  # a batch: its members were sent together, right behind it
            members = set(group[1:])
            while self.local and self.local[0][m.T_ID] in members:
                records.append(self.local.popleft())
        runnable = []
        for r in records:
            if r[m.T_ID] in self.cancelled:
                self.cancelled.discard(r[m.T_ID])
                err = errors.infra_error("cancelled", "task was cancelled before it started")
                self.unsent.append(m.result_record(r[m.T_ID], "cancelled", error=err))
            else:
                runnable.append(r)
        if not runnable:
            self._flush()
            return
        started = time.time()
        results = self.execute_batch(runnable) if group is not None else [self.execute(rec)]
        finished = time.time()
        # each result with its timing: res._replace(timing=[started, finished]), done faster
        self.unsent.extend(
            _new_tuple(m.ResultRecord, (*res[: m.R_TIMING], [started, finished], res[m.R_OUTPUT]))
            for res in results
        )
        if not self.local or finished - started >= SHORT_TASK_S or len(self.unsent) >= COALESCE_MAX:
            self._flush()

    def _flush(self) -> None:
        if not self.unsent:
            return
        info = self.warm.report()
        if self.uncacheable:
            info = {**info, "uncacheable": self.uncacheable}
        if self._send(m.Results(self.unsent, info)):
            self.unsent, self.uncacheable = [], []

    # ---- running one task --------------------------------------------------------------------

    def _function(self, digest: str):
        package = m.package_key(digest)
        if package is not None:  # a servable: warm in the LRU, or loaded (again) now
            servable = self.warm.get(package)
            if servable is None:
                blob = self.code.pop(m.RUN_PREFIX + package, None)
                blob = self.code.pop(m.VERIFY_PREFIX + package, None) or blob
                servable = self.warm.load(package, blob)
            return servable.verify if digest.startswith(m.VERIFY_PREFIX) else servable
        fn = self.functions.get(digest)
        if fn is None:
            blob = self.code.get(digest)
            if blob is None:
                raise errors.SerializationError(f"function code {digest} was never sent")
            load = gc.load_function if gc.is_code_blob(blob) else load_function  # GC: Globus Compute's
            fn = self.functions[digest] = load(blob)
        return fn

    def _output_key(self, rec: list, fn: Any) -> tuple | None:
        """Deterministic servables' outputs are kept per input digest (unless cache=False)."""
        record = getattr(fn, "record", None)
        if record is None or not record.deterministic or not self.outputs.max_bytes:
            return None
        options = m.task_options(rec)
        if options.get("cache", True) is False or not options.get("key"):
            return None
        return (rec[m.T_FUNCTION], options["key"], rec[m.T_SERIALIZER])

    def execute_batch(self, records: list[m.TaskRecord]) -> list[m.ResultRecord]:
        """One call of a vectorized servable for a batch of calls; if it raises, each call runs
        alone so only the guilty ones fail. Explicit client batches contribute all their inputs
        and get a list back."""
        try:
            servable = self._function(records[0][m.T_FUNCTION])
        except BaseException as exc:  # noqa: BLE001 - a loading failure fails the whole batch
            error = errors.error_record(exc)
            return [m.result_record(r[m.T_ID], "failed", error=error) for r in records]
        inputs, results, ok = [], {}, []
        for rec in records:
            explicit = bool(m.task_options(rec).get("batch"))
            key = None if explicit else self._output_key(rec, servable)
            if key is not None:  # a single call of a deterministic servable: maybe seen before
                cached = self.outputs.get(key)
                self.warm.count(
                    m.package_key(rec[m.T_FUNCTION]), "output_cache_hits" if cached else "output_cache_misses"
                )
                if cached is not None:
                    results[rec[m.T_ID]] = m.result_record(rec[m.T_ID], "succeeded", cached)
                    continue
            try:
                args, kwargs = deserialize(rec[m.T_PAYLOAD])
                if len(args) != 1 or kwargs:
                    raise TypeError("a vectorized servable takes exactly one input per call")
                items = list(args[0]) if explicit else [args[0]]
            except BaseException as exc:  # noqa: BLE001 - this call's own error
                results[rec[m.T_ID]] = m.result_record(rec[m.T_ID], "failed", error=errors.error_record(exc))
                continue
            ok.append((rec, explicit, key, len(inputs), len(items)))
            inputs.extend(items)
        if ok:
            try:
                outputs = self._call_vectorized(servable, inputs, ok[0][0][m.T_TIMEOUT])
                for rec, explicit, key, start, count in ok:
                    value = outputs[start : start + count] if explicit else outputs[start]
                    results[rec[m.T_ID]] = self._result(rec, value, key)
            except _Timeout:  # the batch used up the time limit: re-running each would take N times it
                limit = ok[0][0][m.T_TIMEOUT]
                error = errors.infra_error("task-timeout", f"the batch exceeded its time limit of {limit} s")
                for rec, *_ in ok:
                    results[rec[m.T_ID]] = m.result_record(rec[m.T_ID], "failed", error=error)
            except BaseException:  # noqa: BLE001 - find the guilty calls one by one
                for rec, explicit, key, start, count in ok:
                    try:
                        outputs = self._call_vectorized(
                            servable, inputs[start : start + count], rec[m.T_TIMEOUT]
                        )
                        value = outputs if explicit else outputs[0]
                        results[rec[m.T_ID]] = self._result(rec, value, key)
                    except _Timeout:
                        error = errors.infra_error(
                            "task-timeout", f"task exceeded its time limit of {rec[m.T_TIMEOUT]} s"
                        )
                        results[rec[m.T_ID]] = m.result_record(rec[m.T_ID], "failed", error=error)
                    except BaseException as exc:  # noqa: BLE001 - user code may raise anything
                        results[rec[m.T_ID]] = m.result_record(
                            rec[m.T_ID], "failed", error=errors.error_record(exc)
                        )
        return [results[r[m.T_ID]] for r in records]

    def _call_vectorized(self, servable: Any, inputs: list, timeout_s: float | None) -> list:
        if timeout_s:
            signal.setitimer(signal.ITIMER_REAL, float(timeout_s))
        try:
            outputs = servable(inputs)
        finally:
            if timeout_s:
                signal.setitimer(signal.ITIMER_REAL, 0)
        outputs = list(outputs)
        if len(outputs) != len(inputs):
            raise ValueError(
                f"a vectorized servable returned {len(outputs)} outputs for {len(inputs)} inputs"
            )
        return outputs

    def _result(self, rec: m.TaskRecord, value: Any, output_key: tuple | None) -> m.ResultRecord:
        """Pack one call's value; a deterministic single call's output is kept under its key."""
        state, body, error = self._pack_result(value, rec[m.T_SERIALIZER], rec)
        if state == "succeeded" and output_key is not None and value.__class__ is not RefFile:
            self.outputs.put(output_key, body)
        return m.result_record(rec[m.T_ID], state, body, error)

    def execute(self, rec: m.TaskRecord) -> m.ResultRecord:
        task_id, digest, payload, timeout_s, serializer = rec[: m.T_RESOURCES]
        out, err = BoundedText(self.output_limit), BoundedText(self.output_limit)
        try:
            fn = self._function(digest)
            if getattr(getattr(fn, "record", None), "vectorized", False):
                return self.execute_batch([rec])[0]  # one call, as a batch of one
            key = self._output_key(rec, fn)
            if key is not None:
                cached = self.outputs.get(key)
                self.warm.count(
                    m.package_key(digest), "output_cache_hits" if cached else "output_cache_misses"
                )
                if cached is not None:
                    return m.result_record(task_id, "succeeded", cached)
            if serializer == gc.GC_SERIALIZER:  # a task from the Globus Compute API
                args, kwargs = gc.load_arguments(payload)
            else:
                args, kwargs = deserialize(payload)
            pins = None
            if args.__class__ is list and needs_staging(args, kwargs, fn):  # inputs by reference
                args, kwargs, pins = self._stage(args, kwargs, fn)
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
            state, body, error = self._pack_result(value, serializer, rec)
            # an output stored for this caller is not served from the cache to another
            if key is not None and state == "succeeded" and value.__class__ is not RefFile:
                self.outputs.put(key, body)
        finally:
            sys.stdout, sys.stderr = old_out, old_err
            if pins:
                for pin in pins:  # the staged files may be evicted again
                    pin.unlink(missing_ok=True)
        o, e = out.getvalue(), err.getvalue()
        return m.result_record(task_id, state, body, error, None, [o, e] if o or e else None)

    def _stage(self, args: list, kwargs: dict, fn: Any) -> tuple[list, dict, list]:
        """Inputs by reference: staged into the endpoint's data cache (endpoint/staging.py)."""
        from . import staging

        if self.data_cache is None:
            self.data_cache = staging.cache_for(self.config)
        return staging.stage_arguments(self.data_cache, args, kwargs, fn)

    def _pack_result(self, value: Any, serializer: str, rec: m.TaskRecord | None = None):
        if value.__class__ is RefFile:  # a file returned by reference: data cache, then manager
            try:
                from . import staging

                if self.data_cache is None:
                    self.data_cache = staging.cache_for(self.config)
                out = m.task_options(rec).get("out") if rec is not None else None
                value = staging.store_output(self.data_cache, value.path, out)
            except Exception as exc:  # noqa: BLE001 - the output's error is the task's
                return "failed", None, errors.error_record(exc)
            if rec is not None:
                self.uncacheable.append(rec[m.T_ID].hex())
        try:
            if serializer == gc.GC_SERIALIZER:  # as the Globus Compute SDK decodes it
                body = gc.serialize_result(value).encode()
            else:
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
                    f"result of {len(body):,} bytes exceeds the limit of {self.payload_limit:,} bytes; "
                    f"{errors.RAISE_RESULT_LIMIT}",
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
    from .servables import set_cache_root

    set_cache_root(config.get("servable_cache"))
    with contextlib.suppress(KeyboardInterrupt):
        Worker(config, args.worker_id, args.pool_id).run()


if __name__ == "__main__":
    main()
