"""dlhub.protocol: wire messages, the serializer registry and the error record."""

from __future__ import annotations

import dataclasses
import sys
import traceback

import msgpack
import numpy as np
import pytest

from dlhub.protocol import (
    PROTOCOL_VERSION,
    PayloadTooLarge,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    TaskCancelled,
    TaskLost,
    TaskTimeout,
    UnknownEndpoint,
    VersionMismatch,
    WorkerLost,
    errors,
)
from dlhub.protocol import messages as m
from dlhub.protocol.serialize import (
    CODE,
    code_digest,
    deserialize,
    load_function,
    method_of,
    runtime_versions,
    serialize,
    serialize_function,
)


def tid(n: int = 0) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


TASK = m.task_record(tid(1), "sha256:abc", b"\x01payload", 2.5, "auto")
RESULT = m.result_record(tid(1), "succeeded", b"\x01\x07", None, [1.0, 2.0], ["out\n", None])

# one instance of every message class, with non-default values in every field
SAMPLES: list[m.Message] = [
    m.Hello("client", "me", "tok", "sess", {"python": "3.11.7", "protocol": 1}, {"pid": 42}),
    m.Welcome("sess", {"endpoints": {"local": {"connected": True}}}),
    m.Refused("access-denied", "token refused"),
    m.Submit("local", [TASK, m.task_record(tid(2), "sha256:def", b"", None, "dill")]),
    m.Accepted([tid(1), tid(2)]),
    m.Tasks([TASK], {"sha256:abc": b"\x10code"}),
    m.Results([RESULT, m.result_record(tid(2), "failed", None, ["remote", "ValueError: x", "tb", None])]),
    m.Cancel([tid(3)]),
    m.CancelRefused([tid(3)], "already running"),
    m.States([[tid(1), "running", 123.5]]),
    m.PutCode("sha256:abc", b"\x10blob"),
    m.CodeRequest(["sha256:abc", "sha256:def"]),
    m.Code({"sha256:abc": b"\x10blob"}),
    m.Heartbeat({"workers": 2}),
    m.Query(7, [tid(1)]),
    m.TaskInfo(7, [{"task_id": tid(1), "state": "queued"}]),
    m.Fetch([tid(1), tid(2)]),
    m.StatusRequest(8),
    m.Status(8, {"endpoints": {}, "tasks_open": 0}),
    m.WorkerDied("w1", -9, "killed by signal 9"),
    m.Shutdown("endpoint stopping"),
    m.KillWorker("w2", "task overran its 5 s limit and ignored SIGALRM"),
    m.StartWorker("w3", "/sw/images/materials.sif"),
    m.ImageFailed("/sw/images/materials.sif", "worker exited at start (exit code 127), twice"),
]


_AUTO_VALUES = {
    str: "x",
    int: 3,
    bytes: b"\x00b",
    list: ["item"],
    dict: {"k": [1]},
    bool: True,
    float: 1.5,
    type(None): None,
}


def _auto_sample(cls: type[m.Message]) -> m.Message:
    """An instance of a message class added after these samples were written."""
    return cls(*(_AUTO_VALUES[types[0]] for types in cls._TYPES))


# every registered message type: the samples above, plus any newer type built from its fields
ALL_SAMPLES = SAMPLES + [
    _auto_sample(cls) for cls in m._REGISTRY.values() if cls not in {type(s) for s in SAMPLES}
]


def body(*values) -> bytes:
    return bytes([PROTOCOL_VERSION]) + msgpack.packb(list(values), use_bin_type=True)


# ---- messages ------------------------------------------------------------------------------


