"""``Executor``: run Python functions on a dlhub endpoint through the manager, futures-style.

    ex.submit(fn, *args) -> DLHubFuture   (code sent once per digest, serialized once per function)
        |  TaskRecord(task_id, digest, payload, timeout_s, serializer, ...) -> Connection (I/O thread)
        v
    manager -> endpoint -> worker; results stream back and resolve futures by task id

The ``concurrent.futures`` contract holds: ``running()`` is true once the task runs (the client
asks the manager when you ask), ``cancel()`` answers at once (True: cancelled here and now, the
remote cancellation follows asynchronously), ``shutdown(wait=False)`` returns at once while
pending futures still complete. The Executor keeps no callable, argument or result alive longer
than needed (code is cached by weak reference, results leave with their futures), and one
dropped without ``shutdown()`` stops its I/O thread from a finalizer.

A remote exception is re-raised as its own type when it can be rebuilt, with the remote
traceback as ``__cause__``; otherwise as a typed :class:`dlhub.protocol.RemoteError`.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures as cf
from concurrent.futures._base import CANCELLED, FINISHED, PENDING, RUNNING
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
from dlhub.protocol.refs import MARKER, OutputFile
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
from .refs import RefEncoder, has_refs


class DLHubFuture(cf.Future):
    """A future for one remote task. ``task_id`` names it everywhere (manager, endpoint, CLI).

    Successful results are decoded lazily, in the thread that asks for them. The I/O thread moves
    it through the states with the methods below, each atomic under the future's own lock, so
    that a ``cancel()`` racing a result or a send never raises in either thread.
    """

    def __init__(self, task_id: bytes, executor: Executor):
        super().__init__()
        self._task_id = task_id
        self._executor = executor
        self.sent = False
        self._cancel_answer: threading.Event | None = None  # made only when a cancel waits
        self._decoded = False
        self.output: tuple[str | None, str | None] | None = None

    @property
    def task_id(self) -> str:
        return self._task_id.hex()

    def result(self, timeout: float | None = None) -> Any:
        value = super().result(timeout)
        if not self._decoded:
            self._value = deserialize(value) if value is not None else None
            if type(self._value) is dict and MARKER in self._value:  # a File returned by reference
                self._value = OutputFile(self._value, self._executor._refs)
            self._decoded = True
        return self._value

    def running(self) -> bool:
        """True once the task runs on a worker, as far as this client has heard: a call on a
        task not known to run asks the manager (at most every ``STATE_QUERY_INTERVAL_S``), so
        a loop on ``running()`` sees the start within about a round trip of it."""
        if super().running():
            return True
        if self.sent and not self.done():
            self._executor._ask_states(self)
        return super().running()

    def cancel(self) -> bool:
        """Cancel the task unless it runs or has finished, wherever it waits (client, manager,
        endpoint). Returns at once (``Executor.cancel_timeout_s=0``, the default):

        - True: the future is cancelled now (``cancelled()``, waiters and callbacks see it); a
          task already sent is cancelled at the manager or endpoint asynchronously. A task that
          had started meanwhile runs to its end there; its result is dropped (``task_info``
          shows what happened).
        - False: the task is known to run, or it has finished.

        With ``cancel_timeout_s > 0`` a sent task's cancel waits (that long at most) for the
        remote answer and returns it: True only when the task was really cancelled.
        """
        return self._executor._cancel([self], self._executor.cancel_timeout_s)

    # ---- state changes made by the Executor (user threads and the I/O thread) -------------------

    def _claim(self) -> bool:
        """On the I/O thread, just before sending: False (do not send) once cancelled or failed."""
        with self._condition:
            if self._state != PENDING:
                return False
            self.sent = True
            return True

    def _cancel_now(self) -> bool:
        """PENDING -> cancelled (waiters woken, callbacks run); whether the future is cancelled."""
        with self._condition:
            if self._state in (RUNNING, FINISHED):
                return False
            if self._state != PENDING:
                return True  # already cancelled
            self._state = CANCELLED
            self._condition.notify_all()  # threads blocked in result()/exception()
            self.set_running_or_notify_cancel()  # CANCELLED -> CANCELLED_AND_NOTIFIED, waiters told
        self._invoke_callbacks()
        return True

    def _mark_running(self) -> None:
        with self._condition:
            if self._state == PENDING:
                self.set_running_or_notify_cancel()

    def _settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """Resolve unless already resolved (a cancel may have won the race)."""
        try:
            if error is None:
                self.set_result(result)
            else:
                self.set_exception(error)
        except cf.InvalidStateError:
            pass


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
        cancel_timeout_s: 0 (default): ``cancel()`` answers at once; above 0, a sent task's
            cancel waits that long at most for the manager's and endpoint's answer.
        rest_url: the manager's REST API, for ``File``/``DataRef`` arguments and outputs by
            reference (default ``$DLHUB_REST_URL`` or the config file's, for the manager it
            describes).
        outputs: where a ``File(path)`` a call returns goes: ``"manager"`` (default: stored in
            the manager's blob store for this user; the ``OutputFile`` can ``download()``; needs
            the REST URL, else it stays at the endpoint) or ``"endpoint"`` (left in the endpoint's
            data cache, passed on by digest). Per call: ``with_options(outputs=...)``.
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
        cancel_timeout_s: float = 0.0,
        home: str | None = None,
        resources: dict[str, Any] | None = None,
        manager_timeout_s: float = 120.0,
        cache: bool = True,
        manager_key: str | None = None,
        rest_url: str | None = None,
        outputs: str = "manager",
    ):
        if outputs not in OUTPUT_POLICIES:
            raise ValueError(f"outputs must be 'manager' or 'endpoint', got {outputs!r}")
        self.outputs = outputs
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
        if cancel_timeout_s < 0:
            raise ValueError(f"cancel_timeout_s must be 0 or more, got {cancel_timeout_s!r}")
        self._futures: dict[bytes, DLHubFuture] = {}  # unresolved, by task id
        self._code = _CodeCache()
        self._refs = RefEncoder(rest_url or config.rest_url, config.token, config.home)
        self._shutdown = False
        self._states_lock = threading.Lock()
        self._states_watch: set[bytes] = set()  # tasks whose running() was asked, not yet known
        self._states_asked = 0.0  # when the last state query left
        self._states_in_flight = False
        self._denied: BaseException | None = None  # the token was revoked or replaced
        # the I/O thread gets weak callbacks only: it never keeps this Executor alive
        self._conn = Connection(
            config.manager,
            config.token,
            on_results=_weak(self._on_results),
            on_cancel_refused=_weak(self._on_cancel_refused),
            pending_ids=_weak(self._sent_pending_ids, []),
            batch_size=batch_size,
            connect_timeout_s=connect_timeout_s,
            manager_timeout_s=manager_timeout_s,
            on_manager_lost=_weak(self._on_manager_lost),
            on_access_denied=_weak(self._access_denied),
            server_key=config.manager_key,
            on_states=_weak(self._on_states),
        )
        weakref.finalize(self, self._conn.close, 5.0, False)  # dropped without shutdown()
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
            if self.endpoint not in endpoints:  # a Globus Compute UUID names an endpoint too
                from dlhub.protocol.gc_serialize import endpoint_uuid

                by_uuid = {endpoint_uuid(name): name for name in endpoints}
                if self.endpoint in by_uuid:
                    return by_uuid[self.endpoint]
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
        """The code digest of ``fn``: serialized once per function (or bound method's function
        and object) while it lives, and sent once per digest, so a re-created identical lambda
        costs a serialization but no second ``PutCode``."""
        digest = self._code.get(fn)
        if digest is None:
            blob = serialize_function(fn)
            digest = code_digest(blob)
            self._code.put(fn, digest)
            if self._code.first_send(digest):
                self._conn.put_code(digest, blob)
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

    def _submit(
        self,
        fn: Callable | str,
        args: tuple,
        kwargs: dict,
        cache: bool,
        batch: bool,
        outputs: str | None = None,
    ) -> DLHubFuture:
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        if self._denied is not None:
            raise type(self._denied)(str(self._denied))
        options = None
        key_args, key_kwargs = args, kwargs
        if (args or kwargs) and has_refs(args, kwargs):  # File/DataRef: markers (executor/refs.py)
            args, kwargs, key_args, key_kwargs = self._refs.encode(args, kwargs)
        if isinstance(fn, str):
            digest = self._servable_ref(fn)
            options = _call_options(key_args, key_kwargs, cache, batch)
        elif callable(fn):
            digest = self._digest(fn)
        else:
            raise TypeError(
                f"fn must be callable or a servable name 'owner/name[:version]', got {type(fn).__name__}"
            )
        out = self._refs.output_option(outputs or self.outputs)  # outputs by reference
        if out is not None:
            options = {**options, "out": out} if options else {"out": out}
        payload = serialize([list(args), kwargs])
        if len(payload) > self.payload_limit_bytes:
            raise PayloadTooLarge(len(payload), self.payload_limit_bytes, "arguments", RAISE_CLIENT_LIMIT)
        task_id = os.urandom(m.TASK_ID_BYTES)
        fut = DLHubFuture(task_id, self)
        self._futures[task_id] = fut
        rec = m.task_record(
            task_id, digest, payload, self.task_timeout_s, self.result_serializer, self.resources, options
        )
        self._conn.submit(self.endpoint, rec, fut._claim)
        return fut

    def with_options(self, *, cache: bool = True, outputs: str | None = None) -> _CallOptions:
        """The same executor with per-call options: ``ex.with_options(cache=False).submit(...)``
        runs a deterministic servable even when a cached result exists;
        ``outputs="endpoint"``/``"manager"`` says where a returned ``File`` goes."""
        if outputs is not None and outputs not in OUTPUT_POLICIES:
            raise ValueError(f"outputs must be 'manager' or 'endpoint', got {outputs!r}")
        return _CallOptions(self, cache, outputs)

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

    def _map(self, fn, iterables, timeout, batch_size, cache, progress=False, outputs=None) -> Iterator:
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        if batch_size is None:
            fs = [self._submit(fn, args, {}, cache, False, outputs) for args in zip(*iterables)]
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
            fs = [self._submit(fn, (chunk,), {}, cache, True, outputs) for chunk in chunks]
            per_future = 0  # a list of results per future
        tracker = _track(fs, fn, started) if progress else None

        def results() -> Iterator:
            # each result is yielded straight from its future, never held in a local: once the
            # caller drops it, nothing here keeps it alive (as in concurrent.futures)
            try:
                fs.reverse()
                while fs:
                    if per_future:
                        yield self._result_or_cancel(fs.pop(), deadline)
                    else:
                        yield from self._result_or_cancel(fs.pop(), deadline)
            finally:
                try:
                    if fs:  # as concurrent.futures does; a task that already runs finishes
                        self._cancel(fs, 0.0, now=False)
                finally:
                    if tracker is not None:
                        tracker.close()

        return results()

    def _result_or_cancel(self, fut: DLHubFuture, deadline: float | None) -> Any:
        try:
            try:
                return fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except BaseException:
                self._cancel([fut], 0.0, now=False)  # a timeout: this one goes with the rest
                raise
        finally:
            del fut

    # ---- results -----------------------------------------------------------------------------

    def _on_results(self, results: list[list]) -> None:
        """Runs on the I/O thread: resolve each future once."""
        for res in results:
            fut = self._futures.pop(res[m.R_ID], None)
            if fut is None:
                continue
            self._states_watch.discard(fut._task_id)
            if res[m.R_OUTPUT]:
                fut.output = tuple(res[m.R_OUTPUT])
            state = res[m.R_STATE]
            if state == "succeeded":
                fut._settle(res[m.R_PAYLOAD])
            elif state == "cancelled":
                if not fut._cancel_now():  # it was reported running: cancelled all the same
                    fut._settle(error=exception_from_record(res[m.R_ERROR] or ["cancelled", "", "", None]))
            else:
                error = res[m.R_ERROR] or ["lost", f"task ended in state {state}", "", None]
                fut._settle(error=exception_from_record(error))
            if fut._cancel_answer is not None:
                fut._cancel_answer.set()
        self._close_when_idle()

    def _on_states(self, updates: list[list]) -> None:
        """Runs on the I/O thread: progress reports (``[task_id, state, timestamp]``)."""
        for task_id, state, _ts in updates:
            if state == "running":
                fut = self._futures.get(task_id)
                if fut is not None:
                    fut._mark_running()
                self._states_watch.discard(task_id)

    def _ask_states(self, fut: DLHubFuture) -> None:
        """Ask the manager for the state of tasks whose ``running()`` was asked: one query in
        flight at most, and at most one every ``STATE_QUERY_INTERVAL_S``."""
        now = time.monotonic()
        with self._states_lock:
            self._states_watch.add(fut._task_id)
            if self._states_in_flight or now - self._states_asked < STATE_QUERY_INTERVAL_S:
                return
            self._states_in_flight, self._states_asked = True, now
            task_ids = list(self._states_watch)[:STATE_QUERY_MAX_TASKS]
        self._conn.query(task_ids).add_done_callback(self._on_state_answer)

    def _on_state_answer(self, answer: cf.Future) -> None:
        with self._states_lock:
            self._states_in_flight = False
        if answer.exception() is not None:
            return
        for record in answer.result():
            state = record.get("state")
            if state in ("received", "queued", "dispatched"):
                continue  # not yet: the next running() asks again
            self._states_watch.discard(record.get("task_id"))
            if state == "running":
                fut = self._futures.get(record.get("task_id"))
                if fut is not None:
                    fut._mark_running()

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
            fut._settle(error=error)
            self._futures.pop(task_id, None)
        self._conn.forget_unacked()
        self._close_when_idle()

    def _on_cancel_refused(self, task_ids: list[bytes]) -> None:
        """The endpoint refuses to cancel what already runs (or has finished): it runs."""
        for task_id in task_ids:
            fut = self._futures.get(task_id)
            if fut is not None:
                fut._mark_running()
                if fut._cancel_answer is not None:
                    fut._cancel_answer.set()

    def _cancel(self, futs: list[DLHubFuture], wait_s: float, now: bool = True) -> bool:
        """Cancel what has not started: unsent tasks here; sent ones here and now, the remote
        cancel following (``wait_s`` 0), or once the manager answers (``wait_s`` > 0, bounded).
        ``now=False``: sent ones only when the manager answers (a ``cancelled`` result), and a
        task that already runs ends with its real result; nothing waits."""
        remote = []
        for fut in futs:
            with fut._condition:  # against _claim on the I/O thread: sent or cancelled, not both
                if fut._state != PENDING:
                    continue
                if not fut.sent:
                    fut._cancel_now()
                    self._futures.pop(fut._task_id, None)
                    continue
            remote.append(fut)
        if remote:
            if wait_s > 0:
                for fut in remote:
                    answer = fut._cancel_answer = threading.Event()
                    if fut.done():  # resolved before the event existed
                        answer.set()
            self._conn.cancel([f._task_id for f in remote])
            if wait_s > 0:
                deadline = time.monotonic() + wait_s
                for fut in remote:
                    fut._cancel_answer.wait(max(0.0, deadline - time.monotonic()))
            elif now:
                for fut in remote:
                    if fut._cancel_now():
                        self._futures.pop(fut._task_id, None)
        self._close_when_idle()
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
            self._conn.fetch([f._task_id for f in futs])
        return futs

    # ---- inspection ----------------------------------------------------------------------------

    def task_info(self, task: DLHubFuture | str, timeout: float = 10.0) -> dict[str, Any]:
        """State, timestamps and captured stdout/stderr of a task (by future or task id)."""
        if isinstance(task, DLHubFuture) and task.cancelled() and not task.sent:
            return {"task_id": task.task_id, "state": "cancelled"}  # never left this process
        task_id = task._task_id if isinstance(task, DLHubFuture) else _task_id(task)
        records = self._conn.query([task_id]).result(timeout)
        record = dict(records[0])
        record["task_id"] = task_id.hex()
        if record.get("state") == "running" and isinstance(task, DLHubFuture):
            task._mark_running()
        return record

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The manager's view: endpoints, their workers and queues, task counters."""
        return self._conn.status().result(timeout)

    # ---- shutdown ------------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As ``concurrent.futures``: no more submits; ``cancel_futures`` cancels what has not
        started; ``wait`` waits for the rest. ``wait=False`` returns at once: pending futures
        still complete, and the connection closes after the last one."""
        self._shutdown = True
        self._refs.close()  # File/DataRef's REST client: no submit comes after this
        if cancel_futures:
            pending = [f for f in list(self._futures.values()) if not f.done()]
            if pending:  # sent ones end when the manager answers; wait=True waits for that
                self._cancel(pending, 0.0, now=False)
        if wait:
            cf.wait(list(self._futures.values()))
            self._conn.close()
        else:
            self._close_when_idle()

    def _close_when_idle(self) -> None:
        """After shutdown: close the connection once no future waits for it (without joining:
        this may run on the I/O thread itself)."""
        if self._shutdown and not self._conn.closed:
            if all(f.done() for f in list(self._futures.values())):
                self._conn.close(wait=False)

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


STATE_QUERY_INTERVAL_S = 0.05  # running(): the most often the client asks the manager
STATE_QUERY_MAX_TASKS = 1000  # task ids in one such query


def _weak(method: Callable, default: Any = None) -> Callable:
    """``method`` called through a weak reference to its object (``default`` once it is gone)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        return default if bound is None else bound(*args)

    return call


