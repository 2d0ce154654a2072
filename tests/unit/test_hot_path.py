"""The per-call shortcuts of issue 11 keep what they replace: frame-by-frame sends arrive as one
multipart message, the memoized options JSON equals json.dumps for every mapping, and the
endpoint's scaling snapshot never shows a block idle while one of its workers holds a task."""

from __future__ import annotations

import json

import pytest
import zmq
from test_pools import make_endpoint, rec

from dlhub.endpoint import events as ev
from dlhub.manager.task_rows import _json
from dlhub.protocol import messages as m


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://hot-path")
    b.connect("inproc://hot-path")
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


def test_send_frames_arrive_as_one_multipart_message(pair):
    a, b = pair
    frames = [b"id", memoryview(b"header"), b"x" * (m.OOB_MIN_BYTES + 1)]
    m.send_frames(a, frames, zmq.NOBLOCK)  # an enum flag is accepted as well as an int
    m.send_frames(a, [b"alone"])
    got = b.recv_multipart()
    assert got == [b"id", b"header", b"x" * (m.OOB_MIN_BYTES + 1)]
    assert b.recv_multipart() == [b"alone"]


def test_recv_frames_reads_each_message_whole_and_only_it(pair):
    a, b = pair
    big = b"x" * (m.OOB_MIN_BYTES + 1)
    m.send_frames(a, [b"id", b"header", big])
    a.send(b"alone")
    first = m.recv_frames(b, zmq.NOBLOCK)
    assert [f.bytes for f in first] == [b"id", b"header", big]
    assert all(isinstance(f, zmq.Frame) for f in first)  # not copied
    assert [f.bytes for f in m.recv_frames(b)] == [b"alone"]  # the next message, not a part of the last
    with pytest.raises(zmq.Again):
        m.recv_frames(b, zmq.NOBLOCK)


def test_send_frames_noblock_raises_again_without_a_peer():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        with pytest.raises(zmq.Again):
            m.send_frames(sock, [b"a", b"b"], int(zmq.NOBLOCK))
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.parametrize(
    "value",
    [
        {"out": ["http://127.0.0.1:1/api/v1/outputs", "grant"]},
        {"a": True, "b": 1},
        {"a": 1, "b": True},  # True == 1 and hash alike: must not reuse the entry above
        {"x": 0.0},
        {"x": -0.0},  # equal to 0.0: floats are never remembered
        {"a": [1, 2]},
        {"a": {"b": 1}},
        {"a": None, "key": "k", "len": 3},
        {"cores": 2, "memory_gb": 8},
    ],
)
def test_options_json_is_json_dumps(value):
    assert _json(value) == json.dumps(value)
    assert _json(value) == json.dumps(value)  # the remembered text too


def test_scaling_snapshot_shows_a_busy_block_at_once_and_an_idle_one_soon(tmp_path):
    ep = make_endpoint(tmp_path, [0.0])
    s = ep.scheduler
    s.handle(
        ev.PoolJoined(0.0, b"p:p1", "p1", "default/0", {}),
        ev.WorkerJoined(0.0, b"w:p1.0", "p1.0", "p1"),
        ev.CodeArrived(0.0, {"sha256:f": b"\x10f"}),
    )
    ep._publish(force=True)
    assert ep._published[1] == frozenset()
    s.handle(ev.TasksArrived(0.1, [rec(1)]))
    ep._publish()  # work arrived: published at once
    assert ep._published[1] == {"default/0"}
    s.handle(ev.WorkerResults(0.2, b"w:p1.0", [m.result_record(rec(1)[m.T_ID], "succeeded", b"\x01\x00")]))
    assert not s.workers[b"w:p1.0"].assigned
    ep._publish()  # work only ended: the block may look busy a little longer ...
    assert ep._published[1] == {"default/0"}
    ep._publish_due = 0.0  # ... until PUBLISH_SETTLE_S have passed
    ep._publish()
    assert ep._published[1] == frozenset()
    s.handle(ev.TasksArrived(0.3, [rec(2)]))  # new work within the settle time: at once again
    ep._publish()
    assert ep._published[1] == {"default/0"}