def test_samples_cover_every_registered_message_type():
    """A new message type needs a hand-written sample (non-default values in every field); the
    auto-built one in ALL_SAMPLES only keeps the round-trip tests running until it has one."""
    missing = sorted(cls.__name__ for cls in m._REGISTRY.values() if cls not in {type(s) for s in SAMPLES})
    assert not missing, f"add a sample to SAMPLES for {missing}"
    assert len({s.TYPE for s in SAMPLES}) == len(SAMPLES) == len(m._REGISTRY)
    assert all(m._REGISTRY[s.TYPE] is type(s) for s in SAMPLES)
    # and every message class the module defines is registered (decorated with @_message)
    defined = {
        obj
        for obj in vars(m).values()
        if isinstance(obj, type) and issubclass(obj, m.Message) and obj is not m.Message
    }
    unregistered = sorted(cls.__name__ for cls in defined - set(m._REGISTRY.values()))
    assert not unregistered, f"message classes without a type code: {unregistered}"


@pytest.mark.parametrize("msg", ALL_SAMPLES, ids=lambda s: type(s).__name__)
def test_pack_unpack_round_trip(msg):
    frame = m.pack(msg)
    assert frame[0] == PROTOCOL_VERSION
    back = m.unpack(frame)
    assert type(back) is type(msg)
    assert back == msg
    # memoryview frames (zero-copy receive) decode the same
    assert m.unpack(memoryview(frame)) == msg


def test_defaults_round_trip():
    for msg in (m.Hello("worker", "w", "t", "s"), m.Tasks([]), m.Heartbeat()):
        assert m.unpack(msg.pack()) == msg


