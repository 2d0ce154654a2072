"""Task and result records are NamedTuples in memory (TaskRecord, ResultRecord) and the same
msgpack arrays on the wire: what the decoder hands on is typed, old 6/7-field tasks are padded,
and the places that change a record put a new tuple where the old one was."""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import zmq

from dlhub.endpoint.scheduler import Scheduler
from dlhub.endpoint.worker import Worker
from dlhub.manager.routing import Router
from dlhub.protocol import messages as m
from dlhub.protocol.errors import ProtocolError
from dlhub.protocol.policy import Policy
from dlhub.protocol.serialize import code_digest, deserialize, serialize, serialize_function

ORIGIN = {"user": "alice", "admin": False, "groups": ["chem"]}


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def full_task(n: int = 1) -> list:
    return [tid(n), "sha256:" + "ab" * 32, b"\x01\x90", 2.5, "auto", {"cores": 1}, {"cache": False}, ORIGIN]


def full_result(n: int = 1) -> list:
    return [tid(n), "succeeded", b"\x01\x05", None, [1.0, 2.0], ["out", ""]]


def roundtrip(msg: m.Message) -> m.Message:
    return m.unpack(m.pack(msg))


# ---- the codec ----------------------------------------------------------------------------------


def test_decoded_records_are_typed_and_named():
    for msg in (m.Submit("ep", [full_task(1), full_task(2)]), m.Tasks([full_task(1), full_task(2)])):
        tasks = roundtrip(msg).tasks
        assert [type(t) for t in tasks] == [m.TaskRecord, m.TaskRecord]
        rec = tasks[1]
        assert rec == tuple(full_task(2)) and list(rec) == full_task(2)
        assert (rec.id, rec.function, rec.payload, rec.timeout, rec.serializer) == tuple(full_task(2)[:5])
        assert (rec.resources, rec.options, rec.origin) == ({"cores": 1}, {"cache": False}, ORIGIN)
        assert rec[m.T_FUNCTION] is rec.function and rec[m.T_ORIGIN] is rec.origin  # positions still index
    results = roundtrip(m.Results([full_result(1), full_result(2)])).results
    assert [type(r) for r in results] == [m.ResultRecord, m.ResultRecord]
    res = results[0]
    assert list(res) == full_result(1)
    assert (res.id, res.state, res.payload, res.error, res.timing, res.output) == tuple(full_result(1))
    assert res[m.R_STATE] == "succeeded" and res[m.R_TIMING] == [1.0, 2.0]


def test_old_six_and_seven_field_tasks_are_padded_to_typed_records():
    for fields in (6, 7):
        for cls in (m.Tasks, m.Submit):
            msg = cls([full_task()[:fields]]) if cls is m.Tasks else cls("ep", [full_task()[:fields]])
            rec = roundtrip(msg).tasks[0]
            assert type(rec) is m.TaskRecord
            assert rec == m.TaskRecord(*full_task()[:fields])
            assert rec.origin is None and (rec.options is None) == (fields == 6)
            assert m.task_origin(rec) is None
            assert m.task_options(rec) == ({} if fields == 6 else {"cache": False})


def test_malformed_records_are_still_refused():
    for bad in (full_task()[:5], [*full_task(), None], [tid(1)], "task"):
        with pytest.raises(ProtocolError, match="task #0 must be a list of 8 fields"):
            m.unpack(m.pack(m.Tasks([bad])))
    with pytest.raises(ProtocolError, match="task #1 has a malformed task id"):
        m.unpack(m.pack(m.Tasks([full_task(), [b"short", *full_task()[1:]]])))
    with pytest.raises(ProtocolError, match="task #0 needs a function digest"):
        m.unpack(m.pack(m.Tasks([[tid(1), 7, *full_task()[2:]]])))
    with pytest.raises(ProtocolError, match="task #0 options: unknown key 'x'"):
        m.unpack(m.pack(m.Tasks([[*full_task()[:6], {"x": 1}, None]])))
    for bad in (full_result()[:5], [*full_result(), None]):
        with pytest.raises(ProtocolError, match="result #0 must be a list of 6 fields"):
            m.unpack(m.pack(m.Results([bad])))
    with pytest.raises(ProtocolError, match="result #0 has a malformed task id"):
        m.unpack(m.pack(m.Results([[b"x" * 15, *full_result()[1:]]])))
    with pytest.raises(ProtocolError, match="result #0 state must be a string"):
        m.unpack(m.pack(m.Results([[tid(1), 3, *full_result()[2:]]])))


def test_the_wire_bytes_do_not_change():
    """msgpack packs a NamedTuple as the array a list of the same fields packs to."""
    tasks, results = [full_task(1), full_task(2)], [full_result(1), full_result(2)]
    typed_tasks = [m.TaskRecord(*t) for t in tasks]
    typed_results = [m.ResultRecord(*r) for r in results]
    for as_lists, as_tuples in (
        (m.Submit("ep", tasks), m.Submit("ep", typed_tasks)),
        (m.Tasks(tasks, {"d": b"c"}, [[tid(1)]]), m.Tasks(typed_tasks, {"d": b"c"}, [[tid(1)]])),
        (m.Results(results, {"loads": 1}), m.Results(typed_results, {"loads": 1})),
    ):
        frame = m.pack(as_lists)
        assert m.pack(as_tuples) == frame
        assert m.pack(m.unpack(frame)) == frame  # decoded (typed) and packed again: the same bytes
    # the bytes are the documented arrays: [type, fields...], each record an array of its fields
    assert msgpack.unpackb(m.pack(m.Submit("ep", typed_tasks))[1:], raw=False) == [m.Submit.TYPE, "ep", tasks]
    # the constructors make the same records the decoder does
    assert m.task_record(*full_task()) == roundtrip(m.Tasks([full_task()])).tasks[0]
    assert type(m.task_record(tid(1), "f", b"")) is m.TaskRecord
    assert m.task_record(tid(1), "f", b"") == (tid(1), "f", b"", None, "auto", None, None, None)
    assert type(m.result_record(tid(1), "lost")) is m.ResultRecord
    assert m.result_record(tid(1), "lost") == (tid(1), "lost", None, None, None, None)


