"""Large payloads travel as ZeroMQ frames of their own (pack_frames / unpack(extra=...)):
never copied into a msgpack body, decoded as views of the frames, and every malformed
arrangement refused with a ProtocolError that says what is wrong."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from dlhub.protocol import messages as m
from dlhub.protocol.errors import ProtocolError

BIG = m.OOB_MIN_BYTES


def tid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def task(i: int, payload: bytes) -> m.TaskRecord:
    return m.task_record(tid(i), "digest", payload)


def test_small_messages_are_one_frame_exactly_as_pack():
    msg = m.Submit("ep", [task(1, b"\x01\xc0")])
    assert m.pack_frames(msg) == [m.pack(msg)]
    hb = m.Heartbeat({"workers": 2})
    assert m.pack_frames(hb) == [m.pack(hb)]


def test_a_large_task_payload_is_its_own_frame_and_comes_back_as_a_view():
    big = bytes(range(256)) * (BIG // 256 + 1)
    small = b"\x01\x90"
    msg = m.Submit("ep", [task(1, small), task(2, big), task(3, small)])
    frames = m.pack_frames(msg)
    assert len(frames) == 2 and frames[1] is big  # the same object: not copied
    assert len(frames[0]) < 200  # the header holds a placeholder, not the bytes
    got = m.unpack(frames[0], extra=frames[1:])
    assert isinstance(got, m.Submit) and [r.id for r in got.tasks] == [tid(1), tid(2), tid(3)]
    assert got.tasks[0].payload == small and type(got.tasks[0].payload) is bytes
    view = got.tasks[1].payload
    assert type(view) is memoryview and view.obj is big and view == big


def test_results_and_tasks_carry_several_frames_in_order():
    payloads = [bytes([i]) * (BIG + i) for i in range(3)]
    res = m.Results([m.result_record(tid(i), "succeeded", p) for i, p in enumerate(payloads)], {"x": 1})
    frames = m.pack_frames(res)
    assert len(frames) == 4
    got = m.unpack(frames[0], extra=frames[1:])
    assert [bytes(r.payload) for r in got.results] == payloads and got.info == {"x": 1}
    tasks = m.Tasks([task(i, p) for i, p in enumerate(payloads)], {"d": b"code"}, [[tid(0), tid(1)]])
    frames = m.pack_frames(tasks)
    got = m.unpack(frames[0], extra=frames[1:])
    assert [bytes(t.payload) for t in got.tasks] == payloads and got.code == {"d": b"code"}


def test_over_real_sockets_the_payload_is_the_received_frame():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        big = b"\x02" + b"z" * (4 * BIG)
        a.send_multipart(m.pack_frames(m.Results([m.result_record(tid(7), "succeeded", big)])), copy=False)
        assert b.poll(5000)
        first = b.recv()
        rest = m.recv_rest(b)
        assert len(rest) == 1 and isinstance(rest[0], zmq.Frame)
        got = m.unpack(first, extra=rest)
        payload = got.results[0].payload
        assert payload == big and not payload.readonly  # a writable view of ZeroMQ's buffer
        a.send(m.pack(m.Heartbeat({})))
        assert b.poll(5000)
        first = b.recv()
        assert m.recv_rest(b) == [] and isinstance(m.unpack(first), m.Heartbeat)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def _header(body: list) -> bytes:
    return bytes([m.PROTOCOL_VERSION]) + msgpack.packb(body, use_bin_type=True)


def _ext(i: int) -> msgpack.ExtType:
    return msgpack.ExtType(1, i.to_bytes(4, "little"))


def _task_body(payload) -> list:
    return [tid(1), "digest", payload, None, "auto", None, None, None]


@pytest.mark.parametrize(
    "header, extra, says",
    [
        (_header([4, "ep", [_task_body(_ext(0))]]), [], "without payload frames"),
        (_header([4, "ep", [_task_body(b"x")]]), [b"y" * 10], "1 of 1 payload frames are not referenced"),
        (_header([4, "ep", [_task_body(_ext(3))]]), [b"y" * 10], "names no unused frame"),
        (_header([4, "ep", [_task_body(_ext(0)), _task_body(_ext(0))]]), [b"y"], "names no unused frame"),
        (_header([4, "ep", [[tid(1), _ext(0), b"p", None, "auto", None, None, None]]]), [b"y"], "payload"),
        (_header([14, {"k": _ext(0)}]), [b"y"], "Heartbeat carries no payload frames"),
        (_header([4, "ep", [_task_body(msgpack.ExtType(5, b"abcd"))]]), [b"y"], "names no unused frame"),
    ],
)
def test_malformed_frame_arrangements_are_refused(header, extra, says):
    with pytest.raises(ProtocolError, match=says):
        m.unpack(header, extra=extra)


def test_the_size_limit_counts_every_frame():
    big = b"\x02" * (2 * BIG)
    frames = m.pack_frames(m.Submit("ep", [task(1, big)]))
    with pytest.raises(ProtocolError, match=r"message of [\d,]+ bytes exceeds the limit of 100,000"):
        m.unpack(frames[0], max_bytes=100_000, extra=frames[1:])
    assert m.unpack(frames[0], max_bytes=3 * BIG, extra=frames[1:]).tasks[0].payload == big
