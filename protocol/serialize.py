"""Serializer registry for user payloads: every buffer starts with one byte naming its method.

Only the user's process and the worker call these functions; the manager and the endpoint carry
the buffers as opaque bytes. Methods:

- ``msgpack`` (0x01): plain data (None, bool, int, float, str, bytes, list, dict). Packed with
  ``strict_types`` so a tuple or a subclass falls through to dill instead of silently changing type.
- ``dill`` (0x02): anything else, pickle protocol 5 (numpy arrays are copied once, in-band).
- ``json`` (0x03): for REST callers.
- ``code`` (0x10): a function's code: dill by value plus its source text when available.

``auto`` picks msgpack when the value round-trips exactly and dill otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import pickle
import platform
import sys
import sysconfig
import textwrap
import types
from collections.abc import Callable
from typing import Any

import msgpack

from .errors import SerializationError

MSGPACK, DILL, JSON, CODE = 0x01, 0x02, 0x03, 0x10
METHOD_NAMES = {MSGPACK: "msgpack", DILL: "dill", JSON: "json", CODE: "code"}
METHOD_IDS = {name: mid for mid, name in METHOD_NAMES.items()}
_H_MSGPACK, _H_DILL, _H_JSON, _H_CODE = (bytes([m]) for m in (MSGPACK, DILL, JSON, CODE))


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=True)


def _dill():
    import dill  # imported lazily: a plain-data client never pays for it

    return dill


def serialize(obj: Any, method: str = "auto") -> bytes:
    """Encode ``obj`` with ``method`` ("auto", "msgpack", "dill" or "json")."""
    if method in ("auto", "msgpack"):
        try:
            return _H_MSGPACK + _packb(obj)
        except (TypeError, ValueError, OverflowError) as exc:
            if method == "msgpack":
                raise SerializationError(
                    f"cannot encode a {type(obj).__name__} with msgpack: {exc}"
                ) from None
    if method == "auto":
        # plain pickle is ~25x faster than dill for arrays and plain objects, and dill reads it;
        # anything that needs dill (lambdas, closures, classes of __main__) falls through
        try:
            body = pickle.dumps(obj, protocol=5)
        except Exception:
            body = None
        if body is not None and b"__main__" not in body:
            return _H_DILL + body
    if method in ("auto", "dill"):
        try:
            return _H_DILL + _dill().dumps(obj, protocol=5)
        except Exception as exc:
            raise SerializationError(
                f"cannot serialize a {type(obj).__name__}: {type(exc).__name__}: {exc}"
            ) from None
    if method == "json":
        try:
            return _H_JSON + json.dumps(obj, default=_json_default).encode()
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"result of type {type(obj).__name__} cannot be encoded as JSON: {exc}"
            ) from None
    raise SerializationError(f"unknown serializer {method!r}; use auto, msgpack, dill or json")


def plain(value: Any, str_keys: bool = False) -> Any:
    """Arrays, tensors and numpy scalars as lists and numbers, tuples as lists (dict keys as
    strings with ``str_keys``): values as JSON holds them, for records and comparisons."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and not isinstance(value, (list, tuple, dict, str, bytes)):
        return tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v, str_keys) for v in value]
    if isinstance(value, dict):
        return {(str(k) if str_keys else k): plain(v, str_keys) for k, v in value.items()}
    return value


def _json_default(obj: Any) -> Any:
    """Arrays and tensors (numpy, torch: anything with ``tolist``) become nested lists in JSON."""
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def deserialize(buf: bytes | memoryview) -> Any:
    """Decode a buffer made by :func:`serialize`."""
    if not buf:
        raise SerializationError("empty buffer")
    method, body = buf[0], buf[1:]
    try:
        if method == MSGPACK:
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        if method == DILL:
            return _dill().loads(body)
        if method == JSON:
            return json.loads(bytes(body))
    except Exception as exc:
        raise SerializationError(
            f"cannot deserialize {METHOD_NAMES[method]} buffer: {type(exc).__name__}: {exc}"
        ) from exc
    raise SerializationError(f"unknown serializer id 0x{method:02x}")


def method_of(buf: bytes) -> str:
    return METHOD_NAMES.get(buf[0], f"0x{buf[0]:02x}") if buf else "empty"


def runtime_versions() -> dict[str, str]:
    """Versions that must agree between the submitting process and the worker."""
    try:
        import dill

        dill_version = dill.__version__
    except Exception:  # pragma: no cover - dill is a hard dependency
        dill_version = "missing"
    return {"python": platform.python_version(), "dill": dill_version}


