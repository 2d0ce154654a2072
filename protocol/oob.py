"""The pickle5 payload (method byte 0x04 of :mod:`.serialize`): numpy arrays out of band.

Why: arrays travel without copies (issue 15 item 1). Pickle protocol 5 hands each large buffer to
``buffer_callback`` instead of copying it into the stream; the stream and the buffers are laid side
by side, so encoding copies the data once and decoding not at all. :mod:`.serialize` picks this
method and dispatches to it; this module holds the layout, its encoder (stdlib pickle's buffers,
and a dill Pickler whose ``reducer_override`` lets exact ndarrays go out of band) and the checked
reading of a payload. It imports nothing of :mod:`.serialize` (which imports it).

The layout (offsets from the method byte; integers little-endian)::

    0      0x04
    1      u32 N: length of the meta
    5      meta, N bytes of msgpack: [pickle stream (bin), [size0, size1, ...]]
    ...    zero padding to the next multiple of 64
    o0     buffer 0, size0 bytes, then zero padding to the next multiple of 64
    o1     buffer 1, ...                         (every o_i % 64 == 0)
    end    the payload ends at the padding after the last buffer (a multiple of 64)

The stream is a protocol-5 pickle (``pickle`` or dill, read back with dill when it names dill)
whose ``NEXT_BUFFER`` opcodes take the buffers in order. :func:`.serialize.deserialize` hands them
to the unpickler as slices of its input, so a numpy array shares the memory of a writable input (a
bytearray, a writable memoryview of a ZeroMQ frame); from a read-only one (bytes) each buffer is
copied into a bytearray, so arrays always come back writable, as they did in-band.
"""

from __future__ import annotations

import functools
import pickle
import struct
import sys
from typing import Any

import msgpack

from .errors import SerializationError

PICKLE5 = 0x04
_H_PICKLE5 = bytes([PICKLE5])

# A buffer (a numpy array's data) smaller than this stays in the pickle stream: the 0x02 bytes of
# before, unchanged, and no header or padding for a small array; a value with none larger is 0x02.
OOB_MIN_BYTES = 64 * 1024
OOB_ALIGN = 64  # each buffer starts at a multiple of this from the method byte (cache lines, SIMD)
_META_LEN = struct.Struct("<I")
_OOB_HEADER = 1 + _META_LEN.size


def _dill():
    import dill  # imported lazily: a plain-data client never pays for it

    return dill


def _aligned(offset: int) -> int:
    return offset + (-offset % OOB_ALIGN)


def _out_of_band(stream: bytes, buffers: list[pickle.PickleBuffer]) -> bytes | None:
    """The pickle5 payload of ``stream`` and its buffers, built with one copy of their bytes; None
    to stay in-band (buffers under :data:`OOB_MIN_BYTES`, or one that is not contiguous)."""
    if not buffers:
        return None
    try:
        views = [b.raw() for b in buffers]  # 1-d bytes; BufferError when not contiguous
    except BufferError:
        return None
    if sum(v.nbytes for v in views) < OOB_MIN_BYTES:
        return None
    meta = msgpack.packb([stream, [v.nbytes for v in views]], use_bin_type=True)
    if len(meta) > 0xFFFFFFFF:
        return None
    parts: list[bytes | memoryview] = [_H_PICKLE5, _META_LEN.pack(len(meta)), meta]
    end = _OOB_HEADER + len(meta)
    for view in views:
        parts.append(bytes(_aligned(end) - end))
        parts.append(view)
        end = _aligned(end) + view.nbytes
    parts.append(bytes(_aligned(end) - end))
    return b"".join(parts)


