"""The Executor I/O thread's wake-up (executor/_wakeup.py): both implementations, on real
descriptors polled by a real ``zmq.Poller`` in another thread, as the I/O thread polls them."""

from __future__ import annotations

import os
import statistics
import threading
import time

import pytest
import zmq

from dlhub.executor._wakeup import KINDS, EventfdWakeup, SocketPairWakeup, make_wakeup

pytestmark = pytest.mark.parametrize("kind", KINDS)


def readable(w, timeout_ms: int = 0) -> bool:
    poller = zmq.Poller()
    poller.register(w.fileno(), zmq.POLLIN)
    return bool(poller.poll(timeout_ms))


def test_wake_makes_the_poll_return_and_drain_clears_it(kind):
    w = make_wakeup(kind)
    try:
        assert w.kind == kind
        assert not readable(w)
        w.wake()
        assert readable(w, 1000)
        w.drain()
        assert not readable(w)
        for _ in range(10_000):  # coalesced: one pending wake, whatever the count (no full buffer)
            w.wake()
        assert readable(w, 1000)
        w.drain()
        assert not readable(w)
        w.wake()  # disarmed by the drain: wakes again
        assert readable(w, 1000)
    finally:
        w.close()


def test_a_wake_racing_the_drain_is_never_lost(kind):
    """The pattern of the I/O thread: drain, then look at the queue. Every item a user thread
    queued (then woke) is seen, however the two threads interleave."""
    w = make_wakeup(kind)
    queue: list[int] = []
    seen: list[int] = []
    total = 20_000
    done = threading.Event()

    def io_thread():
        poller = zmq.Poller()
        poller.register(w.fileno(), zmq.POLLIN)
        while len(seen) < total:
            if not poller.poll(2000):
                return  # a lost wake: the test fails below
            w.drain()
            while queue:
                seen.append(queue.pop(0))
        done.set()

    t = threading.Thread(target=io_thread)
    t.start()
    for i in range(total):
        queue.append(i)
        w.wake()
    t.join(30)
    w.close()
    assert done.is_set() and seen == list(range(total)), f"{len(seen)} of {total} seen"


class _LockWithAHook:
    """A lock that first runs a hook when entered: a user thread's ``wake()`` lands exactly
    between the drain's first step and its lock, the interleaving a thread switch can give."""

    def __init__(self) -> None:
        self.inner = threading.Lock()
        self.hook = None

    def __enter__(self):
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        self.inner.acquire()

    def __exit__(self, *exc) -> None:
        self.inner.release()


def test_a_wake_landing_inside_the_drain_leaves_the_next_wake_working(kind):
    """A drain that lowered the flag before reading swallowed the write of a wake() that came in
    between, left the flag up over an empty descriptor, and every later wake() did nothing: the
    Executor then sent each submit only at its poll timeout (2 s; batching.py measured ~127
    calls/s instead of thousands)."""
    w = make_wakeup(kind)
    try:
        w._lock = _LockWithAHook()
        w.wake()  # a wake pending: the I/O thread polls, sees it, drains
        assert readable(w, 1000)
        w._lock.hook = w.wake  # ...and a user thread's wake() comes in during the drain
        w.drain()
        # after any drain the flag is up only if the descriptor says so: else no wake works again
        assert not w._armed or readable(w), "flag up over an empty descriptor: later wakes are lost"
        w.drain()
        w.wake()
        assert readable(w, 1000), "a wake() after the drain did not make the poll return"
    finally:
        w.close()


def test_wake_after_close_is_a_no_op_and_never_writes_to_a_reused_descriptor(kind):
    w = make_wakeup(kind)
    fd = w.fileno()
    w.close()
    r, wr = os.pipe()  # likely takes a number the wake-up just freed
    try:
        w.wake()  # no OSError (EBADF), no write into whatever owns the number now
        w.drain()
        w.close()
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 8)
    finally:
        os.close(r)
        os.close(wr)
    assert fd >= 0


def test_wake_latency_is_well_under_a_millisecond(kind):
    """A quick micro-measure (printed with -s): user thread wake() -> poll() returns."""
    w = make_wakeup(kind)
    lat: list[float] = []
    stamp = [0.0]
    go, back = threading.Event(), threading.Event()

    def loop():
        poller = zmq.Poller()
        poller.register(w.fileno(), zmq.POLLIN)
        for _ in range(500):
            go.set()
            poller.poll(2000)
            lat.append(time.perf_counter() - stamp[0])
            w.drain()
            back.set()

    t = threading.Thread(target=loop)
    t.start()
    for _ in range(500):
        go.wait()
        go.clear()
        time.sleep(0.0002)
        stamp[0] = time.perf_counter()
        w.wake()
        back.wait()
        back.clear()
    t.join()
    w.close()
    p50 = statistics.median(lat)
    print(f"{kind}: wake -> poll p50 {p50 * 1e6:.1f} us, p90 {sorted(lat)[450] * 1e6:.1f} us")
    assert p50 < 0.005  # generous: the box is shared; in practice ~10-20 us


def test_the_choice(kind, monkeypatch):
    monkeypatch.setenv("DLHUB_WAKEUP", kind)
    w = make_wakeup()
    w.close()
    assert type(w) is {"eventfd": EventfdWakeup, "socketpair": SocketPairWakeup}[kind]
    monkeypatch.delenv("DLHUB_WAKEUP")
    monkeypatch.delattr(os, "eventfd", raising=False)  # as on macOS
    w = make_wakeup()
    w.close()
    assert type(w) is SocketPairWakeup
    with pytest.raises(ValueError, match="DLHUB_WAKEUP must be one of eventfd, socketpair, got 'pipe'"):
        make_wakeup("pipe")
    if kind == "eventfd":
        with pytest.raises(ValueError, match="no eventfd"):
            make_wakeup("eventfd")
