"""Versioned wire messages: frozen dataclasses packed with msgpack behind a version byte.

A frame is ``bytes([PROTOCOL_VERSION]) + msgpack([type_code, field, field, ...])``. Every link
(client-manager, endpoint-manager, worker/pool-endpoint) speaks the same message set; each
process accepts the subset that makes sense for its role and answers the rest with ``Refused``.

Per-task records inside batches are arrays on the wire, so that a batch of thousands of tasks
costs one C-level msgpack call per hop; in memory they are the NamedTuples :class:`TaskRecord`
and :class:`ResultRecord` (``unpack`` makes them, msgpack packs them as the same arrays):

    task   = [task_id: bytes(16), function: str (code digest), payload: bytes,
              timeout_s: float | None, result_serializer: str, resources: dict | None,
              options: dict | None, origin: dict | None]
              (options: cache, key, len, batch; origin: who submitted it and what it runs,
              set by the manager for the endpoint's policy: user, admin, groups, owner of the
              servable; 6- and 7-field tasks from older peers read as options/origin = None)
    result = [task_id, state: str, payload: bytes | None, error: list | None,
              timing: [t_start, t_end] | None, output: [stdout, stderr] | None]

``unpack`` checks the version byte, the size, the type code, the arity and the type of every
top-level field, the shape of each task/result record and of every list of task ids, raising
:class:`ProtocolError` with what was wrong. It never lets a malformed frame crash a loop.
The fields of a result record an endpoint sends are checked by :func:`check_result`; the
checks of heartbeat and pool info live in :mod:`.reports` and are re-exported here.
The primitives of large payloads' own frames (placeholders, :func:`recv_rest`, the size check)
live in :mod:`.frames`, also re-exported here; :func:`pack_frames` and :func:`unpack` use them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import msgpack

from .errors import ProtocolError
from .frames import (  # noqa: F401 (re-exported: callers use m.recv_rest, m.OOB_MIN_BYTES)
    _OOB_EXT,
    _RCVMORE,
    OOB_MIN_BYTES,
    _no_frames,
    _PayloadFrames,
    check_size,
    recv_frames,
    recv_rest,
    send_frames,
    split_payloads,
)
from .reports import (  # noqa: F401 (re-exported: callers use m.check_heartbeat_info etc.)
    HEARTBEAT_FIELDS,
    check_heartbeat_info,
    check_plain_data,
    check_pool_info,
)

PROTOCOL_VERSION = 1
_VERSION_BYTE = bytes([PROTOCOL_VERSION])
DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024 + 1024 * 1024  # payload limit plus headroom

TASK_ID_BYTES = 16

# task record field positions
T_ID, T_FUNCTION, T_PAYLOAD, T_TIMEOUT, T_SERIALIZER, T_RESOURCES, T_OPTIONS, T_ORIGIN = range(8)
TASK_FIELDS = 8
OLDEST_TASK_FIELDS = 6  # before per-call options (7) and the submitter's origin (8)
# per-call options: cache (False bypasses result/output caches), key (hex digest of the inputs,
# computed by the client), len (the first argument's length, for batching weights), batch (the
# first argument is a list of inputs for a vectorized servable: an explicit client batch), out
# (outputs by reference: [upload URL, upload grant] to store a returned File at the manager, or
# "endpoint" to leave it in the endpoint's data cache; absent: left there, no grant came)
OPTION_KEYS = {"cache": (bool,), "key": (str,), "len": (int,), "batch": (bool,), "out": (list, str)}
# a task's origin, written by the manager (what a client sends there is replaced): the submitter,
# whether an admin, its groups, and the owner of the servable it runs (absent: a function by value)
ORIGIN_KEYS = {"user": (str,), "admin": (bool,), "groups": (list,), "owner": (str,)}
_ORIGIN_KEY_SET = frozenset(ORIGIN_KEYS)
RESOURCE_KEYS = {"cores": (int, float), "memory_gb": (int, float), "gpus": (int,), "pool": (str,)}
# result record field positions
R_ID, R_STATE, R_PAYLOAD, R_ERROR, R_TIMING, R_OUTPUT = range(6)
RESULT_FIELDS = 6


class TaskRecord(NamedTuple):
    """One task: indexable by the ``T_*`` positions, or by name (``rec.function``). Immutable:
    a changed task is a new record (``rec._replace(origin=...)``) put where the old one was."""

    id: bytes
    function: str  # a code digest, or REF_PREFIX/RUN_PREFIX/VERIFY_PREFIX + name
    payload: bytes  # or a memoryview of the frame it came in (large payloads: pack_frames)
    timeout: float | None
    serializer: str
    resources: dict | None
    options: dict | None = None
    origin: dict | None = None


class ResultRecord(NamedTuple):
    """One task's outcome: indexable by the ``R_*`` positions, or by name (``res.state``)."""

    id: bytes
    state: str
    payload: bytes | None = None
    error: list | None = None
    timing: list | None = None
    output: list | None = None


