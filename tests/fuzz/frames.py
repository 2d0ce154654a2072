"""Fuzzed frames for the manager's ZeroMQ ports (tests/fuzz/test_socket_fuzz.py).

A seeded ``random.Random`` makes each run reproducible from the seed the test prints. The mix
leans on frames that get past ``unpack`` (valid envelopes with wrong fields, records one field
off, plausible messages with junk contents), since those reach the handlers; the rest are raw
bytes, truncations, msgpack headers that promise huge counts, big frames and multipart messages.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from collections.abc import Iterator

import msgpack

from dlhub.protocol import messages as m

# frames per manager port and mode (unauthenticated, authenticated); more: DLHUB_FUZZ_FRAMES=200000
FRAMES = int(os.environ.get("DLHUB_FUZZ_FRAMES", "20000"))
V = bytes([m.PROTOCOL_VERSION])
CODES = sorted(m._REGISTRY)
STATES = [*m.TASK_STATES, "", "SUCCEEDED", "bogus"]


def value(rng: random.Random, depth: int = 0):
    """Any msgpack value, nested a little."""
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -1.5, float("nan"), float("inf"), 1e308, rng.random()])
    if kind in (4, 5):
        return rng.choice(["", "local", "x" * rng.randrange(200), "\u2603", "servable:", "ref:a/b", "../"])
    if kind in (6, 7):
        return rng.randbytes(rng.choice([0, 1, 16, 32, rng.randrange(100)]))
    if kind in (8, 9):
        return [value(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = ["user", "admin", "groups", "owner", "workers", "queued", "cores", "pool", "cache", "", 1, b"k"]
    return {rng.choice(keys): value(rng, depth + 1) for _ in range(rng.randrange(5))}


def task_id(rng: random.Random):
    return rng.randbytes(m.TASK_ID_BYTES) if rng.random() < 0.85 else value(rng)


def task_record(rng: random.Random) -> list:
    rec = list(
        m.task_record(
            rng.randbytes(16),
            rng.choice(
                [hashlib.sha256(rng.randbytes(8)).hexdigest(), "servable:" + "ab" * 32, "ref:x/y", ""]
            ),
            rng.choice([b"\x01\xc0", b"", rng.randbytes(rng.randrange(64))]),
            rng.choice([None, 1.0, -5, 1e300]),
            rng.choice(["auto", "json", "dill", "bogus"]),
            rng.choice([None, {"cores": 1}, {"gpus": -1}, {"pool": "gpu", "memory_gb": 1e9}]),
            rng.choice([None, {}, {"cache": False}, {"key": "k", "len": 3, "batch": True}]),
            rng.choice([None, {"user": "root", "admin": True}, {"user": "x", "groups": ["g"], "owner": "y"}]),
        )
    )
    for _ in range(rng.randrange(3)):
        rec[rng.randrange(len(rec))] = value(rng)
    return rec[: rng.choice([len(rec)] * 6 + [5, 6, 7, 9])]


def result_record(rng: random.Random) -> list:
    rec = list(
        m.result_record(
            task_id(rng),
            rng.choice(STATES),
            rng.choice([None, b"\x01\xc0", value(rng)]),
            rng.choice([None, ["remote", "boom"], ["remote", "boom", "tb", None], value(rng)]),
            rng.choice([None, [1.0, 2.0], [None, "x"], value(rng)]),
            rng.choice([None, ["out", "err"], [1, 2], value(rng)]),
        )
    )
    if rng.random() < 0.3:
        rec[rng.randrange(len(rec))] = value(rng)
    return rec[: rng.choice([6] * 6 + [4, 5, 7])]


def plausible(rng: random.Random, link: str) -> list:
    """A message body of a known type whose fields are mostly of the right type, with junk inside."""
    cls = rng.choice(list(m._REGISTRY.values()))
    names = {
        "tasks": lambda: [task_record(rng) for _ in range(rng.randrange(4))],
        "results": lambda: [result_record(rng) for _ in range(rng.randrange(4))],
        "updates": lambda: [
            rng.choice([[task_id(rng), rng.choice(STATES), rng.random()], value(rng)])
            for _ in range(rng.randrange(4))
        ],
        "task_ids": lambda: [task_id(rng) for _ in range(rng.randrange(6))],
        "digests": lambda: [rng.choice(["ab" * 32, "servable:" + "cd" * 32, "", value(rng)])],
        "role": lambda: rng.choice(["client", "endpoint", "pool", "worker", "check", "admin", ""]),
        "name": lambda: rng.choice(
            ["local", "fuzz-ep", "", "a" * 100, "../x", "fuzz-" + str(rng.randrange(50))]
        ),
        "token": lambda: rng.choice(["", "dlh_not-a-token", "x" * 300]),
        "info": lambda: (
            rng.choice(
                [{}, {"workers": -1}, {"queued_by_pool": {"a": "b"}}, {"pools": {"p": {"workers": 1e9}}}]
            )
            if rng.random() < 0.5
            else {str(k): value(rng) for k in range(rng.randrange(4))}
        ),
        "versions": lambda: {"protocol": rng.choice([1, 2, "1", None])},
        "request_id": lambda: rng.choice([0, -1, 2**63 - 1, rng.randrange(1000)]),
        "code": lambda: {rng.choice(["ab" * 32, ""]): rng.randbytes(8)} if cls is m.Tasks else "protocol",
        "batches": lambda: [[task_id(rng)] for _ in range(rng.randrange(3))],
        "blobs": lambda: {"ab" * 32: rng.randbytes(8)},
    }
    body: list = [cls.TYPE]
    for name, types in zip(cls._FIELDS, cls._TYPES):
        make = names.get(name)
        if make is not None and rng.random() < 0.9:
            body.append(make())
        elif rng.random() < 0.7:
            body.append({str: "x", int: 7, bytes: b"x", dict: {}, bool: True, float: 1.5, list: []}[types[0]])
        else:
            body.append(value(rng))
    if rng.random() < 0.15:
        body = body[: rng.randrange(1, len(body) + 1)] + [value(rng) for _ in range(rng.randrange(2))]
    return body


HUGE_KINDS = 8


def huge(rng: random.Random, kind: int | None = None) -> bytes:
    """Lists of 100,000 ids, a 2 MB blob, or a msgpack header that promises 4 billion items."""
    kind = rng.randrange(HUGE_KINDS) if kind is None else kind
    if kind >= 4:
        cls = [m.Query, m.Fetch, m.Cancel, m.Accepted][kind - 4]
        ids = [rng.randbytes(16)] * 100_000
        body = [cls.TYPE, *([1] if cls is m.Query else []), ids]
        return V + msgpack.packb(body, use_bin_type=True)
    if kind == 0:
        blob = rng.randbytes(2 * 1024 * 1024)
        # under a wrong digest: a valid one would be kept, by design, in the manager's code
        # cache (bounded at 256 MB), which is memory the RSS check is not about
        return m.pack(m.PutCode("ab" * 32, blob))
    if kind == 1:
        return m.pack(m.Results([m.result_record(rng.randbytes(16), "succeeded", b"x")] * 20_000))
    header = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\x7f\xff\xff\xff"])
    return V + rng.choice([b"", b"\x92\x04"]) + header + rng.randbytes(rng.randrange(16))


def frame(rng: random.Random, link: str) -> bytes:
    kind = rng.random()
    if kind < 0.08:
        return rng.randbytes(rng.randrange(200))
    if kind < 0.16:
        return V + rng.randbytes(rng.randrange(200))
    if kind < 0.24:
        whole = V + msgpack.packb(plausible(rng, link), use_bin_type=True)
        return whole[: rng.randrange(1, max(2, len(whole)))]
    if kind < 0.40:
        body = [rng.choice([*CODES, 0, 99, -1, "x"]), *(value(rng) for _ in range(rng.randrange(8)))]
        return V + msgpack.packb(body, use_bin_type=True)
    if kind < 0.999:
        return V + msgpack.packb(plausible(rng, link), use_bin_type=True)
    return huge(rng)


def _decoded_type(data: bytes) -> type | None:
    try:
        return type(m.unpack(data))
    except Exception:
        return None


def messages(seed: int, count: int, link: str) -> Iterator[list[bytes]]:
    """``count`` fuzzed messages (lists of frames) for ``link`` ("client" or "endpoint"):
    mostly one frame, sometimes two or three (the manager expects exactly one after routing)."""
    rng = random.Random(seed)
    sent = 0
    while sent < count:
        data = frame(rng, link)
        kind = _decoded_type(data)
        if kind is m.Heartbeat or (kind is m.Hello and rng.random() < 0.9):
            continue  # Heartbeats are the test's sync point; a refused Hello ends the session
        parts = [data]
        if rng.random() < 0.01:
            parts += [rng.randbytes(rng.randrange(20)) for _ in range(rng.randrange(1, 3))]
        yield parts
        sent += 1


# ---- raw TCP: what reaches a port before any ZeroMQ handshake succeeds -----------------------


def zmtp_frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body


def greeting(mechanism: bytes = b"NULL", major: int = 3) -> bytes:
    return b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([major, 0]) + mechanism.ljust(20, b"\x00") + b"\x00" * 32


READY = zmtp_frame(b"\x05READY\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER", flags=0x04)


def raw_connection(rng: random.Random, frames: int) -> bytes:
    """The bytes of one unauthenticated TCP connection carrying ``frames`` ZMTP frames of fuzz."""
    body = b"".join(zmtp_frame(frame(rng, "client")[:200]) for _ in range(frames))
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(64) + body
    if kind == 1:
        return greeting() + READY + body
    if kind == 2:
        hello = zmtp_frame(b"\x05HELLO" + rng.randbytes(194), flags=0x04)
        return greeting(b"CURVE") + hello + body
    if kind == 3:  # a frame that claims 2**62 bytes
        return greeting() + READY + b"\x02" + struct.pack(">Q", 2**62) + body
    return greeting(b"PLAIN", major=rng.choice([1, 2, 3, 9])) + body
