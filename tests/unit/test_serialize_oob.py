"""The pickle5 layout of dlhub.protocol.serialize: numpy arrays out of band, zero-copy on decode.

What goes out of band is what pickle protocol 5 hands to ``buffer_callback``: numpy arrays that are
C- or Fortran-contiguous (and raw ``PickleBuffer`` objects). ``bytes`` and ``bytearray`` are always
in-band (plain data goes to msgpack anyway). Below ``OOB_MIN_BYTES`` the old 0x02 bytes are kept.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import dill
import msgpack
import numpy as np
import pytest

from dlhub.protocol import serialize as ser
from dlhub.protocol.errors import SerializationError
from dlhub.protocol.serialize import (
    OOB_ALIGN,
    OOB_MIN_BYTES,
    PICKLE5,
    deserialize,
    method_of,
    serialize,
)

BIG = OOB_MIN_BYTES // 8 * 4  # float64 elements: 4x the threshold


def layout(buf: bytes) -> tuple[bytes, list[int], list[int]]:
    """(pickle stream, buffer sizes, buffer offsets) read by hand from a pickle5 payload."""
    assert buf[0] == PICKLE5
    (n,) = struct.unpack_from("<I", buf, 1)
    stream, sizes = msgpack.unpackb(buf[5 : 5 + n], raw=False)
    offsets, end = [], 5 + n
    for size in sizes:
        start = end + (-end % OOB_ALIGN)
        offsets.append(start)
        end = start + size
    return stream, sizes, offsets


def same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


# ---- round trips --------------------------------------------------------------------------------

STRUCTURED = np.zeros(BIG // 2, dtype=[("id", "<i4"), ("x", "<f8"), ("tag", "S3")])
STRUCTURED["id"] = np.arange(len(STRUCTURED))
STRUCTURED["tag"] = b"abc"

ARRAYS = {
    "float64": (np.random.default_rng(1).random(BIG), "pickle5"),
    "int8": (np.arange(OOB_MIN_BYTES * 3, dtype=np.int64).astype(np.int8), "pickle5"),
    "structured": (STRUCTURED, "pickle5"),
    "2-d": (np.arange(BIG, dtype=np.float32).reshape(-1, 64), "pickle5"),
    "fortran": (np.asfortranarray(np.random.default_rng(2).random((300, 200))), "pickle5"),
    "0-d": (np.array(2.5), "dill"),
    "empty": (np.zeros((0, 3)), "dill"),
    "strided": (np.arange(BIG * 2, dtype=np.float64)[::3], "dill"),  # not contiguous: in-band
    "object": (np.array([{"a": 1}, None, "x"] * 10_000, dtype=object), "dill"),  # no buffer
}


@pytest.mark.parametrize("method", ["auto", "dill"])
@pytest.mark.parametrize("name", list(ARRAYS))
def test_array_round_trips(name: str, method: str) -> None:
    arr, expected = ARRAYS[name]
    buf = serialize(arr, method)
    assert method_of(buf) == expected
    back = deserialize(buf)
    if arr.dtype.hasobject:
        assert back.tolist() == arr.tolist()
    else:
        same(back, arr)
    assert back.flags.writeable
    if name == "fortran":
        assert back.flags.f_contiguous and not back.flags.c_contiguous


def test_dict_of_arrays_and_plain_values() -> None:
    a, b = np.arange(BIG, dtype=np.float64), np.ones((BIG, 2), dtype=np.int16)
    small = np.arange(5)
    value = {"a": a, "again": a, "nested": [b, 3, "x", None], "t": (1.5, small), "s": {1, 2}}
    buf = serialize(value)
    assert method_of(buf) == "pickle5"
    _, sizes, _ = layout(buf)
    assert sizes == [a.nbytes, b.nbytes]  # the repeated array once, by reference; small in-band
    back = deserialize(buf)
    same(back["a"], a)
    same(back["nested"][0], b)
    same(back["t"][1], small)
    assert back["again"] is back["a"]
    assert back["nested"][1:] == [3, "x", None] and back["t"][0] == 1.5 and back["s"] == {1, 2}


def test_bytes_and_bytearray_are_in_band() -> None:
    """Protocol 5 sends only PickleBuffer-aware objects out of band: not bytes, not bytearray."""
    data = bytes(range(256)) * 4096  # 1 MiB
    assert method_of(serialize(data)) == "msgpack"
    assert method_of(serialize(data, "dill")) == "dill"
    assert deserialize(serialize(data, "dill")) == data
    assert method_of(serialize(bytearray(data))) == "msgpack"  # as bin: it comes back as bytes
    buf = serialize(bytearray(data), "dill")
    assert method_of(buf) == "dill" and deserialize(buf) == bytearray(data)
    for value in (data, bytearray(data)):
        buffers: list[pickle.PickleBuffer] = []
        pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        assert buffers == []
    assert buf == b"\x02" + dill.dumps(bytearray(data), protocol=5)


def test_a_raw_pickle_buffer_goes_out_of_band() -> None:
    data = bytearray(b"z" * (OOB_MIN_BYTES + 1))
    buf = serialize(pickle.PickleBuffer(data))
    assert method_of(buf) == "pickle5"
    assert deserialize(buf) == data  # from bytes: the copied bytearray itself


def test_a_read_only_array_comes_back_read_only_as_in_band() -> None:
    arr = np.ones(BIG)
    arr.flags.writeable = False
    assert not deserialize(serialize(arr)).flags.writeable
    assert not deserialize(bytearray(serialize(arr))).flags.writeable
    small = np.ones(4)
    small.flags.writeable = False
    assert not deserialize(serialize(small)).flags.writeable  # the same in-band


def test_a_test_function_closing_over_a_big_array_goes_through_dill() -> None:
    big = np.arange(BIG, dtype=np.float64)

    def total(scale: float) -> float:
        return float(big.sum() * scale)

    buf = serialize(total)
    assert method_of(buf) == "pickle5"
    stream, sizes, _ = layout(buf)
    assert b"dill" in stream and sizes == [big.nbytes] and len(stream) < 4096
    fn = deserialize(bytearray(buf))
    assert fn(2.0) == total(2.0)
    assert deserialize(serialize(total, "dill"))(1.0) == total(1.0)


def test_a_plain_pickle_stream_loads_without_dill(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = serialize({"x": np.ones(BIG)})

    def no_dill() -> None:
        raise AssertionError("dill was asked for")

    monkeypatch.setattr(ser, "_dill", no_dill)
    same(deserialize(buf)["x"], np.ones(BIG))


# ---- small values do not change -----------------------------------------------------------------


def _closure() -> Any:
    arr = np.arange(10)
    return lambda: arr


SMALL = {
    "tuple": (1, 2),
    "array": np.arange(10),
    "dict of arrays": {"a": np.ones(100), "b": np.zeros((3, 3), dtype=np.int8)},
    "just under": np.ones(OOB_MIN_BYTES // 8 - 1),
    "two halves": [np.ones(OOB_MIN_BYTES // 16), np.ones(OOB_MIN_BYTES // 16 - 1)],
    "strided": np.arange(BIG * 2)[::2],
    "complex": complex(1, 2),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_small_values_keep_the_old_bytes(name: str) -> None:
    value = SMALL[name]
    assert serialize(value) == b"\x02" + pickle.dumps(value, protocol=5)
    assert serialize(value, "dill") == b"\x02" + dill.dumps(value, protocol=5)


def test_a_small_closure_keeps_the_old_dill_bytes() -> None:
    fn = _closure()
    assert serialize(fn) == b"\x02" + dill.dumps(fn, protocol=5)
    assert deserialize(serialize(fn))().tolist() == list(range(10))
    offset = 3
    plain = lambda x: x + offset  # noqa: E731 - a closure without arrays: dill's bytes as they were
    assert serialize(plain) == b"\x02" + dill.dumps(plain, protocol=5)
    assert serialize(plain, "dill") == b"\x02" + dill.dumps(plain, protocol=5)


def test_the_threshold_is_per_buffer() -> None:
    """auto decides each array as pickle meets it (one pass): only large ones go apart."""
    assert method_of(serialize(np.ones(OOB_MIN_BYTES // 8))) == "pickle5"
    assert method_of(serialize(np.ones(OOB_MIN_BYTES // 8 - 1))) == "dill"
    halves = [np.ones(OOB_MIN_BYTES // 16), np.ones(OOB_MIN_BYTES // 16)]
    assert serialize(halves) == b"\x02" + pickle.dumps(halves, protocol=5)  # in-band, as before
    mixed = [np.ones(8), np.ones(OOB_MIN_BYTES // 8)]
    buf = serialize(mixed)
    _, sizes, _ = layout(buf)
    assert method_of(buf) == "pickle5" and sizes == [OOB_MIN_BYTES]  # the small one in the stream
    for back, arr in zip(deserialize(buf), mixed):
        same(back, arr)


def test_main_is_looked_for_in_the_stream_only() -> None:
    """An array whose bytes spell __main__ is data: it stays with plain pickle."""
    arr = np.frombuffer(b"__main__" * (OOB_MIN_BYTES // 8), dtype=np.uint8).copy()
    buf = serialize(arr)
    stream, _, _ = layout(buf)
    assert b"dill" not in stream
    same(deserialize(buf), arr)


# ---- zero-copy, writability, alignment ----------------------------------------------------------


def test_from_writable_memory_the_array_shares_it() -> None:
    arr = np.arange(BIG, dtype=np.float64)
    for buf in (bytearray(serialize(arr)), memoryview(bytearray(serialize(arr)))):
        back = deserialize(buf)
        raw = np.frombuffer(buf, dtype=np.uint8)
        assert back.flags.writeable and np.shares_memory(back, raw)
        back[0] = 42.0  # writing through lands in the payload
        _, _, (offset,) = layout(bytes(buf))
        assert struct.unpack_from("<d", buf, offset) == (42.0,)


def test_from_read_only_memory_the_array_is_a_writable_copy() -> None:
    arr = np.arange(BIG, dtype=np.float64)
    payload = serialize(arr)
    for buf in (payload, memoryview(payload)):
        back = deserialize(buf)
        assert back.flags.writeable
        assert not np.shares_memory(back, np.frombuffer(payload, dtype=np.uint8))
        back[0] = 42.0
        same(deserialize(payload), arr)  # the payload itself is untouched


def test_a_memoryview_of_another_format_is_read_as_bytes() -> None:
    payload = bytearray(serialize(np.ones(BIG)))
    view = memoryview(payload).cast("b")
    same(deserialize(view), np.ones(BIG))


def test_buffers_are_aligned_and_padded_with_zeros() -> None:
    arrays = [
        np.arange(OOB_MIN_BYTES + 1, dtype=np.int8),
        np.ones(BIG + 3),
        np.zeros(OOB_MIN_BYTES // 2 + 7, np.int16),
    ]
    buf = serialize(arrays)
    stream, sizes, offsets = layout(buf)
    assert sizes == [a.nbytes for a in arrays]
    assert all(o % OOB_ALIGN == 0 for o in offsets) and len(buf) % OOB_ALIGN == 0
    assert len(buf) == offsets[-1] + sizes[-1] + (-(offsets[-1] + sizes[-1]) % OOB_ALIGN)
    end = 5 + struct.unpack_from("<I", buf, 1)[0]
    for arr, offset, size in zip(arrays, offsets, sizes):
        assert buf[offset : offset + size] == arr.tobytes()
        assert set(buf[end:offset]) <= {0}  # the padding before it
        end = offset + size
    assert set(buf[end:]) <= {0}
    back = deserialize(bytearray(buf))
    for a, b in zip(back, arrays):
        same(a, b)
        assert a.ctypes.data % 8 == 0 or a.itemsize == 1


# ---- malformed payloads -------------------------------------------------------------------------


def _payload() -> bytes:
    return serialize([np.ones(BIG), np.arange(BIG, dtype=np.int32)])


def _with_meta(meta: bytes, tail: bytes = b"") -> bytes:
    return bytes([PICKLE5]) + struct.pack("<I", len(meta)) + meta + tail


def test_truncated_at_each_region_says_so() -> None:
    buf = _payload()
    _, sizes, offsets = layout(buf)
    meta_end = 5 + struct.unpack_from("<I", buf, 1)[0]
    cuts = {
        "header": 3,
        "meta": meta_end - 10,
        "padding before buffer 0": meta_end + 1 if offsets[0] > meta_end + 1 else None,
        "buffer 0": offsets[0] + sizes[0] // 2,
        "buffer 1": offsets[1] + 100,
        "last padding": len(buf) - 1 if len(buf) > offsets[1] + sizes[1] else None,
    }
    for region, cut in cuts.items():
        if cut is None:
            continue
        for data in (buf[:cut], bytearray(buf[:cut])):
            with pytest.raises(SerializationError, match="pickle5 buffer (is .*)?truncated") as info:
                deserialize(data)
            assert str(info.value), region
    with pytest.raises(SerializationError, match=r"buffer 0 of 2 .* runs past the end"):
        deserialize(buf[: offsets[0] + 10])
    with pytest.raises(SerializationError, match="shorter than its 5-byte header"):
        deserialize(buf[:1])


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(SerializationError, match="trailing bytes"):
        deserialize(_payload() + b"\0" * OOB_ALIGN)


def test_a_meta_length_past_the_end_is_refused() -> None:
    buf = bytearray(_payload())
    buf[1:5] = struct.pack("<I", 0xFFFFFFFF)
    with pytest.raises(SerializationError, match=r"names a 4,294,967,295-byte meta"):
        deserialize(buf)


@pytest.mark.parametrize(
    "meta",
    [
        msgpack.packb({"stream": b"x", "sizes": []}),
        msgpack.packb(7),
        msgpack.packb([b"x"]),
        msgpack.packb(["not bin", []]),
        msgpack.packb([b"x", [-1]]),
        msgpack.packb([b"x", ["10"]]),
        msgpack.packb([b"x", [], "extra"]),
    ],
    ids=["dict", "int", "one item", "str stream", "negative size", "str size", "three items"],
)
def test_a_meta_of_the_wrong_shape_is_refused(meta: bytes) -> None:
    with pytest.raises(SerializationError, match=r"pickle5 meta is not \[pickle stream"):
        deserialize(_with_meta(meta, bytes(-(5 + len(meta)) % OOB_ALIGN)))


def test_a_meta_that_is_not_msgpack_is_refused() -> None:
    with pytest.raises(SerializationError, match="pickle5 meta is not msgpack"):
        deserialize(_with_meta(b"\xc1\xc1\xc1"))
    with pytest.raises(SerializationError, match="pickle5 meta is not msgpack"):
        deserialize(_with_meta(msgpack.packb([b"x", []]) + b"\x00"))  # extra data in it


def test_a_bad_stream_or_too_few_buffers_is_a_serialization_error() -> None:
    meta = msgpack.packb([b"not a pickle", []], use_bin_type=True)
    with pytest.raises(SerializationError, match="cannot deserialize pickle5 buffer"):
        deserialize(_with_meta(meta, bytes(-(5 + len(meta)) % OOB_ALIGN)))
    stream, _, _ = layout(_payload())
    meta = msgpack.packb([stream, []], use_bin_type=True)  # the stream wants two buffers
    with pytest.raises(SerializationError, match="cannot deserialize pickle5 buffer"):
        deserialize(_with_meta(meta, bytes(-(5 + len(meta)) % OOB_ALIGN)))


def test_method_of_names_it() -> None:
    assert method_of(_payload()) == "pickle5"
    assert ser.METHOD_IDS["pickle5"] == PICKLE5 == 0x04


# ---- timing (printed, not asserted) -------------------------------------------------------------
