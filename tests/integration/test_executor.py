"""The Executor against a real stack: ``dlhub up`` (manager + ``local`` endpoint, 2 workers).

Functions sent to the endpoint import what they need inside their bodies: they must run in a
worker process that has not imported this module.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_until

from dlhub.executor import (
    AccessDenied,
    DLHubFuture,
    ManagerUnreachable,
    PayloadTooLarge,
    RemoteError,
    TaskTimeout,
    UnknownEndpoint,
    WorkerLost,
)
from dlhub.protocol import RemoteTraceback, SerializationError

RESULT_TIMEOUT_S = 30

# ---- functions that run remotely --------------------------------------------------------------


def square(x):
    return x * x


def sleep_then_return(seconds, value):
    import time

    time.sleep(seconds)
    return value


def wait_for_file(started: str, release: str, limit_s: float = 60.0):
    """Mark that the task started, then block until ``release`` exists (bounded)."""
    import os
    import time

    open(started, "w").close()
    deadline = time.monotonic() + limit_s
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)
    return os.getpid()


def raise_value_error_in_user_code(n):
    raise ValueError(f"bad input {n}")


def raise_unpicklable():
    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("refuses to be pickled")

    raise Unpicklable("cannot travel")


def return_generator():
    return (i for i in range(3))


def return_object_holding_a_generator():
    class HoldsAGenerator:
        def __init__(self):
            self.gen = (i for i in range(3))  # generators cannot be pickled, even by dill

    return HoldsAGenerator()


def identity(x):
    return x


def array_checksum(arr):
    return int(arr.sum()), arr.dtype.str, arr.shape


def exit_hard():
    import os

    os._exit(1)


def print_things(n):
    import sys

    print(f"hello from the task {n}")
    print("to stderr", file=sys.stderr)
    return n


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ex(stack):
    executor = stack.executor()
    try:
        yield executor
    finally:
        executor.shutdown(wait=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- basics -----------------------------------------------------------------------------------


def test_submit_result(ex):
    fut = ex.submit(square, 7)
    assert isinstance(fut, DLHubFuture) and isinstance(fut, cf.Future)
    assert fut.result(RESULT_TIMEOUT_S) == 49
    assert fut.done() and not fut.cancelled()


def test_task_id_is_a_hex_string(ex):
    fut = ex.submit(square, 3)
    assert isinstance(fut.task_id, str)
    assert re.fullmatch(r"[0-9a-f]{32}", fut.task_id)
    assert fut.result(RESULT_TIMEOUT_S) == 9
    assert ex.submit(square, 3).task_id != fut.task_id


def test_kwargs_and_plain_and_tuple_values(ex):
    assert ex.submit(identity, x=(1, "a")).result(RESULT_TIMEOUT_S) == (1, "a")
    assert ex.submit(identity, {"k": [1, 2.5, None]}).result(RESULT_TIMEOUT_S) == {"k": [1, 2.5, None]}


def test_lambda_and_closure_run_remotely(ex):
    offset = 100
    assert ex.submit(lambda v: v + offset, 1).result(RESULT_TIMEOUT_S) == 101


def test_map_keeps_order(ex):
    # later inputs finish first: the results still come back in input order
    delays = [0.3, 0.2, 0.1, 0.0]
    out = list(ex.map(sleep_then_return, delays, range(4), timeout=RESULT_TIMEOUT_S))
    assert out == [0, 1, 2, 3]
    assert list(ex.map(square, range(20), timeout=RESULT_TIMEOUT_S)) == [i * i for i in range(20)]


def test_map_timeout(ex, tmp_path):
    release = tmp_path / "release"
    it = ex.map(wait_for_file, [str(tmp_path / "s")], [str(release)], timeout=0.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(cf.TimeoutError):
            next(it)
        assert time.monotonic() - t0 < RESULT_TIMEOUT_S
    finally:
        release.touch()


# ---- errors -----------------------------------------------------------------------------------


def test_remote_exception_reraised_as_its_type_with_remote_traceback(ex):
    fut = ex.submit(raise_value_error_in_user_code, 42)
    with pytest.raises(ValueError, match="bad input 42") as info:
        fut.result(RESULT_TIMEOUT_S)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_value_error_in_user_code" in cause.text
    assert "ValueError: bad input 42" in cause.text
    assert isinstance(fut.exception(), ValueError)


def test_unpicklable_exception_becomes_remote_error_with_traceback(ex):
    with pytest.raises(RemoteError) as info:
        ex.submit(raise_unpicklable).result(RESULT_TIMEOUT_S)
    err = info.value
    assert err.remote_type == "Unpicklable"
    assert "cannot travel" in str(err)
    assert "raise_unpicklable" in err.traceback_text
    assert isinstance(err.__cause__, RemoteTraceback)


@pytest.mark.parametrize(
    "fn, type_name", [(return_generator, "generator"), (return_object_holding_a_generator, "HoldsAGenerator")]
)
def test_unpicklable_result_names_its_type(ex, fn, type_name):
    with pytest.raises(SerializationError) as info:
        ex.submit(fn).result(RESULT_TIMEOUT_S)
    assert type_name in str(info.value)


def test_unknown_endpoint_fails_promptly(stack):
    t0 = time.monotonic()
    with pytest.raises(UnknownEndpoint, match="'nope'") as info:
        stack.executor(endpoint="nope")
    assert "local" in str(info.value)  # names the endpoints it knows
    assert time.monotonic() - t0 < 10


def test_manager_down_is_manager_unreachable(tmp_path):
    from dlhub.executor import Executor

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(ManagerUnreachable, match=f"127.0.0.1:{port}"):
        Executor(
            endpoint="local",
            manager=f"tcp://127.0.0.1:{port}",
            token="x",
            connect_timeout_s=1,
            home=str(tmp_path),
        )
    assert time.monotonic() - t0 < 8


def test_bad_token_is_access_denied(stack):
    with pytest.raises(AccessDenied):
        stack.executor(token="dlh_not-a-real-token", connect_timeout_s=10)


def test_payload_over_the_client_limit(stack):
    small = stack.executor(payload_limit_bytes=1000)
    with pytest.raises(PayloadTooLarge) as info:
        small.submit(identity, b"x" * 2000)
    assert info.value.limit == 1000 and info.value.size > 2000
    assert "exceeds the limit of 1,000 bytes" in str(info.value)
    assert "Executor(payload_limit_bytes=...)" in str(info.value)  # says how to raise it
    # under the limit it runs
    assert small.submit(identity, b"x" * 100).result(RESULT_TIMEOUT_S) == b"x" * 100


def big_result(n):
    return b"z" * n


def test_payload_over_the_manager_and_endpoint_limits(custom_stack_factory):
    cs = custom_stack_factory(
        manager_kwargs={"payload_limit_bytes": 4096}, endpoint={"payload_limit_bytes": 4096}
    )
    ex = cs.executor()  # the client's own limit is the 256 MB default
    # arguments over the manager's limit: refused there, never forwarded
    with pytest.raises(PayloadTooLarge, match="exceeds the limit of 4,096 bytes; .*--payload-limit-mb"):
        ex.submit(identity, b"y" * 10_000).result(RESULT_TIMEOUT_S)
    # a result over the endpoint's limit: the worker refuses to send it, and says which knob
    with pytest.raises(
        PayloadTooLarge, match=r"result of [\d,]+ bytes exceeds the limit of 4,096 bytes; .*_limit_bytes"
    ):
        ex.submit(big_result, 10_000).result(RESULT_TIMEOUT_S)
    assert ex.submit(identity, b"y" * 100).result(RESULT_TIMEOUT_S) == b"y" * 100
    assert ex.submit(big_result, 100).result(RESULT_TIMEOUT_S) == b"z" * 100


def test_large_numpy_array_round_trip(ex):
    arr = np.arange(50 * 2**20 // 8, dtype=np.int64)  # 50 MB
    back = ex.submit(identity, arr).result(120)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    total, dtype, shape = ex.submit(array_checksum, arr).result(120)
    assert (total, dtype, shape) == (int(arr.sum()), arr.dtype.str, arr.shape)


def test_a_large_result_array_is_a_writable_view_of_the_frame_it_came_in(ex):
    """Zero-copy to the caller: the array a large result decodes to shares the memory of the
    ZeroMQ frame the result arrived in (no copy after the kernel's), and it is writable."""
    import zmq

    arr = np.arange(2**20, dtype=np.float64)  # 8 MB: a payload frame of its own on every hop
    back = ex.submit(identity, arr).result(120)
    np.testing.assert_array_equal(back, arr)
    base = back
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, zmq.Frame), type(base)
    back[0] = -1.0  # writable, as an array unpickled in-band was
    assert back[0] == -1.0