def test_messages_are_frozen():
    msg = m.Cancel([tid(1)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.task_ids = []  # type: ignore[misc]


def test_empty_frame():
    with pytest.raises(ProtocolError, match="empty frame"):
        m.unpack(b"")


def test_wrong_version_byte():
    frame = bytearray(m.pack(m.Heartbeat({})))
    frame[0] = PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError, match=rf"protocol version {PROTOCOL_VERSION + 1} not supported"):
        m.unpack(bytes(frame))


def test_truncated_frame():
    frame = m.pack(m.Submit("local", [TASK]))
    with pytest.raises(ProtocolError, match="malformed or truncated"):
        m.unpack(frame[: len(frame) // 2])


@pytest.mark.parametrize(
    "garbage",
    [b"\xc1", b"\xc1\xc1\xc1", msgpack.packb([14, {}]) + b"trailing"],
    ids=["reserved-byte", "reserved-bytes", "extra-data"],
)
def test_garbage_msgpack(garbage):
    with pytest.raises(ProtocolError, match="malformed or truncated"):
        m.unpack(bytes([PROTOCOL_VERSION]) + garbage)


@pytest.mark.parametrize("payload", [{"a": 1}, [], ["4", "x"], 5], ids=["map", "empty", "str-code", "int"])
def test_body_not_a_typed_list(payload):
    frame = bytes([PROTOCOL_VERSION]) + msgpack.packb(payload)
    with pytest.raises(ProtocolError, match=r"not a \[type, fields...\] list"):
        m.unpack(frame)


def test_unknown_type_code():
    with pytest.raises(ProtocolError, match="unknown message type 99"):
        m.unpack(body(99, "x"))


@pytest.mark.parametrize(
    "frame, text",
    [
        (body(m.Submit.TYPE, "local"), "Submit expects 2 fields, got 1"),
        (body(m.Cancel.TYPE, [], "extra"), "Cancel expects 1 fields, got 2"),
        (body(m.Hello.TYPE), "Hello expects 6 fields, got 0"),
    ],
)
def test_wrong_arity(frame, text):
    with pytest.raises(ProtocolError, match=text):
        m.unpack(frame)


@pytest.mark.parametrize(
    "frame, text",
    [
        (body(m.Submit.TYPE, 5, []), "Submit.endpoint must be str, got int"),
        (body(m.Submit.TYPE, "local", {}), "Submit.tasks must be list, got dict"),
        (body(m.PutCode.TYPE, "d", "not bytes"), "PutCode.blob must be bytes, got str"),
        (body(m.Query.TYPE, "7", []), "Query.request_id must be int, got str"),
        (body(m.Heartbeat.TYPE, None), "Heartbeat.info must be dict, got NoneType"),
    ],
)
def test_wrong_field_type(frame, text):
    with pytest.raises(ProtocolError, match=text):
        m.unpack(frame)


@pytest.mark.parametrize(
    "record, text",
    [
        ([tid(1), "f", b"", None, "auto"], "task #0 must be a list of 8 fields"),
        ("not a list", "task #0 must be a list of 8 fields"),
        ([b"short", "f", b"", None, "auto", None], "task #0 has a malformed task id"),
        (["0" * 16, "f", b"", None, "auto", None], "task #0 has a malformed task id"),
        (
            [tid(1), 5, b"", None, "auto", None],
            r"task #0 needs a function digest \(str\) and payload \(bytes\)",
        ),
        ([tid(1), "f", "text", None, "auto", None], r"task #0 needs a function digest \(str\) and payload"),
        ([tid(1), "f", b"", "soon", "auto", None], "task #0 timeout_s must be a number or nil"),
        ([tid(1), "f", b"", None, "auto", "gpu"], "task #0 resources: must be a mapping, got str"),
        ([tid(1), "f", b"", None, "auto", {"gpu": 1}], "task #0 resources: unknown key 'gpu'"),
        ([tid(1), "f", b"", None, "auto", {"gpus": 0.5}], "task #0 resources: gpus must be int, got 0.5"),
        ([tid(1), "f", b"", None, "auto", {"cores": -1}], "task #0 resources: cores must not be negative"),
    ],
)
def test_malformed_task_record(record, text):
    with pytest.raises(ProtocolError, match=text):
        m.unpack(body(m.Submit.TYPE, "local", [record]))
    # the same checks guard Tasks (manager -> endpoint -> worker); the index names the record
    with pytest.raises(ProtocolError, match=text.replace("#0", "#1")):
        m.unpack(body(m.Tasks.TYPE, [list(TASK), record], {}))


@pytest.mark.parametrize(
    "record, text",
    [
        ([tid(1), "succeeded", None, None, None], "result #0 must be a list of 6 fields"),
        ([b"x" * 15, "succeeded", None, None, None, None], "result #0 has a malformed task id"),
        ([tid(1), 3, None, None, None, None], "result #0 state must be a string"),
    ],
)
def test_malformed_result_record(record, text):
    with pytest.raises(ProtocolError, match=text):
        m.unpack(body(m.Results.TYPE, [record]))


def test_oversized_frame():
    frame = m.pack(m.PutCode("d", b"x" * 1000))
    assert m.unpack(frame, max_bytes=len(frame)) == m.PutCode("d", b"x" * 1000)
    with pytest.raises(ProtocolError, match=rf"frame of {len(frame):,} bytes exceeds the limit of 100 bytes"):
        m.unpack(frame, max_bytes=100)


def test_record_helpers_match_field_positions():
    rec = m.task_record(tid(5), "sha256:x", b"p", 1.5, "dill", {"gpus": 1})
    assert rec[m.T_RESOURCES] == {"gpus": 1}
    assert (rec[m.T_ID], rec[m.T_FUNCTION], rec[m.T_PAYLOAD], rec[m.T_TIMEOUT], rec[m.T_SERIALIZER]) == (
        tid(5),
        "sha256:x",
        b"p",
        1.5,
        "dill",
    )
    res = m.result_record(tid(5), "failed", None, ["c", "m", "", None], [1, 2], ["o", "e"])
    assert (res[m.R_ID], res[m.R_STATE], res[m.R_ERROR], res[m.R_TIMING], res[m.R_OUTPUT]) == (
        tid(5),
        "failed",
        ["c", "m", "", None],
        [1, 2],
        ["o", "e"],
    )
    assert set(m.TERMINAL_STATES) <= set(m.TASK_STATES)


# ---- serializers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**63),
        2**64 - 1,
        1.5,
        "text",
        "üñí",
        b"\x00bytes",
        [1, [2, "x"]],
        {"a": 1, "nested": {"b": [None, 2.5]}},
        {1: "int key"},
    ],
    ids=repr,
)
def test_plain_data_uses_msgpack(value):
    buf = serialize(value)
    assert method_of(buf) == "msgpack"
    assert deserialize(buf) == value


@pytest.mark.parametrize("value", [(1, 2), [1, (2, 3)], {"k": (1,)}, {1, 2}, 2**70, complex(1, 2)], ids=repr)
def test_values_msgpack_would_change_fall_back_to_dill(value):
    buf = serialize(value)
    assert method_of(buf) == "dill"
    back = deserialize(buf)
    assert back == value and type(back) is type(value)


def test_tuple_preserved():
    back = deserialize(serialize((1, "a", (2.0,))))
    assert back == (1, "a", (2.0,))
    assert isinstance(back, tuple) and isinstance(back[2], tuple)


def test_numpy_array_round_trip():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = serialize(arr)
    assert method_of(buf) == "dill"
    back = deserialize(buf)
    assert back.dtype == np.float32 and back.shape == (3, 4)
    np.testing.assert_array_equal(back, arr)


def test_explicit_methods():
    assert method_of(serialize([1, 2], "dill")) == "dill"
    assert deserialize(serialize([1, 2], "dill")) == [1, 2]
    buf = serialize({"a": [1, 2.5, None]}, "json")
    assert method_of(buf) == "json"
    assert buf[1:] == b'{"a": [1, 2.5, null]}'
    assert deserialize(buf) == {"a": [1, 2.5, None]}


def test_json_refuses_what_it_cannot_encode_naming_the_type():
    with pytest.raises(SerializationError, match="result of type set cannot be encoded as JSON"):
        serialize({1, 2}, "json")


def test_msgpack_method_refuses_a_tuple_naming_the_type():
    with pytest.raises(SerializationError, match="cannot encode a tuple with msgpack"):
        serialize((1, 2), "msgpack")


def test_unknown_method():
    with pytest.raises(SerializationError, match=r"unknown serializer 'yaml'"):
        serialize(1, "yaml")


def test_unserializable_value_names_its_type():
    def gen():
        yield 1

    with pytest.raises(SerializationError, match="cannot serialize a generator"):
        serialize(gen())


def test_deserialize_rejections():
    with pytest.raises(SerializationError, match="empty buffer"):
        deserialize(b"")
    with pytest.raises(SerializationError, match="unknown serializer id 0x7f"):
        deserialize(b"\x7f123")
    with pytest.raises(SerializationError, match="cannot deserialize dill buffer"):
        deserialize(b"\x02not a pickle")
    with pytest.raises(SerializationError, match="cannot deserialize json buffer"):
        deserialize(b"\x03{bad json")
    assert method_of(b"") == "empty" and method_of(b"\x7f") == "0x7f"


# ---- functions -----------------------------------------------------------------------------


def module_level_square(x):
    return x * x


def make_adder(n):
    def add(x):
        return x + n

    return add


def _code_record(blob: bytes) -> dict:
    assert blob[0] == CODE
    return msgpack.unpackb(blob[1:], raw=False)


def _code_blob(record: dict) -> bytes:
    return bytes([CODE]) + msgpack.packb(record, use_bin_type=True)


def test_function_round_trip_and_source_kept():
    blob = serialize_function(module_level_square)
    assert method_of(blob) == "code"
    record = _code_record(blob)
    assert record["name"] == "module_level_square"
    assert record["source"].startswith("def module_level_square(x):")
    assert record["python"] == runtime_versions()["python"]
    assert load_function(blob)(7) == 49


def test_code_digest_is_stable_and_content_addressed():
    blob = serialize_function(module_level_square)
    assert code_digest(blob) == code_digest(bytes(blob))
    assert code_digest(blob).startswith("sha256:") and len(code_digest(blob)) == 7 + 64
    assert code_digest(blob) != code_digest(blob + b"x")


def test_code_record_keeps_the_pickled_code_beside_the_versions():
    # regression: the version record used to overwrite the pickled code under the "dill" key
    import dill

    record = _code_record(serialize_function(module_level_square))
    assert isinstance(record["code"], bytes) and record["code"]
    assert record["dill"] == dill.__version__
    assert dill.loads(record["code"])(4) == 16


def test_lambda_round_trip():
    fn = lambda x: x * 3  # noqa: E731
    assert load_function(serialize_function(fn))(5) == 15


def test_closure_round_trip():
    fn = make_adder(10)
    loaded = load_function(serialize_function(fn))
    assert loaded(5) == 15
    assert loaded.__module__ != "__dlhub_source__"  # loaded from the pickled code, cell and all


def test_source_fallback_when_dill_bytes_do_not_load():
    record = _code_record(serialize_function(module_level_square))
    record["code"] = b"\x80\x05 definitely not a pickle"
    fn = load_function(_code_blob(record))
    assert fn(9) == 81
    assert fn.__module__ == "__dlhub_source__"  # it really came from the source text


def test_version_mismatch_named_when_nothing_loads():
    record = _code_record(serialize_function(module_level_square))
    record.update(code=b"garbage", source=None, python="2.7.18")
    with pytest.raises(VersionMismatch, match=r"Python 2\.7\.18 .* this worker has Python") as info:
        load_function(_code_blob(record))
    assert "module_level_square" in str(info.value)


def test_same_versions_unloadable_code_is_a_serialization_error():
    record = _code_record(serialize_function(module_level_square))
    record.update(code=b"garbage", source=None, **runtime_versions())
    with pytest.raises(SerializationError, match="cannot load function 'module_level_square'"):
        load_function(_code_blob(record))


def test_load_function_rejects_non_code_buffers():
    with pytest.raises(SerializationError, match="not a code buffer"):
        load_function(serialize(1))
    with pytest.raises(SerializationError, match="not a code buffer"):
        load_function(b"")


def test_serialize_function_refuses_what_dill_cannot_pickle():
    class Holder:
        def __call__(self, x):
            return x

    holder = Holder()
    holder.gen = (i for i in range(3))  # generators cannot be pickled
    with pytest.raises(SerializationError, match="cannot serialize function"):
        serialize_function(holder)


# ---- errors --------------------------------------------------------------------------------


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001
        return caught


def failing_user_function():
    raise ValueError("bad input 42")


class UnpicklableError(Exception):
    def __reduce__(self):
        raise TypeError("this exception refuses to be pickled")


def test_error_record_round_trip_rebuilds_the_original_type():
    try:
        failing_user_function()
    except ValueError as exc:
        record = errors.error_record(exc)
    code, message, tb_text, blob = record
    assert code == "remote"
    assert message == "ValueError: bad input 42"
    assert "failing_user_function" in tb_text and "ValueError: bad input 42" in tb_text
    assert isinstance(blob, bytes)
    # the record crosses the wire as msgpack
    record = msgpack.unpackb(msgpack.packb(record, use_bin_type=True), raw=False)
    exc = errors.exception_from_record(record)
    assert type(exc) is ValueError and exc.args == ("bad input 42",)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert exc.__cause__.text == tb_text
    assert "failing_user_function" in str(exc.__cause__)


def test_unpicklable_exception_falls_back_to_remote_error():
    exc = _raised(UnpicklableError("no pickles here"))
    record = errors.error_record(exc)
    assert record[3] is None
    rebuilt = errors.exception_from_record(record)
    assert isinstance(rebuilt, RemoteError)
    assert rebuilt.remote_type == "UnpicklableError"
    assert str(rebuilt) == "UnpicklableError: no pickles here"
    assert "UnpicklableError" in rebuilt.traceback_text and "_raised" in rebuilt.traceback_text
    assert isinstance(rebuilt.__cause__, RemoteTraceback)
    assert rebuilt.__cause__.text == rebuilt.traceback_text


def test_blob_that_does_not_load_falls_back_to_remote_error():
    rebuilt = errors.exception_from_record(["remote", "KeyError: 'k'", "Traceback ...", b"junk"])
    assert isinstance(rebuilt, RemoteError) and rebuilt.remote_type == "KeyError"
    import dill

    not_an_exception = dill.dumps({"a": 1})
    rebuilt = errors.exception_from_record(["remote", "Odd: x", "tb", not_an_exception])
    assert isinstance(rebuilt, RemoteError) and str(rebuilt) == "Odd: x"


@pytest.mark.parametrize(
    "code, cls",
    [
        ("worker-lost", WorkerLost),
        ("task-timeout", TaskTimeout),
        ("payload-too-large", PayloadTooLarge),
        ("unknown-endpoint", UnknownEndpoint),
        ("lost", TaskLost),
        ("cancelled", TaskCancelled),
        ("serialization", SerializationError),
        ("version-mismatch", VersionMismatch),
        ("protocol", ProtocolError),
    ],
)
def test_infra_codes_map_to_typed_errors(code, cls):
    record = errors.infra_error(code, f"what happened to {code}")
    assert record == [code, f"what happened to {code}", "", None]
    exc = errors.exception_from_record(record)
    assert type(exc) is cls
    assert str(exc) == f"what happened to {code}"
    assert exc.__cause__ is None


def test_every_dlhub_error_code_is_registered():
    codes = {cls.code for cls in errors.ERROR_TYPES.values()}
    assert codes == set(errors.ERROR_TYPES)
    assert "remote" not in errors.ERROR_TYPES


def test_dlhub_error_raised_in_user_code_keeps_its_code():
    record = errors.error_record(_raised(WorkerLost("gone")))
    assert record[0] == "worker-lost" and record[3] is not None
    exc = errors.exception_from_record(record)
    assert type(exc) is WorkerLost and isinstance(exc.__cause__, RemoteTraceback)


def test_payload_too_large_message():
    exc = PayloadTooLarge(300_000_000, 268_435_456, "arguments")
    assert str(exc) == "arguments of 300,000,000 bytes exceeds the limit of 268,435,456 bytes"
    assert (exc.size, exc.limit) == (300_000_000, 268_435_456)


def test_remote_traceback_renders_the_text():
    text = "".join(traceback.format_stack(sys._getframe()))
    assert text in str(RemoteTraceback(text))


@pytest.mark.parametrize("other", ["3.12.1", "3.10.14"])
def test_a_function_from_another_python_minor_fails_before_it_runs(other):
    """Even when its dill bytes would load, and even with usable source: bytecode does not move
    between minor versions (issue 12: an image's Python against the submitter's). Its dill bytes
    load here (same interpreter), so only the version check can refuse it."""
    record = _code_record(serialize_function(module_level_square))
    record.update(python=other)
    with pytest.raises(VersionMismatch) as info:
        load_function(_code_blob(record))
    text = str(info.value)
    here = runtime_versions()["python"]
    assert f"serialized with Python {other}" in text and f"this worker has Python {here}" in text
    assert "module_level_square" in text


def test_a_function_from_another_patch_release_loads():
    major, minor, _ = runtime_versions()["python"].split(".")
    record = _code_record(serialize_function(module_level_square))
    record.update(python=f"{major}.{minor}.0")  # 3.11.7 here, 3.11.2 in Debian's image: same bytecode
    assert load_function(_code_blob(record))(6) == 36


def test_start_worker_image_is_checked():
    assert m.unpack(m.pack(m.StartWorker("w1", None))).image is None
    with pytest.raises(ProtocolError, match="StartWorker.image"):
        m.unpack(m.pack(m.StartWorker("w1", "")))
    with pytest.raises(ProtocolError, match="StartWorker.image"):
        m.unpack(body(m.StartWorker.TYPE, "w1", 7))


@pytest.mark.parametrize(
    "info, ids",
    [
        ({"uncacheable": ["00" * 16, "ff" * 16]}, {bytes(16), b"\xff" * 16}),
        ({"uncacheable": ["zz" * 16, "00" * 15, 7, None, "00" * 16]}, {bytes(16)}),  # the valid one only
        ({"uncacheable": "00" * 16}, set()),
        ({}, set()),
        (None, set()),
        ([], set()),
    ],
)
def test_uncacheable_ids_take_only_well_formed_task_ids(info, ids):
    assert m.uncacheable_ids(info) == frozenset(ids)