def serialize_function(fn: Callable[..., Any]) -> bytes:
    """Serialize a function's code once: dill by value plus source text when it can be had."""
    try:
        code = _dill().dumps(fn, protocol=5, recurse=True)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize function {getattr(fn, '__qualname__', fn)!r}: {exc}"
        ) from None
    try:
        source: str | None = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        source = None
    record = {
        "name": getattr(fn, "__name__", "function"),
        "code": code,
        "source": source,
        "modules": _user_module_sources(fn),
        **runtime_versions(),
    }
    return _H_CODE + msgpack.packb(record, use_bin_type=True)


def _user_module_sources(fn: Callable[..., Any]) -> dict[str, str]:
    """The source of the user's own module that defines ``fn`` (a file of theirs, not the
    standard library or an installed package): dill pickles such functions by reference, and the
    worker may not be able to import that module, so it travels along and is loaded there."""
    name = getattr(fn, "__module__", None)
    module = sys.modules.get(name or "")
    path = getattr(module, "__file__", None)
    if module is None or name == "__main__" or not path:
        return {}
    real = os.path.realpath(path)
    installed = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    if any(real.startswith(os.path.realpath(p) + os.sep) for p in installed if p):
        return {}
    try:
        return {name: inspect.getsource(module)}
    except (OSError, TypeError):
        return {}


def _provide_modules(sources: dict[str, str]) -> None:
    """Make the user's shipped modules importable here, unless this worker already can."""
    for name, source in sources.items():
        if name in sys.modules or importlib.util.find_spec(name.partition(".")[0]) is not None:
            continue
        parts = name.split(".")
        for i in range(1, len(parts)):  # parent packages as empty namespaces
            parent = ".".join(parts[:i])
            if parent not in sys.modules:
                package = types.ModuleType(parent)
                package.__path__ = []
                sys.modules[parent] = package
        module = types.ModuleType(name)
        module.__file__ = f"<dlhub copy of {name}>"
        sys.modules[name] = module
        try:
            exec(compile(source, module.__file__, "exec"), module.__dict__)
        except Exception:  # best effort: the function may well load without it
            del sys.modules[name]


def code_digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def load_function(blob: bytes) -> Callable[..., Any]:
    """Rebuild a function from :func:`serialize_function` output.

    Falls back to the source text when the dill bytes do not load here (e.g. another Python
    version), and names both versions when neither works.
    """
    if not blob or blob[0] != CODE:
        raise SerializationError("not a code buffer")
    record = msgpack.unpackb(blob[1:], raw=False)
    try:
        _provide_modules(record.get("modules") or {})
        return _dill().loads(record["code"])
    except Exception as exc:
        first_error = exc
    source = record.get("source")
    if source:
        namespace: dict[str, Any] = {"__name__": "__dlhub_source__"}
        try:
            exec(compile(source, f"<dlhub source of {record['name']}>", "exec"), namespace)
            fn = namespace.get(record["name"])
            if callable(fn):
                return fn
        except Exception:
            pass
    here = runtime_versions()
    from .errors import VersionMismatch

    if (record.get("python"), record.get("dill")) != (here["python"], here["dill"]):
        raise VersionMismatch(
            f"function {record['name']!r} was serialized with Python {record.get('python')} / "
            f"dill {record.get('dill')}, this worker has Python {here['python']} / dill "
            f"{here['dill']}, and it does not load here ({type(first_error).__name__}: "
            f"{first_error}); match the versions or publish it as a servable"
        )
    raise SerializationError(
        f"cannot load function {record['name']!r}: {type(first_error).__name__}: {first_error}"
    )


def input_digest(args: Any, kwargs: dict[str, Any]) -> str | None:
    """A digest of a call's inputs for result caches: canonical msgpack of plain data (dict keys
    sorted, tuples tagged), numpy arrays by dtype, shape and bytes, anything else by its pickle
    (which may miss a hit, never make a false one). None when the inputs cannot be encoded."""
    try:
        canonical = _canonical([list(args), kwargs])
        return hashlib.sha256(msgpack.packb(canonical, use_bin_type=True)).hexdigest()
    except Exception:
        return None


def _canonical(value: Any) -> Any:
    """Plain data as itself; everything else wrapped in a msgpack extension type (which plain
    data cannot contain, so a list shaped like a tag never collides with what it tags)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, tuple):
        return _ext(1, [_canonical(v) for v in value])
    if isinstance(value, dict):
        items = sorted(
            ((repr(k), _canonical(k), _canonical(v)) for k, v in value.items()), key=lambda kv: kv[0]
        )
        return _ext(2, [[k, v] for _, k, v in items])
    dtype = getattr(value, "dtype", None)
    if type(value).__module__ == "numpy" and dtype is not None and not dtype.hasobject:
        return _ext(3, [dtype.str, list(getattr(value, "shape", ())), value.tobytes()])
    return _ext(4, pickle.dumps(value, protocol=5))  # object arrays too: by their elements


def _ext(code: int, body: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(body, use_bin_type=True))