def test_task_timeout(stack):
    tex = stack.executor(task_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(TaskTimeout, match="0.5"):
        tex.submit(sleep_then_return, 30, "late").result(RESULT_TIMEOUT_S)
    assert time.monotonic() - t0 < 20  # ended by the limit, not by the 30 s sleep
    # the worker survives and serves the next task
    assert tex.submit(square, 4).result(RESULT_TIMEOUT_S) == 16


def ignore_interrupts_for(seconds):
    """User code that swallows every exception, the time-limit interrupt included."""
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.02)
        except BaseException:  # noqa: BLE001 - the point of this function
            pass
    return "ran to the end"


def test_task_timeout_backstop_kills_a_task_that_ignores_the_interrupt(stack):
    tex = stack.executor(task_timeout_s=0.5)
    with pytest.raises(TaskTimeout, match="time limit"):
        tex.submit(ignore_interrupts_for, 30).result(RESULT_TIMEOUT_S)
    # its worker was replaced; the endpoint still serves tasks
    assert tex.submit(square, 5).result(RESULT_TIMEOUT_S) == 25


def test_worker_lost_and_the_pool_restarts_the_worker(ex):
    def endpoint_info(want_workers: int, lost: int | None = None) -> dict | None:
        info = ex.status(timeout=10)["endpoints"]["local"]["info"]
        if info.get("workers") != want_workers or (lost is not None and info.get("worker_lost") != lost):
            return None
        return info

    lost_before = wait_until(lambda: endpoint_info(2), 30, what="two workers")["worker_lost"]
    with pytest.raises(WorkerLost, match="died running the task"):
        ex.submit(exit_hard).result(RESULT_TIMEOUT_S)
    # the pool replaced the worker: a snapshot taken after the death shows two workers again
    wait_until(lambda: endpoint_info(2, lost_before + 1), 30, what="the pool to replace the dead worker")
    assert ex.submit(square, 12).result(RESULT_TIMEOUT_S) == 144


