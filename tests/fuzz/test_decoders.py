"""Hypothesis on every decoder of what crosses a trust boundary (issue 10, tests and figures).

Each decoder gets arbitrary bytes and, more usefully, structurally valid input with wrong
contents (msgpack of the right shape with wrong types, records one field off, configs with one
key replaced). The contract: it returns, or raises only its documented error type with a message,
never anything else (a TypeError out of ``unpack`` would take down the loop that reads frames).
The ``check_*`` validators never raise at all: they return what is wrong, or None.
"""

from __future__ import annotations

import copy
import os

import fuzzkit  # noqa: F401  (hypothesis' profile for the fuzz suite)
import msgpack
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from dlhub.endpoint.config import ConfigError, load_config, parse_config
from dlhub.protocol import ProtocolError
from dlhub.protocol import messages as m
from dlhub.protocol.curve import check_key, split_tcp
from dlhub.protocol.errors import SerializationError, exception_from_record
from dlhub.protocol.policy import Policy
from dlhub.protocol.serialize import DILL, PICKLE5, deserialize, method_of
from dlhub.protocol.servable import (
    PACKAGE_HEADER,
    RecordError,
    check_visibility,
    pack_package,
    parse_record,
    parse_ref,
    unpack_package,
)

# ---- values: what msgpack (and YAML) can carry ---------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
keys = st.one_of(st.text(max_size=12), st.integers(-5, 5), st.binary(max_size=4))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=20,
)
task_ids = st.one_of(st.binary(min_size=m.TASK_ID_BYTES, max_size=m.TASK_ID_BYTES), values)


def _near(good: list, pool=values):
    """``good`` with some of its items replaced by arbitrary values (and maybe cut or extended)."""

    @st.composite
    def build(draw):
        rec = list(good)
        for i in draw(st.lists(st.integers(0, len(rec) - 1), max_size=3)):
            rec[i] = draw(pool)
        cut = draw(st.integers(0, len(rec) + 2))
        return rec[:cut] if cut <= len(rec) else rec + [draw(pool) for _ in range(cut - len(rec))]

    return build()


GOOD_TASK = m.task_record(os.urandom(16), "ab" * 32, b"\x01\x90", 5.0, "auto", {"cores": 1}, {}, None)
GOOD_ORIGIN = {"user": "alice", "admin": False, "groups": ["chem"], "owner": "bob"}
GOOD_RESULT = m.result_record(os.urandom(16), "succeeded", b"x", None, [1.0, 2.0], ["out", "err"])
origins = st.one_of(
    values,
    st.dictionaries(st.sampled_from([*m.ORIGIN_KEYS, "other"]), values, max_size=5),
    st.fixed_dictionaries(
        {"user": st.text(max_size=8)},
        optional={
            "admin": st.booleans(),
            "groups": st.lists(st.text(max_size=5), max_size=3),
            "owner": st.text(max_size=8),
        },
    ),
)


def _frame(body) -> bytes:
    return bytes([m.PROTOCOL_VERSION]) + msgpack.packb(body, use_bin_type=True)


def _unpack_or_protocol_error(frame: bytes) -> m.Message | None:
    try:
        msg = m.unpack(frame)
    except ProtocolError as exc:
        assert str(exc)
        return None
    assert type(msg) in m._REGISTRY.values()
    return msg


# ---- messages.unpack ---------------------------------------------------------------------------


@given(st.binary(max_size=200))
def test_unpack_arbitrary_bytes(frame):
    _unpack_or_protocol_error(frame)
    _unpack_or_protocol_error(bytes([m.PROTOCOL_VERSION]) + frame)


@given(st.sampled_from(sorted(m._REGISTRY)), st.lists(values, max_size=8))
def test_unpack_valid_envelope_wrong_fields(code, fields):
    """The right version byte and a known type code, with fields of any type and count."""
    _unpack_or_protocol_error(_frame([code, *fields]))


@st.composite
def near_messages(draw):
    """A real message of each type whose fields are replaced one at a time by wrong values;
    Submit/Tasks/Results carry task or result records that are one field off."""
    cls = draw(st.sampled_from(list(m._REGISTRY.values())))
    body = [cls.TYPE]
    for types in cls._TYPES:
        if types[0] is list:
            good = GOOD_RESULT if cls is m.Results else GOOD_TASK
            body.append(draw(st.lists(st.one_of(_near(good), values), max_size=3)))
        else:
            sample = {str: "x", int: 1, bytes: b"x", dict: {}, bool: True, float: 1.0}[types[0]]
            body.append(draw(st.one_of(st.just(sample), values)))
    return cls, body


@given(near_messages())
def test_unpack_near_valid_messages(case):
    cls, body = case
    msg = _unpack_or_protocol_error(_frame(body))
    if msg is not None:  # what unpack lets through is what the handlers may rely on
        assert isinstance(msg, cls)
        for rec in getattr(msg, "tasks", ()) if cls in (m.Submit, m.Tasks) else ():
            assert len(rec) == m.TASK_FIELDS and isinstance(rec[m.T_ID], bytes)
            assert isinstance(rec[m.T_FUNCTION], str) and isinstance(rec[m.T_PAYLOAD], bytes)
        for rec in msg.results if cls is m.Results else ():
            assert len(rec) == m.RESULT_FIELDS and isinstance(rec[m.R_STATE], str)