_new_tuple = tuple.__new__  # TaskRecord(*fields) without the argument parsing: for the codec


def as_task_record(rec: Any) -> TaskRecord:
    """``rec`` as a TaskRecord: a list (or tuple) of 6 to 8 fields, the missing ones None."""
    if type(rec) is TaskRecord:
        return rec
    if not OLDEST_TASK_FIELDS <= len(rec) <= TASK_FIELDS:
        raise ValueError(f"a task record has {OLDEST_TASK_FIELDS} to {TASK_FIELDS} fields, got {len(rec)}")
    return _new_tuple(TaskRecord, (*rec, *(None,) * (TASK_FIELDS - len(rec))))


def with_origin(rec: TaskRecord, origin: dict | None) -> TaskRecord:
    """``rec._replace(origin=origin)`` at a quarter of its cost (it is on every task's path)."""
    return _new_tuple(TaskRecord, rec[:T_ORIGIN] + (origin,))


def as_result_record(res: Any) -> ResultRecord:
    """``res`` (a list or tuple of 6 fields) as a ResultRecord."""
    if type(res) is ResultRecord:
        return res
    if len(res) != RESULT_FIELDS:
        raise ValueError(f"a result record has {RESULT_FIELDS} fields, got {len(res)}")
    return _new_tuple(ResultRecord, res)


TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "lost"})
# per-servable counters: what workers report (their first four) and what the endpoint adds
WORKER_SERVABLE_KEYS = ("loads", "evictions", "output_cache_hits", "output_cache_misses")
SERVABLE_STATS_KEYS = (*WORKER_SERVABLE_KEYS, "batches", "batched_calls")
TASK_STATES = (
    "received",
    "queued",
    "dispatched",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "lost",
)

_REGISTRY: dict[int, type[Message]] = {}


# Task function names that are not code digests: a published servable by reference (client ->
# manager), and the package the manager resolved it to (manager -> endpoint -> worker).
REF_PREFIX, RUN_PREFIX, VERIFY_PREFIX = "ref:", "servable:", "verify:"


def package_key(function: str) -> str | None:
    """The servable record digest a task's function names, or None for plain functions."""
    for prefix in (RUN_PREFIX, VERIFY_PREFIX):
        if function.startswith(prefix):
            return function[len(prefix) :]
    return None


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[int] = 0
    _FIELDS: ClassVar[tuple[str, ...]] = ()
    _TYPES: ClassVar[tuple[tuple[type, ...], ...]] = ()
    _REQUIRED: ClassVar[tuple[str, ...]] = ()  # fields without a default (older peers may omit the rest)

    def pack(self) -> bytes:
        return pack(self)


def _message(code: int):
    """Register a dataclass as message type ``code`` and precompute its field layout."""

    def wrap(cls):
        cls = dataclass(frozen=True, slots=True)(cls)
        cls.TYPE = code
        fields = dataclasses.fields(cls)
        cls._FIELDS = tuple(f.name for f in fields)
        cls._TYPES = tuple(_TYPE_MAP[f.type] for f in fields)
        cls._REQUIRED = tuple(
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if code in _REGISTRY:
            raise RuntimeError(f"message code {code} registered twice")
        _REGISTRY[code] = cls
        return cls

    return wrap


_TYPE_MAP: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bytes": (bytes,),
    "list": (list,),
    "dict": (dict,),
    "bool": (bool,),
    "float": (float, int),
    "str | None": (str, type(None)),
    "bytes | None": (bytes, type(None)),
}


@_message(1)
class Hello(Message):
    """First message on every link: who I am, my token, my versions."""

    role: str  # "client" | "endpoint" | "pool" | "worker"
    name: str  # endpoint name, or pool/worker id
    token: str
    session: str  # random per process; lets the receiver spot a restarted peer
    versions: dict = field(default_factory=dict)  # python, dill, dlhub, protocol
    info: dict = field(default_factory=dict)


