"""dlhub's own Globus Compute payload codec (protocol/gc_serialize.py, which the worker uses
without globus-compute-sdk) against the SDK's real ComputeSerializer."""

from __future__ import annotations

import uuid

import pytest
from globus_compute_sdk.serialize import (
    ComputeSerializer,
    DillCode,
    DillCodeSource,
    DillCodeTextInspect,
    DillDataBase64,
    JSONData,
    PureSourceDill,
    PureSourceTextInspect,
)

from dlhub.protocol import gc_serialize as gc
from dlhub.protocol.errors import SerializationError


def cube(x, power=3):
    return x**power


DATA = [0, -7, 3.5, "text", None, [1, [2, {"a": (3, 4)}]], {"k": b"bytes", 5: {1, 2}}]


@pytest.mark.parametrize("value", DATA)
def test_dill_data_round_trips_both_ways(value):
    sdk = ComputeSerializer()
    assert gc.deserialize(sdk.serialize(value)) == value
    assert sdk.deserialize(gc.serialize_result(value)) == value  # what get_result decodes


def test_json_data():
    sdk = ComputeSerializer(strategy_data=JSONData())
    assert gc.deserialize(sdk.serialize({"a": [1, 2]})) == {"a": [1, 2]}


CODE_STRATEGIES = [
    DillCode(),
    DillCodeSource(),
    DillCodeTextInspect(),
    PureSourceTextInspect(),
    PureSourceDill(),
]


@pytest.mark.parametrize("strategy", CODE_STRATEGIES)
def test_function_code_and_payload_as_the_client_packs_them(strategy):
    sdk = ComputeSerializer(strategy_code=strategy)
    function_code = sdk.pack_buffers([sdk.serialize(cube)])  # Client.register_function
    payload = sdk.pack_buffers([sdk.serialize((2,)), sdk.serialize({"power": 5})])  # Batch.add
    fn = gc.load_function(gc.code_blob(function_code))
    args, kwargs = gc.load_arguments(payload.encode())
    assert (args, kwargs) == ([2], {"power": 5})
    assert fn(*args, **kwargs) == 32


def test_pack_buffers_matches_the_sdk():
    buffers = ["00\nabc", "11\n[1]", "st\nf:def f(): pass\n", ""]
    packed = ComputeSerializer.pack_buffers(buffers)
    assert gc.pack_buffers(buffers) == packed
    assert gc.unpack_buffers(packed) == buffers == ComputeSerializer.unpack_buffers(packed)


def test_malformed_input_is_a_serialization_error():
    with pytest.raises(SerializationError):
        gc.unpack_buffers("99\nshort")
    with pytest.raises(SerializationError):
        gc.deserialize("zz\nnot a strategy")
    with pytest.raises(SerializationError):
        gc.load_arguments(ComputeSerializer.pack_buffers([DillDataBase64().serialize(1)]).encode())
    with pytest.raises(SerializationError):
        gc.serialize_result(x for x in range(3))  # dill cannot pickle a generator: a clear error


def test_code_blobs_are_told_apart_from_dlhub_code():
    from dlhub.protocol.serialize import serialize_function

    assert gc.is_code_blob(gc.code_blob("4\n01\nx"))
    assert not gc.is_code_blob(serialize_function(cube))


def test_endpoint_uuid_is_stable_uuid5():
    assert gc.endpoint_uuid("local") == str(uuid.uuid5(gc.GC_NAMESPACE, "local"))
    assert gc.endpoint_uuid("local") != gc.endpoint_uuid("local2")
