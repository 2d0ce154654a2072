"""The ``concurrent.futures`` contract, the same tests against ``ThreadPoolExecutor``,
``ProcessPoolExecutor`` and ``dlhub.executor.Executor`` (the session stack: a real manager and
a ``local`` endpoint with 2 workers; its wake-up forced to the portable socket pair).

In the style of CPython's ``Lib/test/test_concurrent_futures`` (executor.py, test_wait.py,
test_as_completed.py, test_shutdown.py): submit, map (with timeout, exceptions, no stale
references), wait (FIRST_COMPLETED / FIRST_EXCEPTION / ALL_COMPLETED / timeout), as_completed
(timeout, duplicates), shutdown (wait, cancel_futures, wait=False), cancel of a pending task,
exception propagation and done callbacks. Sleeps are shorter than CPython's, to keep the suite
near 30 s here. Events are files, so that a task on another host process can wait for one.

Functions that run remotely import what they need inside their bodies.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import itertools
import os
import threading
import time
import uuid
import weakref
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from pathlib import Path

import pytest
from conftest import wait_until

TIMEOUT_S = 60
WORKERS = 2


# ---- functions that run in the executors ---------------------------------------------------------


def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


def wait_for(path: str, limit_s: float = 60.0) -> str:
    """An ``Event.wait`` that works across processes and hosts' workers: until ``path`` exists."""
    import os
    import time

    deadline = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)
    return path


def wait_and_raise(path: str):
    wait_for(path)
    raise Exception("this is an exception")


def touch_then_return(path: str, value):
    open(path, "w").close()
    return value


def make_dummy_object(_):
    import argparse

    return argparse.Namespace(payload=list(range(100)))


class MyObject:
    def my_method(self):
        pass


# ---- the executors ---------------------------------------------------------------------------------


class FileEvent:
    def __init__(self, directory: Path):
        self.path = str(directory / f"event-{uuid.uuid4().hex}")

    def set(self) -> None:
        Path(self.path).touch()


def create_future(state=PENDING, exception=None, result=None) -> cf.Future:
    f = cf.Future()
    f._state = state
    f._exception = exception
    f._result = result
    return f