# ---- output and task info ---------------------------------------------------------------------


def test_captured_stdout_in_future_and_task_info(ex):
    fut = ex.submit(print_things, 5)
    assert fut.result(RESULT_TIMEOUT_S) == 5
    assert fut.output == ("hello from the task 5\n", "to stderr\n")
    info = ex.task_info(fut)
    assert info["stdout"] == "hello from the task 5\n"
    assert info["stderr"] == "to stderr\n"
    assert info["task_id"] == fut.task_id
    assert info["state"] == "succeeded"
    # by id as well
    assert ex.task_info(fut.task_id)["state"] == "succeeded"


def test_task_info_state_progression_ends_in_succeeded(ex, tmp_path):
    from dlhub.protocol import TASK_STATES

    started, release = tmp_path / "started", tmp_path / "release"
    fut = ex.submit(wait_for_file, str(started), str(release))
    seen: list[str] = []

    def state() -> str:
        seen.append(ex.task_info(fut)["state"])
        return seen[-1]

    # (see test_task_info_right_after_submit_knows_the_task for the first read)
    wait_until(lambda: state() != "unknown", 10, what="the manager to know the task")
    wait_until(started.exists, RESULT_TIMEOUT_S, what="the task to start")
    # the endpoint reports the running state off the hot path: wait for it
    wait_until(lambda: state() == "running", 15, what="the running state")
    release.touch()
    fut.result(RESULT_TIMEOUT_S)
    assert state() == "succeeded"
    known = [s for s in seen if s != "unknown"]
    assert set(known) <= set(TASK_STATES), seen
    order = [TASK_STATES.index(s) for s in known]
    assert order == sorted(order), seen  # never goes backwards
    info = ex.task_info(fut)
    assert info["t_received"] <= info["t_started"] <= info["t_finished"]


