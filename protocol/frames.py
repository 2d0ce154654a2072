"""Payload frames: a task's or result's payload of 64 KiB or more travels as a ZeroMQ frame of its own.

Why: no copies of large payloads between the client and the worker (issue 15 item 1). Such a
payload is not packed into the msgpack body: its place in the record holds an ``ExtType``
placeholder (ext 1, the index of its frame among the payload frames as a little-endian u32), and
the payload itself is sent with ``copy=False`` after the header frame. The receiver reads those
frames without copying (:func:`recv_rest`) and decoding turns each placeholder into a writable
memoryview of its frame (:class:`_PayloadFrames`), checking that every frame stands in a payload
and nowhere else. This module holds the primitives that need no message class and imports nothing
of :mod:`.messages`; ``pack_frames``, ``send_message`` and ``unpack`` live there (they need the
message registry) and everything here is re-exported from there.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import ProtocolError

OOB_MIN_BYTES = 64 * 1024  # a task's or result's payload at least this large gets its own frame
_OOB_EXT = 1  # msgpack ext type in a payload's place: "this payload is frame 1 + i"
_RCVMORE = 13  # zmq.RCVMORE (this module does not import zmq)
_SNDMORE = 2  # zmq.SNDMORE


def split_payloads(records: Any, pos: int) -> tuple[Any, list | None]:
    """``records`` with each payload (at ``pos``) of at least :data:`OOB_MIN_BYTES` replaced by
    its placeholder, and those payloads in order: ``(records, None)`` when there are none (the
    records as they were, not copied), else ``(new list, payloads)``."""
    extra: list | None = None
    for i, rec in enumerate(records):
        payload = rec[pos]
        if payload is not None and len(payload) >= OOB_MIN_BYTES:
            if extra is None:
                extra, records = [], list(records)
            ext = msgpack.ExtType(_OOB_EXT, len(extra).to_bytes(4, "little"))
            records[i] = (*rec[:pos], ext, *rec[pos + 1 :])
            extra.append(payload)
    return records, extra


def send_frames(sock: Any, frames: list, flags: int = 0) -> None:
    """``sock.send_multipart(frames, flags, copy=False)`` without its per-call costs, which
    show on every hop of a small call: pyzmq checks each frame's buffer interface and builds
    ``SNDMORE | flags`` as an enum per frame; here the flags are plain ints, and the frames are
    ours (bytes, memoryviews, ``zmq.Frame``s)."""
    flags = int(flags)
    more = flags | _SNDMORE
    send = sock.send
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        send(frame, more if i < last else flags, copy=False)


def recv_frames(sock: Any, flags: int = 0) -> list:
    """Every frame of the next message as ``zmq.Frame``s (no copies), like
    ``sock.recv_multipart(flags, copy=False)`` without its per-frame cost: pyzmq's version reads
    ``RCVMORE`` through ``Socket.get`` for each frame (an enum lookup each); a ``Frame`` received
    without copying already carries it (``Frame.more``): 1.2 against 2.7 us a message here."""
    frame = sock.recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(flags, copy=False)
        frames.append(frame)
    return frames


def recv_rest(sock: Any) -> list:
    """The frames after the first of the message being read from ``sock`` (none for a
    one-frame message), without copying them: payload frames of ``messages.pack_frames``."""
    return sock.recv_multipart(copy=False) if sock.get(_RCVMORE) else []


class _PayloadFrames:
    """msgpack's ext hook while decoding a message that came with payload frames: each
    placeholder becomes a memoryview of its frame (used once); :meth:`check` then makes sure
    every frame stands in a task's or result's payload and nowhere else."""

    def __init__(self, extra: Any):
        self.views = [memoryview(x.buffer if hasattr(x, "buffer") else x) for x in extra]
        self.used = [False] * len(self.views)

    def __call__(self, code: int, data: bytes) -> memoryview:
        i = int.from_bytes(data, "little") if code == _OOB_EXT and len(data) == 4 else -1
        if not 0 <= i < len(self.views) or self.used[i]:
            raise ProtocolError(
                f"payload placeholder (ext {code}) names no unused frame of {len(self.views)}"
            )
        self.used[i] = True
        return self.views[i]

    def check(self, cls: type, values: list, where: tuple[int, int] | None) -> None:
        """``where``: (field index, payload position) of the records of ``cls`` that may hold
        payload frames, None when its messages carry none."""
        if where is None:
            raise ProtocolError(f"{cls.__name__} carries no payload frames")
        if not all(self.used):
            raise ProtocolError(
                f"{self.used.count(False)} of {len(self.views)} payload frames are not referenced"
            )
        index, pos = where
        records = values[index] if index < len(values) else []
        placed = sum(1 for r in records if type(r) is list and len(r) > pos and type(r[pos]) is memoryview)
        if placed != len(self.views):
            raise ProtocolError("payload frames may stand only in task or result payloads")


def _no_frames(code: int, data: bytes) -> Any:
    raise ProtocolError(f"ext type {code} in a message without payload frames")


def check_size(frame: bytes | memoryview, max_bytes: int, extra: Any) -> _PayloadFrames | None:
    """Refuse an empty first frame, or a message (with its payload frames ``extra``) over
    ``max_bytes``; the ext hook for its payload frames (None: it came without any)."""
    size = len(frame)
    if size == 0:
        raise ProtocolError("empty frame")
    frames = _PayloadFrames(extra) if extra else None
    if frames is not None:
        size += sum(v.nbytes for v in frames.views)
    if size > max_bytes:
        what = "frame" if frames is None else "message"
        raise ProtocolError(f"{what} of {size:,} bytes exceeds the limit of {max_bytes:,} bytes")
    return frames
