"""Globus Compute payloads, decoded and encoded by the worker without globus-compute-sdk.

The SDK's ``ComputeSerializer`` writes one text buffer per object, headed by a 3-character
strategy id, and ``pack_buffers`` joins buffers as ``"<len in characters>\\n<buffer>"``. The
formats are small and stable (dill or JSON behind base64, or source text), so the worker decodes
them itself: an endpoint needs no globus-compute-sdk (and none of its pins) to run GC tasks. Only
dill is needed, as for dlhub's own functions; like Globus Compute's own endpoint, DillCode then
needs the same Python minor (and a dill that reads the SDK's, 0.3.9) on both sides, and the
source strategies (``st``/``sd``/``03``/``04``) need neither.

In dlhub a GC function is stored as code under ``GC_CODE`` + its ``function_code`` (the packed
buffer the SDK registered), and a GC task's payload is the packed ``[args, kwargs]`` with the
task's serializer set to ``GC_SERIALIZER``; the worker returns the result as the SDK's
``DillDataBase64`` text, which the SDK's ``get_result`` deserializes. The manager never decodes
any of it.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from typing import Any

from .errors import SerializationError

GC_CODE = 0x11  # first byte of a code blob that holds a GC function_code (dlhub's own is 0x10)
GC_SERIALIZER = "gc"  # the task record's serializer for GC tasks: GC payload in, GC result out
# a fixed namespace: an endpoint's UUID is uuid5(GC_NAMESPACE, its name), the same everywhere,
# with nothing stored (a published servable's is uuid5(GC_NAMESPACE, "servable:owner/name"))
GC_NAMESPACE = uuid.UUID("5d1b0c3e-6f6c-4b0e-9a57-646c6875620a")


def endpoint_uuid(name: str) -> str:
    """The stable Globus Compute UUID of the dlhub endpoint ``name``."""
    return str(uuid.uuid5(GC_NAMESPACE, name))


def servable_uuid(owner: str, name: str) -> str:
    """The stable Globus Compute function UUID of the published servable ``owner/name`` (its latest
    ready version): ``Client.run(..., function_id=servable_uuid(...))`` calls it."""
    return str(uuid.uuid5(GC_NAMESPACE, f"servable:{owner}/{name}"))


def pack_buffers(buffers: list[str]) -> str:
    return "".join(f"{len(b)}\n{b}" for b in buffers)


def unpack_buffers(packed: str) -> list[str]:
    out = []
    while packed:
        length, rest = packed.split("\n", 1)
        n = int(length)
        if n < 0 or n > len(rest):
            raise SerializationError(f"a packed GC buffer claims {n} characters, {len(rest)} remain")
        out.append(rest[:n])
        packed = rest[n:]
    return out


def _dill():
    import dill

    return dill


def _exec_source(name: str, body: str) -> Callable[..., Any]:
    namespace: dict[str, Any] = {}
    exec(body, namespace)  # noqa: S102 - the user's own function, as GC's endpoint does
    return namespace[name]


def deserialize(buf: str) -> Any:
    """One ComputeSerializer buffer (data or code) back into its object."""
    header, _, body = buf.partition("\n")
    header += "\n"
    if header == "00\n":  # DillDataBase64
        return _dill().loads(base64.b64decode(body))
    if header == "11\n":  # JSONData
        return json.loads(body)
    if header == "01\n":  # DillCode
        return _dill().loads(base64.b64decode(body))
    if header in ("03\n", "04\n"):  # DillCodeTextInspect, DillCodeSource: (name, source)
        name, source = _dill().loads(base64.b64decode(body))
        return _exec_source(name, source)
    if header in ("st\n", "sd\n"):  # PureSourceTextInspect, PureSourceDill: name:source
        name, source = body.split(":", 1)
        return _exec_source(name, source)
    if header == "10\n":  # CombinedCode: several strategies, the first that loads wins
        errors = []
        for part in unpack_buffers(body):
            try:
                return deserialize(part)
            except Exception as exc:  # noqa: BLE001 - try the next strategy
                errors.append(f"{part[:2]}: {exc}")
        raise SerializationError("no part of a CombinedCode function loads here: " + "; ".join(errors))
    raise SerializationError(f"unknown Globus Compute serialization header {header!r}")


def serialize_result(value: Any) -> str:
    """A result as the SDK's default data strategy (DillDataBase64) writes it."""
    try:
        return "00\n" + base64.encodebytes(_dill().dumps(value)).decode()
    except Exception as exc:  # noqa: BLE001 - the worker reports it as the task's failure
        raise SerializationError(f"{type(exc).__name__}: {exc}") from exc


def code_blob(function_code: str) -> bytes:
    """The dlhub code blob of a registered GC function (stored by its sha256, once)."""
    return bytes([GC_CODE]) + function_code.encode()


def is_code_blob(blob: bytes) -> bool:
    return bool(blob) and blob[0] == GC_CODE


def load_function(blob: bytes) -> Callable[..., Any]:
    """The function of a :func:`code_blob`."""
    buffers = unpack_buffers(blob[1:].decode())
    if len(buffers) != 1:
        raise SerializationError(f"a GC function_code holds one buffer, got {len(buffers)}")
    return deserialize(buffers[0])


def load_arguments(payload: bytes) -> tuple[list, dict]:
    """A GC task payload (packed ``[args, kwargs]``) as (args, kwargs)."""
    buffers = unpack_buffers(bytes(payload).decode())
    if len(buffers) != 2:
        raise SerializationError(f"a GC task payload holds args and kwargs, got {len(buffers)} buffers")
    args, kwargs = deserialize(buffers[0]), deserialize(buffers[1])
    return list(args), dict(kwargs)