@pytest.fixture(params=["thread", "process", "dlhub"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def make_executor(kind, request, monkeypatch):
    """A factory of fresh executors of ``kind`` (each shut down at the end of the test)."""
    made: list = []

    def make():
        if kind == "thread":
            ex = cf.ThreadPoolExecutor(max_workers=WORKERS)
        elif kind == "process":
            import multiprocessing

            ex = cf.ProcessPoolExecutor(max_workers=WORKERS, mp_context=multiprocessing.get_context("fork"))
        else:
            monkeypatch.setenv("DLHUB_WAKEUP", "socketpair")  # the portable path, proven here
            ex = request.getfixturevalue("stack").executor()
            assert ex._conn.wakeup_kind == "socketpair"
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def executor(make_executor):
    return make_executor()


@pytest.fixture
def event(tmp_path):
    made: list[FileEvent] = []

    def make() -> FileEvent:
        made.append(FileEvent(tmp_path))
        return made[-1]

    yield make
    for e in made:  # nothing is left blocked, whatever failed
        e.set()


SUCCESSFUL = create_future(state=FINISHED, result=42)
EXCEPTION = create_future(state=FINISHED, exception=OSError())
CANCELLED_FUTURE = create_future(state=CANCELLED)
CANCELLED_AND_NOTIFIED_FUTURE = create_future(state=CANCELLED_AND_NOTIFIED)


def fill_workers(executor, event, tmp_path) -> list[cf.Future]:
    """Occupy every worker with a task that waits for ``event``; return once each runs."""
    markers = [tmp_path / f"started-{uuid.uuid4().hex}" for _ in range(WORKERS)]
    blockers = []
    for marker in markers:
        blockers.append(executor.submit(_started_then_wait, str(marker), event.path))
        deadline = time.monotonic() + TIMEOUT_S
        while not marker.exists():  # one at a time, so that each takes an idle worker
            assert time.monotonic() < deadline, "a blocker never started"
            time.sleep(0.01)
    return blockers


def _started_then_wait(marker: str, path: str) -> str:
    import os
    import time

    open(marker, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    return marker


# ---- executor.py ---------------------------------------------------------------------------------


def test_submit(executor):
    assert executor.submit(pow, 2, 8).result(TIMEOUT_S) == 256


def test_submit_keyword(executor):
    assert executor.submit(mul, 2, y=8).result(TIMEOUT_S) == 16
    assert executor.submit(capture, 1, self=2, fn=3).result(TIMEOUT_S) == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        executor.submit(fn=capture, arg=1)
    with pytest.raises(TypeError):
        executor.submit(arg=1)


def test_map(executor):
    assert list(executor.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, range(10), range(10), chunksize=3)) == list(map(pow, range(10), range(10)))


def test_map_exception(executor):
    i = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(i) == (0, 1)
    assert next(i) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(i)


def test_map_timeout(executor):
    results = []
    with pytest.raises(cf.TimeoutError):
        for r in executor.map(time.sleep, [0, 0, 3], timeout=1.5):
            results.append(r)
    assert results == [None, None]


def test_map_keeps_no_reference_to_a_yielded_result(executor):
    """CPython's test_free_reference: the result iterator holds no yielded result."""
    for obj in executor.map(make_dummy_object, range(10)):
        wr = weakref.ref(obj)
        del obj
        gc.collect()
        assert wr() is None


def test_no_stale_references(executor):
    """CPython's test_no_stale_references: a submitted bound method's object is not kept."""
    my_object = MyObject()
    collected = threading.Event()
    _ref = weakref.ref(my_object, lambda _: collected.set())
    executor.submit(my_object.my_method)  # the future is discarded deliberately
    del my_object
    deadline = time.monotonic() + TIMEOUT_S
    while not collected.is_set() and time.monotonic() < deadline:
        gc.collect()
        collected.wait(0.1)
    assert collected.is_set(), "stale reference not collected"
    assert _ref() is None


def test_shutdown_race_issue12456(executor):
    executor.map(str, [2] * (WORKERS + 1))
    executor.shutdown()


# ---- exceptions and callbacks --------------------------------------------------------------------


def test_exception_propagates_with_its_type(executor):
    fut = executor.submit(divmod, 1, 0)
    assert isinstance(fut.exception(TIMEOUT_S), ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        fut.result(0)
    assert fut.done() and not fut.cancelled() and not fut.running()


def test_done_callbacks(executor):
    seen: list = []
    called = threading.Event()

    def callback(f):
        seen.append(f)
        called.set()

    fut = executor.submit(mul, 6, 7)
    fut.add_done_callback(callback)
    assert called.wait(TIMEOUT_S) and seen == [fut] and fut.result(0) == 42
    fut.add_done_callback(seen.append)  # added after done: called at once, in this thread
    assert seen == [fut, fut]


# ---- cancel ----------------------------------------------------------------------------------------


def test_cancel_of_a_pending_task(executor, event, tmp_path, kind):
    release = event()
    blockers = fill_workers(executor, release, tmp_path)
    # a process pool moves a few tasks to its call queue (then "running"): queue past them
    padding = [executor.submit(mul, 2, n) for n in range(WORKERS + 2)]
    marker = tmp_path / f"ran-{uuid.uuid4().hex}"
    queued = executor.submit(touch_then_return, str(marker), 1)
    other = executor.submit(mul, 2, 3)
    called = threading.Event()
    queued.add_done_callback(lambda f: called.set())
    assert not queued.running()
    t0 = time.perf_counter()
    assert queued.cancel() is True
    assert time.perf_counter() - t0 < 0.05
    assert queued.cancelled() and queued.done() and called.is_set()
    assert queued.cancel() is True  # again: still cancelled
    with pytest.raises(cf.CancelledError):
        queued.result(0)
    time.sleep(0.5)  # dlhub: the remote cancel reaches the worker that prefetched it, still busy
    release.set()
    assert other.result(TIMEOUT_S) == 6
    assert [f.result(TIMEOUT_S) for f in padding] == [2 * n for n in range(WORKERS + 2)]
    assert [b.result(TIMEOUT_S) for b in blockers]
    time.sleep(0.2)
    if kind != "dlhub":
        assert not marker.exists(), "a cancelled task ran"
    else:  # a task prefetched at a worker may start before the remote cancel reaches it
        wait_until(lambda: executor.task_info(queued)["state"] in ("cancelled", "succeeded"), TIMEOUT_S)
        assert marker.exists() == (executor.task_info(queued)["state"] == "succeeded")


def test_cancel_of_a_running_or_finished_task_is_false(executor, event, tmp_path):
    release = event()
    blockers = fill_workers(executor, release, tmp_path)
    deadline = time.monotonic() + TIMEOUT_S
    while not blockers[0].running():  # dlhub: the client asks the manager
        assert time.monotonic() < deadline, "running() never became true"
        time.sleep(0.01)
    assert blockers[0].cancel() is False
    assert blockers[0].running() and not blockers[0].cancelled()
    release.set()
    assert blockers[0].result(TIMEOUT_S)
    assert blockers[0].cancel() is False and not blockers[0].cancelled()


# ---- test_wait.py ---------------------------------------------------------------------------------


def test_wait_20369(executor):
    future = executor.submit(mul, 1, 2)
    done, not_done = cf.wait([future, future], TIMEOUT_S, return_when=cf.ALL_COMPLETED)
    assert done == {future} and not_done == set()


def test_wait_first_completed(executor, event):
    e = event()
    future1 = executor.submit(mul, 21, 2)
    future2 = executor.submit(wait_for, e.path)
    try:
        done, not_done = cf.wait([CANCELLED_FUTURE, future1, future2], TIMEOUT_S, cf.FIRST_COMPLETED)
        assert done == {future1}
        assert not_done == {CANCELLED_FUTURE, future2}
    finally:
        e.set()
    future2.result(TIMEOUT_S)


def test_wait_first_completed_some_already_completed(executor, event):
    e = event()
    future1 = executor.submit(wait_for, e.path)
    try:
        finished, pending = cf.wait(
            [CANCELLED_AND_NOTIFIED_FUTURE, SUCCESSFUL, future1], TIMEOUT_S, cf.FIRST_COMPLETED
        )
        assert finished == {CANCELLED_AND_NOTIFIED_FUTURE, SUCCESSFUL}
        assert pending == {future1}
    finally:
        e.set()
    future1.result(TIMEOUT_S)


def test_wait_first_exception(executor, event):
    e1, e2 = event(), event()
    future1 = executor.submit(mul, 2, 21)
    future2 = executor.submit(wait_and_raise, e1.path)
    future3 = executor.submit(wait_for, e2.path)

    def wait_for_future1():
        future1.result(TIMEOUT_S)
        e1.set()

    t = threading.Thread(target=wait_for_future1)
    t.start()
    try:
        finished, pending = cf.wait([future1, future2, future3], TIMEOUT_S, cf.FIRST_EXCEPTION)
        assert finished == {future1, future2}
        assert pending == {future3}
    finally:
        t.join(TIMEOUT_S)
        e1.set()
        e2.set()
    future3.result(TIMEOUT_S)


def test_wait_first_exception_some_already_complete(executor, event):
    e = event()
    future1 = executor.submit(divmod, 21, 0)
    future2 = executor.submit(wait_for, e.path)
    try:
        finished, pending = cf.wait(
            [SUCCESSFUL, CANCELLED_FUTURE, CANCELLED_AND_NOTIFIED_FUTURE, future1, future2],
            TIMEOUT_S,
            cf.FIRST_EXCEPTION,
        )
        assert finished == {SUCCESSFUL, CANCELLED_AND_NOTIFIED_FUTURE, future1}
        assert pending == {CANCELLED_FUTURE, future2}
    finally:
        e.set()
    future2.result(TIMEOUT_S)


def test_wait_first_exception_one_already_failed(executor, event):
    e = event()
    future1 = executor.submit(wait_for, e.path)
    try:
        finished, pending = cf.wait([EXCEPTION, future1], TIMEOUT_S, cf.FIRST_EXCEPTION)
        assert finished == {EXCEPTION} and pending == {future1}
    finally:
        e.set()
    future1.result(TIMEOUT_S)


def test_wait_all_completed(executor):
    future1 = executor.submit(divmod, 2, 0)
    future2 = executor.submit(mul, 2, 21)
    everything = [SUCCESSFUL, CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION, future1, future2]
    finished, pending = cf.wait(everything, TIMEOUT_S, cf.ALL_COMPLETED)
    assert finished == set(everything) and pending == set()


def test_wait_timeout(executor, event):
    e = event()
    future = executor.submit(wait_for, e.path)
    try:
        finished, pending = cf.wait(
            [CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION, SUCCESSFUL, future], 0.05, cf.ALL_COMPLETED
        )
        assert finished == {CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION, SUCCESSFUL}
        assert pending == {future}
    finally:
        e.set()
    future.result(TIMEOUT_S)


# ---- test_as_completed.py -------------------------------------------------------------------------


def test_as_completed_no_timeout(executor):
    future1 = executor.submit(mul, 2, 21)
    future2 = executor.submit(mul, 7, 6)
    everything = {CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION, SUCCESSFUL, future1, future2}
    assert set(cf.as_completed(everything, TIMEOUT_S)) == everything


@pytest.mark.parametrize("timeout", [0, 0.1])
def test_as_completed_times_out(executor, event, timeout):
    already = {CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION, SUCCESSFUL}
    e = event()
    future = executor.submit(wait_for, e.path)
    completed = set()
    try:
        with pytest.raises(cf.TimeoutError):
            for f in cf.as_completed(already | {future}, timeout):
                completed.add(f)
        assert completed == already
    finally:
        e.set()
    future.result(TIMEOUT_S)


def test_as_completed_duplicate_futures(executor):
    future1 = executor.submit(time.sleep, 0.3)
    assert len(list(cf.as_completed(itertools.repeat(future1, 3), TIMEOUT_S))) == 1


# ---- test_shutdown.py -----------------------------------------------------------------------------


def test_run_after_shutdown(executor):
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(pow, 2, 5)


def test_hang_issue12364(executor):
    fs = [executor.submit(time.sleep, 0.02) for _ in range(20)]
    executor.shutdown()
    for f in fs:
        assert f.done()
        f.result(0)


def test_shutdown_cancel_futures(executor, kind):
    fs = [executor.submit(time.sleep, 0.1) for _ in range(50)]
    executor.shutdown(cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    assert len(cancelled) > 20
    others = [f for f in fs if not f.cancelled()]
    for f in others:
        assert f.done(), f"{f._state=}"
        assert f.exception(0) is None
    if kind != "dlhub":  # a local pool starts the first tasks at once; a remote one may not yet
        assert len(others) > 0


def test_shutdown_no_wait(executor):
    res = executor.map(abs, range(-5, 5))
    t0 = time.perf_counter()
    executor.shutdown(wait=False)
    assert time.perf_counter() - t0 < 0.5
    assert list(res) == [abs(v) for v in range(-5, 5)]  # pending futures still complete


def test_shutdown_no_wait_with_running_tasks(executor, event, tmp_path):
    e = event()
    marker = tmp_path / f"done-{uuid.uuid4().hex}"
    fut = executor.submit(_wait_then_touch, e.path, str(marker))
    t0 = time.perf_counter()
    executor.shutdown(wait=False)
    assert time.perf_counter() - t0 < 0.1  # at once
    assert not fut.done()
    e.set()
    assert fut.result(TIMEOUT_S) == str(marker) and marker.exists()


def _wait_then_touch(path: str, marker: str) -> str:
    wait_for(path)
    open(marker, "w").close()
    return marker


def test_shutdown_after_a_cancel_does_not_hang_gh94440(executor):
    executor.submit(int).result(TIMEOUT_S)
    executor.submit(int).cancel()
    done = threading.Event()
    t = threading.Thread(target=lambda: (executor.shutdown(wait=True), done.set()), daemon=True)
    t.start()
    assert done.wait(5), "shutdown(wait=True) hung after a cancel"


def test_context_manager_shutdown(make_executor):
    with make_executor() as e:
        assert list(e.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError):
        e.submit(abs, 1)


def test_futures_states_are_the_standard_ones(executor, event):
    e = event()
    fut = executor.submit(wait_for, e.path)
    assert fut._state in (PENDING, RUNNING)
    e.set()
    fut.result(TIMEOUT_S)
    assert fut._state == FINISHED and isinstance(fut, cf.Future)


def test_an_argument_is_not_kept(executor):
    arg = argparse.Namespace(payload=os.urandom(1000))
    ref = weakref.ref(arg)
    fut = executor.submit(len, arg.payload)
    assert fut.result(TIMEOUT_S) == 1000
    fut = executor.submit(repr, arg)
    fut.result(TIMEOUT_S)
    del arg
    gc.collect()
    assert ref() is None