def test_task_info_right_after_submit_knows_the_task(ex):
    states = []
    for n in range(20):
        fut = ex.submit(square, n)
        states.append(ex.task_info(fut)["state"])
        fut.result(RESULT_TIMEOUT_S)
    assert "unknown" not in states, states


def test_unknown_task_id_reads_unknown(ex):
    assert ex.task_info(uuid.uuid4().hex)["state"] == "unknown"


# ---- CLI --------------------------------------------------------------------------------------


def test_dlhub_status_exit_codes(stack_factory):
    s = stack_factory()
    up = s.cli("status")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "local" in up.stdout and "connected" in up.stdout
    as_json = s.cli("status", "--json")
    assert as_json.returncode == 0 and '"local"' in as_json.stdout
    other = s.cli("status", "--endpoint", "nope")
    assert other.returncode == 1
    down = s.cli("down")
    assert down.returncode == 0 and "manager" in down.stdout
    after = s.cli("status")
    assert after.returncode == 1
    assert "down" in after.stdout


# ---- cancellation and shutdown (a private stack: tests hold its workers) ----------------------


@pytest.fixture(scope="module")
def busy_stack(stack_factory):
    return stack_factory()


def make_blocker(tag: str):
    """A long task whose code is unique to ``tag``: the endpoint has never measured it."""

    def blocker(started: str, release: str, limit_s: float = 60.0):
        import os
        import time

        open(started, "w").close()
        deadline = time.monotonic() + limit_s
        while not os.path.exists(release):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{release} never appeared")
            time.sleep(0.01)
        return tag

    return blocker


def make_square(tag: str):
    """``square`` with code unique to ``tag`` (never measured, so prefetched at most one deep)."""

    def fresh_square(x):
        assert tag
        return x * x

    return fresh_square


class Blockers:
    """Occupy both workers of a 2-worker endpoint: two running tasks and one prefetched behind
    each (a never-measured function is prefetched ``min_prefetch`` = 1 deep), so that further
    never-measured tasks wait at the endpoint."""

    def __init__(self, ex, tmp: Path, prefetched: bool = True):
        self.tmp = tmp
        self.tag = uuid.uuid4().hex
        self.fn = make_blocker(self.tag)
        self.release = tmp / f"release-{uuid.uuid4().hex}"
        self.markers: list[Path] = []
        self.futures: list = []
        # one at a time, so that each goes to the idle worker
        for _ in range(2):
            self._submit(ex)
            n = len(self.futures)
            try:
                wait_until(lambda n=n: len(self.running()) == n, RESULT_TIMEOUT_S, what="a worker to start")
            except AssertionError as exc:
                self.release.touch()
                raise AssertionError(f"{exc}; futures: {self.describe()}") from None
        self.running_futures = list(self.futures)
        if prefetched:
            self._submit(ex)
            self._submit(ex)
        self.waiting_futures = self.futures[2:]

    def _submit(self, ex) -> None:
        marker = self.tmp / f"started-{uuid.uuid4().hex}"
        self.markers.append(marker)
        self.futures.append(ex.submit(self.fn, str(marker), str(self.release)))

    def describe(self) -> list[str]:
        return [repr(f.exception(0)) if f.done() else f._state for f in self.futures]

    def running(self) -> list[int]:
        return [i for i, mk in enumerate(self.markers) if mk.exists()]

    def finish(self) -> None:
        self.release.touch()
        cf.wait(self.futures, RESULT_TIMEOUT_S)