def test_record_helpers():
    rec = m.task_record(*full_task())
    assert m.with_origin(rec, None) == rec._replace(origin=None)
    assert type(m.with_origin(rec, None)) is m.TaskRecord and rec.origin == ORIGIN  # a new record
    assert m.as_task_record(rec) is rec
    assert m.as_task_record(full_task()[:6]) == m.TaskRecord(*full_task()[:6])
    assert m.as_result_record(full_result()) == m.ResultRecord(*full_result())
    with pytest.raises(ValueError, match="6 to 8 fields, got 5"):
        m.as_task_record(full_task()[:5])
    with pytest.raises(ValueError, match="6 fields, got 7"):
        m.as_result_record([*full_result(), None])
    with pytest.raises(TypeError):
        rec[m.T_ORIGIN] = None  # immutable: a change is a new record


# ---- the places that change a record -------------------------------------------------------------


class NullStore:
    def received(self, rows, acks):
        pass

    def update(self, changes, acks=()):
        pass


def test_the_manager_replaces_the_origin_and_the_resolved_function_in_the_message():
    resolved = "servable:" + "cd" * 32
    router = Router(
        NullStore(),
        clock=lambda: 1000.0,
        principal=lambda user: (False, frozenset({"chem"})),
        servable_owner=lambda digest: "jane",
    )
    router.endpoint_hello(b"e:ep:s1", m.Hello("endpoint", "ep", "t", "s1", {}, {"pid": 1}))
    router.drain()
    router._resolve = lambda name, owner: resolved  # the repository's answer for jane/model
    forged = {"user": "root", "admin": True}
    by_ref = [tid(2), "ref:jane/model", b"", None, "auto", None]  # an old 6-field record
    msg = roundtrip(m.Submit("ep", [full_task(1)[:7] + [forged], by_ref]))
    router.submit(b"client", "alice", "s", msg)
    first, second = msg.tasks
    assert type(first) is type(second) is m.TaskRecord
    assert first.origin == {"user": "alice", "admin": False, "groups": ["chem"]}  # not the client's
    assert first[: m.T_ORIGIN] == tuple(full_task(1)[: m.T_ORIGIN])
    assert second.function == resolved and second.origin["owner"] == "jane"
    assert router.tasks[tid(1)].record is first and router.tasks[tid(2)].record is second
    out = router.drain()
    sent = [r for link, _, msg in out if link == "endpoint" and isinstance(msg, m.Tasks) for r in msg.tasks]
    assert sent == [first, second]


def test_the_endpoint_drops_the_origin_for_workers_with_a_new_record():
    s = Scheduler(clock=lambda: 0.0, wall_clock=lambda: 0.0)
    s.add_pool(b"p:p1", "p1", "0", {})
    s.policy = Policy("ep", "bob")
    arrived = roundtrip(m.Tasks([full_task(1), [tid(2), *full_task()[1:7], {"user": "bob"}]])).tasks
    assert s.add_tasks(arrived) == 1  # alice's task is refused by bob's endpoint
    assert s.counters["refused"] == 1 and tid(1) not in s.tasks
    held = s.tasks[tid(2)].record
    assert type(held) is m.TaskRecord and held.origin is None and held[:7] == tuple(full_task(2)[:7])
    assert arrived[1].origin == {"user": "bob"}  # the decoded record itself is not changed
    assert s.tasks[tid(2)].user == "bob"  # kept for the fair queue
    # a list from a caller in this process is taken as a record too
    s2 = Scheduler(clock=lambda: 0.0, wall_clock=lambda: 0.0)
    s2.add_pool(b"p:p1", "p1", "0", {})
    assert s2.add_tasks([full_task(3)[:6]]) == 1
    assert type(s2.tasks[tid(3)].record) is m.TaskRecord


def square(x):
    return x * x


def test_the_worker_sends_typed_results_with_their_timing():
    blob = serialize_function(square)
    digest = code_digest(blob)
    worker = Worker({"worker_cache": {"max_warm_servables": 1}}, "w1", "p1")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    address = f"inproc://records-{os.getpid()}"
    router.bind(address)
    worker.sock = ctx.socket(zmq.DEALER)
    worker.sock.connect(address)
    try:
        worker.code[digest] = blob
        frame = m.pack(m.Tasks([m.task_record(tid(1), digest, serialize([[7], {}]))]))
        worker.local.extend(m.unpack(frame).tasks)
        before = time.time()
        worker._run_one()
        after = time.time()
        assert router.poll(5000)
        _, reply = router.recv_multipart()
        (res,) = m.unpack(reply).results
        assert type(res) is m.ResultRecord and res.state == "succeeded", res
        assert deserialize(res.payload) == 49 and res.id == tid(1)
        start, end = res.timing
        assert before <= start <= end <= after
        assert worker.unsent == []
    finally:
        worker.sock.close(0)
        router.close(0)
        ctx.term()
