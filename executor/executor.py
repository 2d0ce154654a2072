"""``Executor``: run Python functions on a dlhub endpoint through the manager, futures-style.

    ex.submit(fn, *args) -> DLHubFuture   (code serialized once per function per Executor)
        |  record [task_id, digest, payload, timeout_s, serializer] -> Connection (I/O thread)
        v
    manager -> endpoint -> worker; results stream back and resolve futures by task id

A remote exception is re-raised as its own type when it can be rebuilt, with the remote
traceback as ``__cause__``; otherwise as a typed :class:`dlhub.protocol.RemoteError`.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures as cf
from typing import Any

from dlhub.protocol import (
    DEFAULT_PAYLOAD_LIMIT_BYTES,
    EndpointRequired,
    ManagerUnreachable,
    PayloadTooLarge,
    TaskCancelled,
    UnknownEndpoint,
)
from dlhub.protocol import messages as m
from dlhub.protocol.errors import RAISE_CLIENT_LIMIT, choose_endpoint, exception_from_record
from dlhub.protocol.serialize import (
    code_digest,
    deserialize,
    input_digest,
    runtime_versions,
    serialize,
    serialize_function,
)

from ._progress import TaskProgress
from .config import ClientConfig
from .connection import Connection


class DLHubFuture(cf.Future):
    """A future for one remote task. ``task_id`` names it everywhere (manager, endpoint, CLI).

    Successful results are decoded lazily, in the thread that asks for them.
    """

    def __init__(self, task_id: bytes, executor: Executor):
        super().__init__()
        self._task_id = task_id
        self._executor = executor
        self.sent = False
        self._cancel_answer: threading.Event | None = None  # made only when a cancel is asked
        self._raw: bytes | None = None
        self._decoded = False
        self.output: tuple[str | None, str | None] | None = None

    @property
    def task_id(self) -> str:
        return self._task_id.hex()

    def result(self, timeout: float | None = None) -> Any:
        value = super().result(timeout)
        if not self._decoded:
            self._value = deserialize(value) if value is not None else None
            self._decoded = True
        return self._value

    def cancel(self) -> bool:
        """Cancel the task if it has not started, wherever it waits (client, manager, endpoint).

        Blocks for at most ``Executor.cancel_timeout_s`` while the manager and the endpoint
        answer; returns True only when the task was really cancelled.
        """
        return self._executor._cancel([self], wait=True)

    def _base_cancel(self) -> bool:
        return super().cancel()


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` whose tasks run on a dlhub endpoint.

    Args:
        endpoint: name of the endpoint to run on; default ``$DLHUB_ENDPOINT``, else
            ``default_endpoint`` in ``$DLHUB_HOME/config.json`` (``"local"`` after ``dlhub up``),
            else the manager's default endpoint, else the only connected one
            (``EndpointRequired`` when several are and none is the default).
        manager: manager URL; default from ``$DLHUB_MANAGER`` or ``$DLHUB_HOME/config.json``.
        token: access token; default from ``$DLHUB_TOKEN`` or the config file.
        manager_key: the manager's CURVE public key to pin; default ``$DLHUB_MANAGER_KEY``, the config
            file's (``dlhub up`` writes it), or the key a manager of this user on this host publishes.
        task_timeout_s: per-task time limit; an overrunning task fails with ``TaskTimeout``.
        result_serializer: ``"auto"`` (msgpack for plain data, else dill), ``"dill"`` or ``"msgpack"``.
        payload_limit_bytes: largest arguments accepted (``PayloadTooLarge`` above it).
        batch_size: most tasks sent in one message to the manager.
        manager_timeout_s: fail pending futures with ``ManagerUnreachable`` when the manager has
            not answered for this long (it answers heartbeats every 2 s, so long tasks are fine).
        resources: what each task needs: ``{"cores": 2, "memory_gb": 8, "gpus": 1, "pool": "gpu"}``
            (any subset); the endpoint runs it on a pool that offers it, or fails it at once.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        manager: str | None = None,
        token: str | None = None,
        *,
        task_timeout_s: float | None = None,
        result_serializer: str = "auto",
        payload_limit_bytes: int = DEFAULT_PAYLOAD_LIMIT_BYTES,
        batch_size: int = 1024,
        connect_timeout_s: float = 10.0,
        cancel_timeout_s: float = 10.0,
        home: str | None = None,
        resources: dict[str, Any] | None = None,
        manager_timeout_s: float = 120.0,
        cache: bool = True,
        manager_key: str | None = None,
    ):
        if task_timeout_s is not None and task_timeout_s <= 0:
            raise ValueError(f"task_timeout_s must be positive, got {task_timeout_s!r}")
        if resources is not None:
            problem = m.check_resources(resources)
            if problem:
                raise ValueError(f"resources: {problem}")
        self.resources = dict(resources) if resources else None
        self.cache = cache  # deterministic servables: answer from result caches when possible
        config = ClientConfig.resolve(manager, token, home, manager_key)
        self.endpoint = endpoint or config.endpoint  # None: the manager's default (after connecting)
        self.task_timeout_s = task_timeout_s
        self.result_serializer = result_serializer
        self.payload_limit_bytes = payload_limit_bytes
        self.cancel_timeout_s = cancel_timeout_s
        self._futures: dict[bytes, DLHubFuture] = {}
        self._functions: dict[int, tuple[Callable, str]] = {}
        self._shutdown = False
        self._denied: BaseException | None = None  # the token was revoked or replaced
        self._conn = Connection(
            config.manager,
            config.token,
            on_results=self._on_results,
            on_cancel_refused=self._on_cancel_refused,
            pending_ids=self._sent_pending_ids,
            batch_size=batch_size,
            connect_timeout_s=connect_timeout_s,
            manager_timeout_s=manager_timeout_s,
            on_manager_lost=self._on_manager_lost,
            on_access_denied=self._access_denied,
            server_key=config.manager_key,
        )
        endpoints = self._conn.welcome.get("endpoints", {})
        endpoint = self.endpoint = self._choose_endpoint(endpoints, endpoint, config)
        if not endpoints[endpoint].get("connected"):
            warnings.warn(
                f"endpoint {endpoint!r} is not connected to the manager now: tasks wait for it "
                f"(see `dlhub-endpoint status {endpoint}` on its host)",
                stacklevel=2,
            )
        self._warn_on_version_mismatch(endpoints[endpoint].get("versions") or {})

    def _choose_endpoint(self, endpoints: dict, named: str | None, config: ClientConfig) -> str:
        """The endpoint asked for (argument, ``$DLHUB_ENDPOINT``, config file), else the
        manager's default, else the only connected one; closes the connection if there is none."""
        try:
            if self.endpoint is None:
                connected = {name: bool(ep.get("connected")) for name, ep in endpoints.items()}
                return choose_endpoint(connected, self._conn.welcome.get("default_endpoint"))
            if self.endpoint not in endpoints:
                where = f"$DLHUB_ENDPOINT or default_endpoint in {config.home / 'config.json'}"
                source = "" if named else f" ({where})"
                raise UnknownEndpoint(
                    f"endpoint {self.endpoint!r}{source} is not registered with the manager at "
                    f"{config.manager} (known: {', '.join(sorted(endpoints)) or 'none'})"
                )
            return self.endpoint
        except EndpointRequired as exc:
            self._conn.close()
            raise exc.with_hint("pass endpoint=<name> to Executor (or set $DLHUB_ENDPOINT)") from None
        except UnknownEndpoint:
            self._conn.close()
            raise

    def _sent_pending_ids(self) -> list[bytes]:
        """Unresolved tasks the manager has been sent (unsent ones are not its business yet)."""
        return [task_id for task_id, fut in list(self._futures.items()) if fut.sent]

    @staticmethod
    def _warn_on_version_mismatch(theirs: dict) -> None:
        mine = runtime_versions()
        if not theirs:
            return
        py_mine, py_theirs = mine["python"].rsplit(".", 1)[0], str(theirs.get("python", ""))
        if py_theirs.rsplit(".", 1)[0] != py_mine or theirs.get("dill") != mine["dill"]:
            warnings.warn(
                f"this process runs Python {mine['python']} / dill {mine['dill']} but the "
                f"endpoint runs Python {theirs.get('python')} / dill {theirs.get('dill')}; "
                "functions sent by value may fail to load there",
                stacklevel=3,
            )

    # ---- submitting --------------------------------------------------------------------------

    def _digest(self, fn: Callable) -> str:
        known = self._functions.get(id(fn))
        if known is not None and known[0] is fn:
            return known[1]
        blob = serialize_function(fn)
        digest = code_digest(blob)
        self._functions[id(fn)] = (fn, digest)
        self._conn.send(("code", digest, blob))
        return digest

    @staticmethod
    def _servable_ref(ref: str) -> str:
        from dlhub.protocol.servable import parse_ref

        owner, name, version = parse_ref(ref)  # a malformed name fails here, not remotely
        return f"{m.REF_PREFIX}{owner}/{name}" + (f":{version}" if version else "")

    def submit(self, fn: Callable | str, /, *args: Any, **kwargs: Any) -> DLHubFuture:
        """Run ``fn(*args, **kwargs)`` on the endpoint. ``fn`` is a function (sent by value once)
        or a published servable, ``"owner/name"`` (its latest ready version) or
        ``"owner/name:version"``; the manager resolves the name when the task arrives."""
        return self._submit(fn, args, kwargs, self.cache, batch=False)

    def _submit(self, fn: Callable | str, args: tuple, kwargs: dict, cache: bool, batch: bool) -> DLHubFuture:
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        if self._denied is not None:
            raise type(self._denied)(str(self._denied))
        options = None
        if isinstance(fn, str):
            digest = self._servable_ref(fn)
            options = _call_options(args, kwargs, cache, batch)
        elif callable(fn):
            digest = self._digest(fn)
        else:
            raise TypeError(
                f"fn must be callable or a servable name 'owner/name[:version]', got {type(fn).__name__}"
            )
        payload = serialize([list(args), kwargs])
        if len(payload) > self.payload_limit_bytes:
            raise PayloadTooLarge(len(payload), self.payload_limit_bytes, "arguments", RAISE_CLIENT_LIMIT)
        task_id = os.urandom(m.TASK_ID_BYTES)
        fut = DLHubFuture(task_id, self)
        self._futures[task_id] = fut
        rec = [task_id, digest, payload, self.task_timeout_s, self.result_serializer, self.resources, options]
        self._conn.send(("task", self.endpoint, fut, rec))
        return fut

    def with_options(self, *, cache: bool = True) -> _CallOptions:
        """The same executor with per-call options: ``ex.with_options(cache=False).submit(...)``
        runs a deterministic servable even when a cached result exists."""
        return _CallOptions(self, cache)

    def map(
        self,
        fn: Callable | str,
        *iterables: Iterable,
        timeout: float | None = None,
        chunksize: int = 1,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> Iterator:
        """Like ``concurrent.futures.Executor.map``: results in order, ``timeout`` overall.

        ``batch_size`` (servables declared vectorized): send the inputs of one iterable in
        explicit batches of that many, one task each; results still come one per input.
        ``progress=True``: a bar on stderr (count, rate, ETA) that moves as results arrive, in
        any order; a one-line summary instead when stderr is not a terminal."""
        return self._map(fn, iterables, timeout, batch_size, self.cache, progress)

    def _map(self, fn, iterables, timeout, batch_size, cache, progress=False) -> Iterator:
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        if batch_size is None:
            fs = [self._submit(fn, args, {}, cache, batch=False) for args in zip(*iterables)]
            per_future = 1
        else:
            if not isinstance(fn, str):
                raise TypeError("batch_size applies to published vectorized servables ('owner/name')")
            if len(iterables) != 1:
                raise ValueError(
                    "batch_size takes exactly one iterable (the inputs of the vectorized servable)"
                )
            if batch_size < 1:
                raise ValueError(f"batch_size must be at least 1, got {batch_size}")
            items = list(iterables[0])
            chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
            fs = [self._submit(fn, (chunk,), {}, cache, batch=True) for chunk in chunks]
            per_future = 0  # a list of results per future
        tracker = _track(fs, fn, started) if progress else None

        def wait(f):
            return f.result() if deadline is None else f.result(max(0.0, deadline - time.monotonic()))

        def results() -> Iterator:
            try:
                fs.reverse()
                while fs:
                    value = wait(fs[-1])
                    fs.pop()
                    if per_future:
                        yield value
                    else:
                        yield from value
            finally:
                try:
                    if fs:
                        self._cancel(fs, wait=False)
                finally:
                    if tracker is not None:
                        tracker.close()

        return results()

    # ---- results -----------------------------------------------------------------------------

    def _on_results(self, results: list[list]) -> None:
        """Runs on the I/O thread: resolve each future once."""
        for res in results:
            fut = self._futures.pop(res[m.R_ID], None)
            if fut is None or fut.done():
                continue
            if res[m.R_OUTPUT]:
                fut.output = tuple(res[m.R_OUTPUT])
            state = res[m.R_STATE]
            if state == "succeeded":
                fut.set_result(res[m.R_PAYLOAD])
            elif state == "cancelled":
                fut._base_cancel()
                fut.set_running_or_notify_cancel()
            else:
                error = res[m.R_ERROR] or ["lost", f"task ended in state {state}", "", None]
                fut.set_exception(exception_from_record(error))
            if fut._cancel_answer is not None:
                fut._cancel_answer.set()

    def _on_manager_lost(self, why: str) -> None:
        """Runs on the I/O thread: the manager has been silent too long; fail what waits."""
        self._fail_pending(ManagerUnreachable(why))

    def _access_denied(self, error: BaseException) -> None:
        """The manager no longer accepts our token: fail what waits, and every later submit at once
        (the manager also closes the connection, so a task sent now would never be answered)."""
        self._denied = error
        self._fail_pending(error)

    def _fail_pending(self, error: BaseException) -> None:
        """Runs on the I/O thread: fail every future still waiting (e.g. the token was revoked)."""
        for task_id, fut in list(self._futures.items()):
            if not fut.done():
                fut.set_exception(error)
            self._futures.pop(task_id, None)
        self._conn.unacked.clear()

    def _on_cancel_refused(self, task_ids: list[bytes]) -> None:
        for task_id in task_ids:
            fut = self._futures.get(task_id)
            if fut is not None and fut._cancel_answer is not None:
                fut._cancel_answer.set()

    def _cancel(self, futs: list[DLHubFuture], wait: bool) -> bool:
        remote = []
        for fut in futs:
            with self._conn.lock:
                if fut.done():
                    continue
                if not fut.sent:
                    fut._base_cancel()
                    fut.set_running_or_notify_cancel()
                    self._futures.pop(fut._task_id, None)
                    continue
            answer = fut._cancel_answer = threading.Event()
            if fut.done():  # resolved before the event existed
                answer.set()
            remote.append(fut)
        if remote:
            self._conn.send(("cancel", [f._task_id for f in remote]))
            if wait:
                deadline = time.monotonic() + self.cancel_timeout_s
                for fut in remote:
                    fut._cancel_answer.wait(max(0.0, deadline - time.monotonic()))
        return all(f.cancelled() for f in futs)

    def fetch(self, task_ids: Iterable[str]) -> list[DLHubFuture]:
        """Futures for tasks submitted earlier (e.g. by a process that has since exited).

        The manager answers with stored results, or routes them here when they finish; an id it
        has never seen fails with ``TaskLost``.
        """
        futs = []
        for task_id in task_ids:
            raw = _task_id(task_id)
            fut = self._futures.get(raw)
            if fut is None:
                fut = DLHubFuture(raw, self)
                fut.sent = True
                self._futures[raw] = fut
            futs.append(fut)
        if futs:
            self._conn.send(("fetch", [f._task_id for f in futs]))
        return futs

    # ---- inspection ----------------------------------------------------------------------------

    def task_info(self, task: DLHubFuture | str, timeout: float = 10.0) -> dict[str, Any]:
        """State, timestamps and captured stdout/stderr of a task (by future or task id)."""
        if isinstance(task, DLHubFuture) and task.cancelled() and not task.sent:
            return {"task_id": task.task_id, "state": "cancelled"}  # never left this process
        task_id = task._task_id if isinstance(task, DLHubFuture) else _task_id(task)
        records = self._conn.request("query", [task_id]).result(timeout)
        record = dict(records[0])
        record["task_id"] = task_id.hex()
        return record

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The manager's view: endpoints, their workers and queues, task counters."""
        return self._conn.request("status").result(timeout)

    # ---- shutdown ------------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        if cancel_futures:
            pending = [f for f in list(self._futures.values()) if not f.done()]
            if pending:
                self._cancel(pending, wait=True)
        if wait:
            cf.wait(list(self._futures.values()))
        self._conn.close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=True)