def test_cancel_queued_true_running_false(busy_stack, tmp_path):
    ex = busy_stack.executor(cancel_timeout_s=10)
    blockers = Blockers(ex, tmp_path)
    try:
        fresh_square = make_square(uuid.uuid4().hex)
        queued = [ex.submit(fresh_square, n) for n in range(3)]
        # cancel once the endpoint holds it (a task not yet sent is cancelled locally)
        wait_until(
            lambda: ex.task_info(queued[1])["state"] == "dispatched", 10, what="the task at the endpoint"
        )
        t0 = time.monotonic()
        assert queued[1].cancel() is True
        assert time.monotonic() - t0 < 10  # answered, not timed out
        assert queued[1].cancelled() and queued[1].done()
        with pytest.raises(cf.CancelledError):
            queued[1].result(RESULT_TIMEOUT_S)
        running = blockers.running_futures[0]
        assert running.cancel() is False
        assert not running.cancelled() and not running.done()
    finally:
        blockers.finish()
    assert [f.result(RESULT_TIMEOUT_S) for f in blockers.running_futures] == [blockers.tag] * 2
    assert [queued[0].result(RESULT_TIMEOUT_S), queued[2].result(RESULT_TIMEOUT_S)] == [0, 4]
    assert ex.task_info(queued[1])["state"] == "cancelled"


def test_cancel_after_done_is_false(busy_stack):
    ex = busy_stack.executor()
    fut = ex.submit(square, 2)
    assert fut.result(RESULT_TIMEOUT_S) == 4
    assert fut.cancel() is False
    assert not fut.cancelled()


def test_cancel_answer_agrees_with_the_outcome_for_a_prefetched_task(busy_stack, tmp_path):
    ex = busy_stack.executor(cancel_timeout_s=2)
    blockers = Blockers(ex, tmp_path)
    try:
        for f in blockers.waiting_futures:  # at the endpoint, hence prefetched at a worker
            wait_until(lambda f=f: ex.task_info(f)["state"] == "dispatched", 10, what="dispatch")
        answers = [f.cancel() for f in blockers.waiting_futures]
    finally:
        blockers.finish()
    cf.wait(blockers.waiting_futures, RESULT_TIMEOUT_S)
    assert all(f.done() for f in blockers.waiting_futures)
    assert answers == [f.cancelled() for f in blockers.waiting_futures]


def test_shutdown_cancel_futures_cancels_pending_promptly(busy_stack, tmp_path):
    holder = busy_stack.executor()
    blockers = Blockers(holder, tmp_path)
    try:
        ex = busy_stack.executor(cancel_timeout_s=10)
        fresh_square = make_square(uuid.uuid4().hex)
        pending = [ex.submit(fresh_square, n) for n in range(5)]
        # the tasks reached the manager, so cancelling them is a remote act
        wait_until(lambda: all(f.sent for f in pending), 10, what="tasks sent")
        returned = threading.Event()

        def shut():
            ex.shutdown(wait=True, cancel_futures=True)
            returned.set()

        t = threading.Thread(target=shut, daemon=True)
        t.start()
        t.join(15)
        assert returned.is_set(), "shutdown(cancel_futures=True) did not return"
        assert all(f.cancelled() for f in pending)
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(square, 1)
    finally:
        blockers.finish()
    assert all(f.done() and not f.cancelled() for f in blockers.futures)


def test_dlhub_up_again_reuses_the_running_stack(stack, ex):
    pids = (stack.manager_info["pid"], stack.endpoint_pid())
    again = stack.cli("up", "--workers", "2", "--detach")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "manager already running" in again.stdout
    assert "endpoint 'local' already running" in again.stdout
    assert (stack.manager_info["pid"], stack.endpoint_pid()) == pids
    assert ex.submit(square, 6).result(RESULT_TIMEOUT_S) == 36


def test_cli_down_on_an_empty_home(tmp_path):
    from conftest import dlhub_cli

    proc = dlhub_cli("down", "--home", str(tmp_path))
    assert proc.returncode == 0
    assert "nothing was running" in proc.stdout