@given(st.binary(min_size=1, max_size=60), st.integers(1, 59))
def test_unpack_truncated_frames(tail, cut):
    """A real frame cut short anywhere, or with garbage after it."""
    frame = m.pack(m.Submit("local", [list(GOOD_TASK)]))
    _unpack_or_protocol_error(frame[: min(cut, len(frame) - 1)])
    _unpack_or_protocol_error(frame + tail)


def test_unpack_huge_declared_counts_and_deep_nesting():
    """msgpack headers that promise 2**32-1 items, and nesting deeper than msgpack allows."""
    for header in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"):
        _unpack_or_protocol_error(bytes([m.PROTOCOL_VERSION]) + header + b"\x00" * 8)
        _unpack_or_protocol_error(bytes([m.PROTOCOL_VERSION, 0x92, 4]) + header)
    deep = b"\x91" * 100_000 + b"\xc0"
    _unpack_or_protocol_error(bytes([m.PROTOCOL_VERSION]) + deep)
    _unpack_or_protocol_error(_frame([m.Submit.TYPE, "local", [list(GOOD_TASK)] * 50_000]))


# ---- per-record and per-field checks: they return a problem, never raise --------------------


@given(_near(GOOD_TASK))
def test_task_record_checks(rec):
    for i, origin in enumerate((rec[m.T_ORIGIN],) if len(rec) > m.T_ORIGIN else ()):
        assert m.check_origin(origin) is None or isinstance(m.check_origin(origin), str), i
    if len(rec) > m.T_RESOURCES:
        assert m.check_resources(rec[m.T_RESOURCES]) is None or True
    if len(rec) > m.T_OPTIONS:
        assert m.check_options(rec[m.T_OPTIONS]) is None or True
    _unpack_or_protocol_error(_frame([m.Submit.TYPE, "local", [rec]]))


@given(origins, st.sampled_from(["ab" * 32, "servable:" + "cd" * 32, "verify:x", ""]))
def test_origin_check_and_policy(origin, function):
    """The 8th task field: whatever check_origin accepts, every policy can judge without raising."""
    problem = m.check_origin(origin)
    assert problem is None or isinstance(problem, str)
    rec = list(GOOD_TASK)
    rec[m.T_ORIGIN] = origin
    msg = _unpack_or_protocol_error(_frame([m.Tasks.TYPE, [rec], {}, []]))
    assert (msg is None) == (origin is not None and problem is not None)
    if problem is None or origin is None:
        for policy in (
            Policy("ep", "alice"),
            Policy("ep", None, ["*"], ["chem"], False, ["bob"]),
            Policy("ep", "carol", [], [], True, ["*"]),
        ):
            why = policy.refusal(origin, function)
            assert why is None or isinstance(why, str)


@given(st.one_of(values, st.dictionaries(st.sampled_from([*m.RESOURCE_KEYS, *m.OPTION_KEYS]), values)))
def test_resources_and_options_checks(value):
    for check in (m.check_resources, m.check_options):
        problem = check(value)
        assert problem is None or isinstance(problem, str)


@given(_near(GOOD_RESULT))
def test_result_record_checks(rec):
    """What check_result accepts, the client can turn into a value or an exception."""
    msg = _unpack_or_protocol_error(_frame([m.Results.TYPE, [rec], {}]))
    if msg is None:
        return
    res = msg.results[0]
    problem = m.check_result(res)
    assert problem is None or isinstance(problem, str)
    if problem is None and res[m.R_ERROR] is not None:
        assert isinstance(exception_from_record(res[m.R_ERROR]), BaseException)


@given(
    st.lists(st.one_of(values, st.text(max_size=10), st.binary(max_size=8)), min_size=2, max_size=4),
)
def test_error_records_the_manager_accepts_rebuild(error):
    """An error of 2 to 4 items passes check_result; the client must rebuild each one (it runs
    on the Executor's I/O thread: an exception there would strand every future)."""
    error = [str(error[0]), str(error[1]), *error[2:]]
    if len(error) > 2 and not isinstance(error[2], (str, type(None))):
        error[2] = None
    if len(error) > 3:
        error[3] = None  # a blob is unpickled by design (the caller's own endpoint sent it)
    rec = m.result_record(os.urandom(16), "failed", None, error)
    assert m.check_result(rec) is None
    assert isinstance(exception_from_record(error), BaseException)


heartbeat_like = st.recursive(
    st.one_of(scalars, st.integers(min_value=-(2**70), max_value=2**70)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(list(m.HEARTBEAT_FIELDS)), keys), inner, max_size=5),
    ),
    max_leaves=30,
)