def _track(fs: list[DLHubFuture], fn: Callable | str, started: float) -> TaskProgress:
    """A progress bar for ``map`` (its clock started before submitting), counting each future
    as its result arrives."""
    name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", None) or type(fn).__name__
    tracker = TaskProgress(len(fs), f"map {name}", started=started)
    for fut in fs:
        fut.add_done_callback(tracker.future_done)
    if not fs:
        tracker.close()
    return tracker


def _task_id(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != m.TASK_ID_BYTES:
        raise ValueError(f"{text!r} is not a task id (32 hex digits, as DLHubFuture.task_id gives)")
    return raw


__all__ = ["DLHubFuture", "Executor", "TaskCancelled"]


def _call_options(args: tuple, kwargs: dict, cache: bool, batch: bool) -> dict[str, Any]:
    """Options of a servable call: the input digest (result caches), the first argument's
    length (batching weights), cache=False, and whether it is an explicit batch."""
    options: dict[str, Any] = {}
    if cache:
        key = input_digest(args, kwargs)
        if key is not None:
            options["key"] = key
    else:
        options["cache"] = False
    if args:
        try:
            options["len"] = len(args[0])
        except TypeError:
            pass
    if batch:
        options["batch"] = True
    return options


class _CallOptions:
    """An Executor seen with per-call options (from :meth:`Executor.with_options`)."""

    def __init__(self, executor: Executor, cache: bool):
        self._executor, self._cache = executor, cache

    def submit(self, fn: Callable | str, /, *args: Any, **kwargs: Any) -> DLHubFuture:
        return self._executor._submit(fn, args, kwargs, self._cache, batch=False)

    def map(self, fn, *iterables, timeout=None, chunksize=1, batch_size=None, progress=False) -> Iterator:
        return self._executor._map(fn, iterables, timeout, batch_size, self._cache, progress)