@functools.lru_cache(maxsize=1)
def _dill_pickler() -> type:
    """A dill Pickler that lets numpy arrays go out of band.

    dill saves every ndarray through ``ndarray.__reduce__``, which copies the data into the stream
    whatever the protocol; an exact ndarray here takes numpy's protocol-5 reduction instead (a
    PickleBuffer when contiguous, ``__reduce__`` otherwise). Subclasses keep dill's way, which also
    carries their ``__dict__``. ``arrays`` counts the arrays that went this way.
    """

    class OutOfBandPickler(_dill().Pickler):
        arrays = 0

        def reducer_override(self, obj: Any) -> Any:
            numpy = sys.modules.get("numpy")
            if numpy is not None and type(obj) is numpy.ndarray:
                self.arrays += 1
                return obj.__reduce_ex__(self.proto)
            return NotImplemented

    return OutOfBandPickler


def _dill_out_of_band(obj: Any, in_band: bytes) -> bytes | None:
    """``obj`` by dill (its default settings, as ``dill.dumps``) with the arrays out of band: the
    pickle5 payload, the 0x02 one (``in_band``, the caller's 0x02 byte, then the stream) when
    nothing went another way than dill's own, or None where dill's own in-band bytes must be made
    (small arrays; an error, which that pass then reports)."""
    import io

    buffers: list[pickle.PickleBuffer] = []
    file = io.BytesIO()
    pickler = _dill_pickler()(file, 5, buffer_callback=buffers.append)
    try:
        pickler.dump(obj)
    except Exception:
        return None
    stream = file.getvalue()
    if not buffers and not pickler.arrays:
        return in_band + stream  # byte for byte what dill.dumps gives
    return _out_of_band(stream, buffers)


def _out_of_band_parts(
    buf: bytes | bytearray | memoryview,
) -> tuple[bytes, list[memoryview] | list[bytearray]]:
    """The pickle stream and the buffers of a pickle5 payload, every length checked against it.

    The buffers are slices of a writable ``buf`` (the arrays share its memory); of a read-only one
    they are bytearray copies, so that the arrays are writable either way. A stream that mentions
    dill (its loader functions live in ``dill._dill``) is for dill's loads; stdlib pickle's is
    faster and needs no import of dill.
    """
    try:
        view = memoryview(buf).cast("B")
    except TypeError as exc:
        raise SerializationError(f"pickle5 buffer is not contiguous bytes: {exc}") from None
    total = view.nbytes
    if total < _OOB_HEADER:
        raise SerializationError(
            f"pickle5 buffer truncated: {total} bytes, shorter than its {_OOB_HEADER}-byte header"
        )
    (meta_len,) = _META_LEN.unpack_from(view, 1)
    offset = _OOB_HEADER + meta_len
    if offset > total:
        raise SerializationError(
            f"pickle5 buffer truncated: its header names a {meta_len:,}-byte meta, "
            f"{total - _OOB_HEADER:,} bytes follow"
        )
    try:
        meta = msgpack.unpackb(view[_OOB_HEADER:offset], raw=False)
    except Exception as exc:
        raise SerializationError(f"pickle5 meta is not msgpack: {type(exc).__name__}: {exc}") from None
    if not (
        type(meta) is list
        and len(meta) == 2
        and type(meta[0]) is bytes
        and type(meta[1]) is list
        and all(type(n) is int and n >= 0 for n in meta[1])
    ):
        raise SerializationError(
            "pickle5 meta is not [pickle stream (bin), [buffer sizes (non-negative ints)]]: "
            f"{type(meta).__name__} {_short(meta)}"
        )
    stream, sizes = meta
    spans = []
    for i, size in enumerate(sizes):
        start = _aligned(offset)
        offset = start + size
        if offset > total:
            raise SerializationError(
                f"pickle5 buffer truncated: buffer {i} of {len(sizes)} ({size:,} bytes at offset "
                f"{start:,}) runs past the end of the {total:,}-byte payload"
            )
        spans.append((start, offset))
    if _aligned(offset) != total:
        raise SerializationError(
            f"pickle5 buffer is {total:,} bytes, its meta describes {_aligned(offset):,} "
            f"({'truncated' if total < _aligned(offset) else 'trailing bytes'})"
        )
    if view.readonly:
        return stream, [bytearray(view[a:b]) for a, b in spans]
    return stream, [view[a:b] for a, b in spans]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