@_message(2)
class Welcome(Message):
    session: str
    info: dict = field(default_factory=dict)


@_message(3)
class Refused(Message):
    """The peer is refused (bad token, unknown session, wrong role): code + message."""

    code: str
    message: str


@_message(4)
class Submit(Message):
    """Client -> manager: tasks for one endpoint."""

    endpoint: str
    tasks: list


@_message(5)
class Accepted(Message):
    """Committed: the receiver may forget these tasks (or results) from its resend buffer."""

    task_ids: list


@_message(6)
class Tasks(Message):
    """Manager -> endpoint, endpoint -> worker. ``code`` maps digest -> blob for workers;
    ``batches`` lists groups of task ids a worker runs as one call of a vectorized servable."""

    tasks: list
    code: dict = field(default_factory=dict)
    batches: list = field(default_factory=list)


@_message(7)
class Results(Message):
    """``info``: what a worker reports beside results (warm loads, evictions, cache counts);
    from a worker and from an endpoint, ``uncacheable``: hex ids of tasks whose result names an
    output stored for their caller (:func:`uncacheable_ids`)."""

    results: list
    info: dict = field(default_factory=dict)


def uncacheable_ids(info: Any) -> frozenset:
    """The task ids a ``Results.info["uncacheable"]`` names (hex strings): results that name an
    output stored for their caller, which another caller could not download, so the manager
    neither caches them nor gives them to identical calls. Anything malformed names none."""
    flagged = info.get("uncacheable") if isinstance(info, dict) else None
    if not isinstance(flagged, list):
        return frozenset()
    ids = set()
    for tid in flagged:
        if isinstance(tid, str) and len(tid) == 2 * TASK_ID_BYTES:
            try:
                ids.add(bytes.fromhex(tid))
            except ValueError:
                continue
    return frozenset(ids)


@_message(8)
class Cancel(Message):
    task_ids: list


@_message(9)
class CancelRefused(Message):
    """These tasks could not be cancelled (already running or finished)."""

    task_ids: list
    reason: str


@_message(10)
class States(Message):
    """Progress updates: ``[[task_id, state, timestamp], ...]``."""

    updates: list


@_message(11)
class PutCode(Message):
    """Client -> manager: a function's code blob, stored under its digest."""

    digest: str
    blob: bytes


@_message(12)
class CodeRequest(Message):
    digests: list


@_message(13)
class Code(Message):
    """Reply to CodeRequest: digest -> blob (missing digests are absent)."""

    blobs: dict


@_message(14)
class Heartbeat(Message):
    info: dict = field(default_factory=dict)


@_message(15)
class Query(Message):
    """Ask for task records (state, timestamps, captured output)."""

    request_id: int
    task_ids: list


@_message(16)
class TaskInfo(Message):
    request_id: int
    records: list


@_message(17)
class Fetch(Message):
    """Ask the manager to resend the stored results of these tasks."""

    task_ids: list


@_message(18)
class StatusRequest(Message):
    request_id: int


@_message(19)
class Status(Message):
    request_id: int
    info: dict


@_message(20)
class WorkerDied(Message):
    """Pool -> endpoint: a worker process exited."""

    worker_id: str
    exitcode: int
    reason: str


@_message(21)
class Shutdown(Message):
    reason: str


@_message(22)
class KillWorker(Message):
    """Endpoint -> pool: kill this worker (its task overran its time limit and ignored SIGALRM)."""

    worker_id: str
    reason: str


@_message(23)
class StartWorker(Message):
    """Endpoint -> pool: replace this (idle) worker with one running inside ``image`` (a
    servable's image, as the endpoint resolved it: a path or an image URI the pool's runtime
    and image cache provide; None: the pool's own image). Images per servable (issue 12)."""

    worker_id: str
    image: str | None


@_message(24)
class ImageFailed(Message):
    """Pool -> endpoint: workers started inside this servable image (``StartWorker``) die as they
    start (twice in a row): the slot went back to the pool's own image, and the endpoint fails
    the servables that run in it with ``reason`` instead of asking again."""

    image: str
    reason: str


def pack(msg: Message) -> bytes:
    """Encode ``msg`` as one frame."""
    body = [msg.TYPE]
    body.extend(getattr(msg, name) for name in msg._FIELDS)
    return _VERSION_BYTE + msgpack.packb(body, use_bin_type=True)


# ---- large payloads travel as frames of their own (the primitives are in frames.py) -----------