class _CodeCache:
    """Code digests by function object, held weakly: a cached function (or the object behind a
    bound method) dies when the caller drops it. Digests already sent are remembered as text."""

    def __init__(self) -> None:
        self._digests: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], str]] = {}
        self._sent: set[str] = set()
        self._lock = threading.Lock()

    @staticmethod
    def _parts(fn: Callable) -> tuple[Any, ...]:
        """What names ``fn``'s code: a bound method's function and object, else ``fn`` itself."""
        func, owner = getattr(fn, "__func__", None), getattr(fn, "__self__", None)
        if func is not None and owner is not None:
            return (func, owner)
        return (fn,)

    def get(self, fn: Callable) -> str | None:
        parts = self._parts(fn)
        entry = self._digests.get(tuple(map(id, parts)))
        if entry is None or any(ref() is not part for ref, part in zip(entry[0], parts)):
            return None
        return entry[1]

    def put(self, fn: Callable, digest: str) -> None:
        parts = self._parts(fn)
        key = tuple(map(id, parts))
        digests = self._digests

        def forget(_ref: weakref.ref) -> None:  # a part died: its id may be reused from now on
            digests.pop(key, None)

        try:
            refs = tuple(weakref.ref(part, forget) for part in parts)
        except TypeError:  # not weakly referenceable (a builtin, a slotted object): not cached
            return
        digests[key] = (refs, digest)

    def first_send(self, digest: str) -> bool:
        """True the first time ``digest`` is seen: its code must be sent."""
        with self._lock:
            if digest in self._sent:
                return False
            self._sent.add(digest)
            return True


def _task_id(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != m.TASK_ID_BYTES:
        raise ValueError(f"{text!r} is not a task id (32 hex digits, as DLHubFuture.task_id gives)")
    return raw


__all__ = ["DLHubFuture", "Executor", "TaskCancelled"]


OUTPUT_POLICIES = ("manager", "endpoint")


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

    def __init__(self, executor: Executor, cache: bool, outputs: str | None = None):
        self._executor, self._cache, self._outputs = executor, cache, outputs

    def submit(self, fn: Callable | str, /, *args: Any, **kwargs: Any) -> DLHubFuture:
        return self._executor._submit(fn, args, kwargs, self._cache, False, self._outputs)

    def map(self, fn, *iterables, timeout=None, chunksize=1, batch_size=None, progress=False) -> Iterator:
        return self._executor._map(fn, iterables, timeout, batch_size, self._cache, progress, self._outputs)
