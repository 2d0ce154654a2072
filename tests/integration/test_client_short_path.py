"""The client's short path (issue 15, item 2): a serial call's task leaves from the user's thread
straight to the socket (no hand-off to the I/O thread), a burst still goes through the I/O
thread's queue (batched there). It is opt-in (``$DLHUB_CLIENT_SEND=direct``); the default,
``thread``, hands every send to the I/O thread."""

from __future__ import annotations

import pytest


def double(x):
    return 2 * x


def test_serial_calls_take_the_short_path_and_bursts_the_queue(stack, monkeypatch):
    monkeypatch.setenv("DLHUB_CLIENT_SEND", "direct")
    ex = stack.executor()
    try:
        assert ex.submit(double, 0).result(60) == 0
        before = ex._conn.direct_sends
        assert [ex.submit(double, i).result(60) for i in range(50)] == [2 * i for i in range(50)]
        assert ex._conn.direct_sends - before >= 45  # the I/O thread's turn may hold the lock a few times
        before = ex._conn.direct_sends
        futures = [ex.submit(double, i) for i in range(500)]
        assert [f.result(60) for f in futures] == [2 * i for i in range(500)]
        assert ex._conn.direct_sends - before <= 5  # in flight: the rest waited in the queue
        assert not ex._conn.unacked or all(f.done() for f in futures)
    finally:
        ex.shutdown()


@pytest.mark.parametrize("mode", [None, "thread"])
def test_the_short_path_is_off_by_default_and_when_asked(stack, monkeypatch, mode):
    if mode is None:
        monkeypatch.delenv("DLHUB_CLIENT_SEND", raising=False)
    else:
        monkeypatch.setenv("DLHUB_CLIENT_SEND", mode)
    ex = stack.executor()
    try:
        assert [ex.submit(double, i).result(60) for i in range(20)] == [2 * i for i in range(20)]
        assert ex._conn.direct_sends == 0
    finally:
        ex.shutdown()
    monkeypatch.setenv("DLHUB_CLIENT_SEND", "sideways")
    with pytest.raises(ValueError, match="DLHUB_CLIENT_SEND"):
        stack.executor()