_OOB_FIELDS = {Submit: (1, T_PAYLOAD), Tasks: (0, T_PAYLOAD), Results: (0, R_PAYLOAD)}


def pack_frames(msg: Message) -> list:
    """``msg`` as the frames of one ZeroMQ message: ``[header, payload, ...]``.

    A task's or result's payload of at least :data:`OOB_MIN_BYTES` is not copied into the msgpack
    body (two copies of 100 MB per hop: ``packb`` and the version byte's concatenation): its place
    in the record holds an ext placeholder and the payload itself (bytes, or the memoryview of the
    frame it arrived in) is a frame of its own, which ``send_multipart(..., copy=False)`` hands to
    ZeroMQ without a copy. Any other message is ``[pack(msg)]``. Receivers pass the frames after
    the first to :func:`unpack` as ``extra``."""
    where = _OOB_FIELDS.get(type(msg))
    if where is None:
        return [pack(msg)]
    index, pos = where
    records, extra = split_payloads(getattr(msg, msg._FIELDS[index]), pos)
    if extra is None:
        return [pack(msg)]
    body = [msg.TYPE]
    body.extend(getattr(msg, name) for name in msg._FIELDS)
    body[1 + index] = records
    return [_VERSION_BYTE + msgpack.packb(body, use_bin_type=True), *extra]


def send_message(sock: Any, msg: Message, flags: int = 0) -> None:
    """Send ``msg`` on a socket without a routing prefix (a DEALER): one frame with ``send``
    (cheaper than ``send_multipart`` on every small message), or its payload frames too."""
    frames = pack_frames(msg)
    if len(frames) == 1:
        sock.send(frames[0], flags, copy=False)
    else:
        send_frames(sock, frames, flags)