@given(heartbeat_like)
def test_heartbeat_and_pool_info_checks(info):
    """Heartbeat info that passes the check is plain JSON (what /api/v1/metrics encodes)."""
    import json

    for check in (m.check_heartbeat_info, m.check_pool_info):
        problem = check(info)
        assert problem is None or isinstance(problem, str)
    if m.check_heartbeat_info(info) is None:
        json.dumps(info, allow_nan=True)
    assert m.check_plain_data(info, "x") is None or isinstance(m.check_plain_data(info, "x"), str)


# ---- serialize headers, servable records and packages --------------------------------------


@given(st.binary(max_size=100).filter(lambda b: not b or b[0] not in (DILL, PICKLE5)))
def test_deserialize_headers(buf):
    """Every header but dill's and pickle5's (which unpickle, by design, only on the caller's side)."""
    try:
        deserialize(buf)
    except SerializationError as exc:
        assert str(exc)
    assert isinstance(method_of(buf), str)


GOOD_RECORD = {
    "name": "fuzzed",
    "title": "A fuzzed servable",
    "authors": ["Doe, Jane"],
    "domains": ["testing"],
    "entry_point": "main:run",
    "files": {"main.py": "ab" * 32},
    "requirements": ["numpy>=1"],
}


@st.composite
def near_records(draw):
    record = copy.deepcopy(GOOD_RECORD)
    if draw(st.booleans()):
        try:
            record = parse_record(record).model_dump(mode="json")
        except RecordError:
            pass
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.one_of(st.sampled_from([*record, "schema_version", "batching"]), keys))
        record[key] = draw(
            st.one_of(values, st.lists(st.text(max_size=30), max_size=3), st.dictionaries(st.text(), values))
        )
    return record


@given(st.one_of(near_records(), values))
def test_parse_record(record):
    try:
        parse_record(record)
    except RecordError as exc:
        assert str(exc)


@given(st.one_of(st.binary(max_size=80), near_records().map(lambda r: pack_package(r, {}, []))))
def test_unpack_package(blob):
    for candidate in (blob, bytes([PACKAGE_HEADER]) + blob):
        try:
            unpack_package(candidate)
        except RecordError as exc:
            assert str(exc)


@given(st.text(max_size=60), values)
def test_refs_visibility_keys_addresses(text, value):
    for call, arg in ((parse_ref, text), (check_visibility, value)):
        try:
            call(arg)
        except RecordError as exc:
            assert str(exc)
    try:
        check_key(text)
    except ValueError as exc:
        assert "CURVE public key" in str(exc)
    assert split_tcp(text) is None or isinstance(split_tcp(text)[1], int)


# ---- protocol/policy.py and endpoint/config.py ---------------------------------------------


@given(
    st.one_of(
        values,
        st.dictionaries(
            st.sampled_from(
                ["allowed_users", "allowed_groups", "functions_by_value", "allowed_servable_owners", "x"]
            ),
            st.one_of(values, st.lists(st.text(max_size=6), max_size=3)),
        ),
    ),
    st.one_of(st.none(), st.text(max_size=6)),
    origins,
)
def test_policy_from_wire(data, owner, origin):
    try:
        policy = Policy.from_wire("ep", data, owner)
    except ValueError as exc:
        assert str(exc)
        return
    assert isinstance(policy.describe(), str) and isinstance(policy.to_wire(), dict)
    if m.check_origin(origin) is None:
        assert policy.refusal(origin, "ab" * 32) is None or True


GOOD_CONFIG = {
    "name": "hpc-login_1",
    "manager": {"address": "tcp://127.0.0.1:5581", "token": "dlh_secret", "key": "a" * 40},
    "provider": {"type": "slurm", "partition": "debug", "walltime": "00:10:00", "max_blocks": 2},
    "pool": {"workers_per_node": 4},
    "pools": {"gpu": {"provider": {"type": "local"}, "pool": {"workers_per_node": 1}}},
    "batching": {"max_batch_size": 8},
    "policy": {"allowed_users": ["alice"], "allowed_groups": ["chem"], "functions_by_value": False},
}
yamlish = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=15), st.just("00:10:00")
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=15,
)


def _paths(data, prefix=()):
    for key, value in data.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


CONFIG_PATHS = list(_paths(GOOD_CONFIG))


@st.composite
def near_configs(draw):
    config = copy.deepcopy(GOOD_CONFIG)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(CONFIG_PATHS))
        target = config
        for key in path[:-1]:
            target = target.get(key) if isinstance(target.get(key), dict) else None
            if target is None:
                break
        if target is None:
            continue
        if draw(st.booleans()):
            target[path[-1]] = draw(yamlish)
        else:
            target[draw(st.text(max_size=10))] = draw(yamlish)
    return config


@given(st.one_of(near_configs(), st.dictionaries(st.text(max_size=10), yamlish, max_size=6)))
def test_parse_endpoint_config(data):
    try:
        parse_config(data)
    except ConfigError as exc:
        assert str(exc).startswith("invalid endpoint config")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-config") / "config.yaml"


@given(st.one_of(near_configs().map(yaml.safe_dump), st.text(max_size=200)))
def test_load_endpoint_config_text(config_path, text):
    """What a user's editor leaves in config.yaml: any text, or a config one key off."""
    config_path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_config(config_path)
    except ConfigError as exc:
        assert str(exc)