def unpack(frame: bytes | memoryview, max_bytes: int = DEFAULT_MAX_FRAME_BYTES, extra: Any = ()) -> Message:
    """Decode one message, or raise :class:`ProtocolError` saying what is wrong with it.

    ``frame`` is its first frame; ``extra`` the rest (``zmq.Frame``s or bytes-like): the payloads
    :func:`pack_frames` sent out of band, which become memoryviews of those frames, not copies."""
    frames = check_size(frame, max_bytes, extra)
    version = frame[0]
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} not supported (this side speaks {PROTOCOL_VERSION}); "
            "upgrade the older side"
        )
    try:
        body = msgpack.unpackb(
            frame[1:], raw=False, strict_map_key=False, use_list=True, ext_hook=frames or _no_frames
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed or truncated frame: {exc}") from None
    if not isinstance(body, list) or not body or not isinstance(body[0], int):
        raise ProtocolError("frame body is not a [type, fields...] list")
    cls = _REGISTRY.get(body[0])
    if cls is None:
        raise ProtocolError(f"unknown message type {body[0]}")
    values = body[1:]
    if len(values) != len(cls._FIELDS) and not len(cls._REQUIRED) <= len(values) < len(cls._FIELDS):
        raise ProtocolError(f"{cls.__name__} expects {len(cls._FIELDS)} fields, got {len(values)}")
    for name, value, types in zip(cls._FIELDS, values, cls._TYPES):  # missing trailing: defaults
        if not isinstance(value, types):
            raise ProtocolError(
                f"{cls.__name__}.{name} must be {' or '.join(t.__name__ for t in types)}, "
                f"got {type(value).__name__}"
            )
    if frames is not None:
        frames.check(cls, values, _OOB_FIELDS.get(cls))
    msg = cls(*values)
    _check_message(cls, msg)
    return msg


def _check_message(cls: type, msg: Message) -> None:
    """The per-type checks of what is inside a decoded message's fields."""
    if cls is Submit or cls is Tasks:
        _check_tasks(msg.tasks)
        if cls is Tasks:
            _check_tasks_extras(msg)
    elif cls is Results:
        _check_results(msg.results)
    elif cls in _ID_LISTS:  # ids are dict keys and are echoed back: a malformed one must not pass
        _check_ids(msg.task_ids, f"{cls.__name__}.task_ids")
    elif cls is States:
        for i, update in enumerate(msg.updates):
            if not (
                type(update) is list
                and len(update) == 3
                and type(update[0]) is bytes
                and len(update[0]) == TASK_ID_BYTES
                and type(update[1]) is str
                and isinstance(update[2], (int, float))
            ):
                raise ProtocolError(f"States update #{i} must be [task_id, state, timestamp]")
    elif cls is CodeRequest:
        if not all(type(d) is str for d in msg.digests):
            raise ProtocolError("CodeRequest.digests must be a list of str")
    elif cls is Code:
        _check_code(msg.blobs, "Code.blobs")
    elif cls is StartWorker and msg.image is not None and not (0 < len(msg.image) <= 4096):
        raise ProtocolError("StartWorker.image must be a non-empty image reference (at most 4096 chars)")


def _check_ids(ids: list, where: str) -> None:
    if not all(type(t) is bytes and len(t) == TASK_ID_BYTES for t in ids):
        raise ProtocolError(f"{where} must be a list of {TASK_ID_BYTES}-byte task ids")


def _check_code(code: dict, where: str) -> None:
    if not all(type(k) is str and type(v) is bytes for k, v in code.items()):
        raise ProtocolError(f"{where} must map digests (str) to blobs (bytes)")


def _check_tasks_extras(msg: Tasks) -> None:
    _check_code(msg.code, "Tasks.code")
    for batch in msg.batches:
        if type(batch) is not list:
            raise ProtocolError("Tasks.batches must be a list of lists of task ids")
        _check_ids(batch, "Tasks.batches")


_ID_LISTS = frozenset({Accepted, Cancel, CancelRefused, Query, Fetch})


def _check_tasks(records: list) -> None:
    """Check each task record (padding old 6/7-field ones) and make it a TaskRecord, in place:
    what the decoder hands on is typed."""
    new, cls, task_id_bytes = _new_tuple, TaskRecord, TASK_ID_BYTES
    for i, rec in enumerate(records):
        if type(rec) is not list or len(rec) != TASK_FIELDS:
            if isinstance(rec, list) and OLDEST_TASK_FIELDS <= len(rec) < TASK_FIELDS:
                rec.extend([None] * (TASK_FIELDS - len(rec)))  # from before per-call options / origins
            else:
                raise ProtocolError(f"task #{i} must be a list of {TASK_FIELDS} fields")
        tid, function, payload, timeout, _, resources, options, origin = rec
        if type(tid) is not bytes or len(tid) != task_id_bytes:
            raise ProtocolError(f"task #{i} has a malformed task id")
        if not isinstance(function, str) or not isinstance(payload, (bytes, memoryview)):
            raise ProtocolError(f"task #{i} needs a function digest (str) and payload (bytes)")
        if timeout is not None and not isinstance(timeout, (int, float)):
            raise ProtocolError(f"task #{i} timeout_s must be a number or nil")
        if resources is not None:
            problem = check_resources(resources)
            if problem:
                raise ProtocolError(f"task #{i} resources: {problem}")
        if options is not None:
            problem = check_options(options)
            if problem:
                raise ProtocolError(f"task #{i} options: {problem}")
        if origin is not None:
            problem = check_origin(origin)
            if problem:
                raise ProtocolError(f"task #{i} origin: {problem}")
        records[i] = new(cls, rec)


def _check_results(records: list) -> None:
    """Check each result record's shape and make it a ResultRecord, in place (what is in its
    fields is :func:`check_result`'s job, where results are taken in)."""
    new, cls, task_id_bytes = _new_tuple, ResultRecord, TASK_ID_BYTES
    for i, rec in enumerate(records):
        if type(rec) is not list or len(rec) != RESULT_FIELDS:
            raise ProtocolError(f"result #{i} must be a list of {RESULT_FIELDS} fields")
        tid, state = rec[0], rec[1]
        if type(tid) is not bytes or len(tid) != task_id_bytes:
            raise ProtocolError(f"result #{i} has a malformed task id")
        if not isinstance(state, str):
            raise ProtocolError(f"result #{i} state must be a string")
        records[i] = new(cls, rec)


def check_resources(resources: Any) -> str | None:
    """What is wrong with a resource request (None when it is fine)."""
    if not isinstance(resources, dict):
        return f"must be a mapping, got {type(resources).__name__}"
    for key, value in resources.items():
        types = RESOURCE_KEYS.get(key)
        if types is None:
            return f"unknown key {key!r} (known: {', '.join(RESOURCE_KEYS)})"
        if not isinstance(value, types) or isinstance(value, bool):
            return f"{key} must be {' or '.join(t.__name__ for t in types)}, got {value!r}"
        if not isinstance(value, str) and value < 0:
            return f"{key} must not be negative, got {value!r}"
    return None


def check_options(options: Any) -> str | None:
    """What is wrong with a task's options (None when they are fine)."""
    if not isinstance(options, dict):
        return f"must be a mapping, got {type(options).__name__}"
    for key, value in options.items():
        types = OPTION_KEYS.get(key)
        if types is None:
            return f"unknown key {key!r} (known: {', '.join(OPTION_KEYS)})"
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            return f"{key} must be {' or '.join(t.__name__ for t in types)}, got {value!r}"
    return None


def check_origin(origin: Any) -> str | None:
    """What is wrong with a task's origin (None when it is fine)."""
    if type(origin) is dict and type(origin.get("user")) is str and type(origin.get("admin", False)) is bool:
        groups = origin.get("groups", ())
        if (  # the common shape, checked without a loop over its keys (it is on every task)
            origin.keys() <= _ORIGIN_KEY_SET
            and type(origin.get("owner", "")) is str
            and (groups == () or (type(groups) is list and all(type(g) is str for g in groups)))
        ):
            return None
    if not isinstance(origin, dict):
        return f"must be a mapping, got {type(origin).__name__}"
    for key, value in origin.items():
        types = ORIGIN_KEYS.get(key)
        if types is None:
            return f"unknown key {key!r} (known: {', '.join(ORIGIN_KEYS)})"
        if not isinstance(value, types):
            return f"{key} must be {' or '.join(t.__name__ for t in types)}, got {value!r}"
    if not isinstance(origin.get("user"), str):
        return "user is required"
    if not all(isinstance(g, str) for g in origin.get("groups", ())):
        return "groups must be a list of str"
    return None


def task_origin(rec: TaskRecord | list) -> dict | None:
    """Who submitted a task and what it runs (None: a record from before origins)."""
    return rec[T_ORIGIN] if len(rec) > T_ORIGIN else None


def task_options(rec: TaskRecord | list) -> dict:
    """A task's options ({} when it has none)."""
    return (rec[T_OPTIONS] if len(rec) > T_OPTIONS else None) or {}


def task_record(
    task_id: bytes,
    function: str,
    payload: bytes,
    timeout_s: float | None = None,
    result_serializer: str = "auto",
    resources: dict | None = None,
    options: dict | None = None,
    origin: dict | None = None,
) -> TaskRecord:
    return _new_tuple(
        TaskRecord, (task_id, function, payload, timeout_s, result_serializer, resources, options, origin)
    )


def result_record(
    task_id: bytes,
    state: str,
    payload: bytes | None = None,
    error: list | None = None,
    timing: list | None = None,
    output: list | None = None,
) -> ResultRecord:
    return _new_tuple(ResultRecord, (task_id, state, payload, error, timing, output))


# ---- validation of the result records an endpoint sends (the manager trusts none of it) -----
# (what endpoints and pools report in their heartbeats is checked in reports.py)


def check_result(rec: ResultRecord | list) -> str | None:
    """What is wrong with one result record whose task id already checked out (None when fine):
    a terminal state, bytes or nil payload, an error ``[code, message, traceback, blob]``,
    timing ``[start, end]`` numbers, output ``[stdout, stderr]`` strings."""
    state, payload, error, timing, output = rec[R_STATE : R_OUTPUT + 1]
    if state not in TERMINAL_STATES:
        return f"state must be one of {', '.join(sorted(TERMINAL_STATES))}, got {state!r}"
    if payload is not None and not isinstance(payload, (bytes, memoryview)):
        return f"payload must be bytes or nil, got {type(payload).__name__}"
    if error is not None:
        if not isinstance(error, list) or not 2 <= len(error) <= 4:
            return "error must be a list [code, message, traceback, blob]"
        if not isinstance(error[0], str) or not isinstance(error[1], str):
            return "error code and message must be strings"
        if len(error) > 2 and error[2] is not None and not isinstance(error[2], str):
            return "error traceback must be a string or nil"
        if len(error) > 3 and error[3] is not None and not isinstance(error[3], bytes):
            return "error blob must be bytes or nil"
    for name, value, types in (("timing", timing, (int, float)), ("output", output, (str,))):
        if value is None:
            continue
        if not isinstance(value, list) or len(value) != 2:
            return f"{name} must be a list of two items or nil"
        for item in value:
            if item is not None and (not isinstance(item, types) or isinstance(item, bool)):
                return f"{name} items must be {' or '.join(t.__name__ for t in types)} or nil, got {item!r}"
    return None
