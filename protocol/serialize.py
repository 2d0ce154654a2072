"""Serializer registry for user payloads: every buffer starts with one byte naming its method.

Only the user's process and the worker call these functions; the manager and the endpoint carry
the buffers as opaque bytes. Methods:

- ``msgpack`` (0x01): plain data (None, bool, int, float, str, bytes, list, dict). Packed with
  ``strict_types`` so a tuple or a subclass falls through to dill instead of silently changing type.
- ``dill`` (0x02): anything else, pickle protocol 5 (numpy arrays are copied once, in-band).
- ``json`` (0x03): for REST callers.
- ``pickle5`` (0x04): what ``auto`` and ``dill`` give instead of 0x02 when the value holds at least
  :data:`OOB_MIN_BYTES` of out-of-band buffers (numpy arrays): the small pickle stream and the
  array bytes side by side, so encoding copies the data once and decoding not at all.
- ``code`` (0x10): a function's code: dill by value, its source text when available, and the
  source of the user's own modules it reaches (:func:`user_modules`).

``auto`` picks msgpack when the value round-trips exactly and dill otherwise.

The pickle5 layout, its encoder and the checked reading of a payload are in :mod:`.oob`; this
module picks the method and dispatches to it (``PICKLE5``, ``OOB_MIN_BYTES`` and ``OOB_ALIGN``
are importable from here as before).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.abc
import importlib.machinery
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
from .oob import OOB_ALIGN as OOB_ALIGN  # re-exported: the pickle5 payload lives in .oob
from .oob import (
    OOB_MIN_BYTES,
    PICKLE5,
    _dill,
    _dill_out_of_band,
    _out_of_band,
    _out_of_band_parts,
)

MSGPACK, DILL, JSON, CODE = 0x01, 0x02, 0x03, 0x10
METHOD_NAMES = {MSGPACK: "msgpack", DILL: "dill", JSON: "json", PICKLE5: "pickle5", CODE: "code"}
METHOD_IDS = {name: mid for mid, name in METHOD_NAMES.items()}
_H_MSGPACK, _H_DILL, _H_JSON, _H_CODE = (bytes([m]) for m in (MSGPACK, DILL, JSON, CODE))


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=True)


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
        # one pass: a buffer under OOB_MIN_BYTES stays in the stream (the callback's True), byte
        # for byte the in-band pickle of before; a larger one goes apart (collected)
        buffers: list[pickle.PickleBuffer] = []

        def in_band(buffer: pickle.PickleBuffer) -> bool | None:
            if memoryview(buffer).nbytes < OOB_MIN_BYTES:
                return True
            buffers.append(buffer)
            return None

        try:
            body = pickle.dumps(obj, protocol=5, buffer_callback=in_band)
        except Exception:
            body = None
        if body is not None and b"__main__" not in body:  # the stream only: buffers are data
            if not buffers:
                return _H_DILL + body
            packed = _out_of_band(body, buffers)
            if packed is not None:
                return packed
            body = pickle.dumps(obj, protocol=5)  # a buffer that is not contiguous: all in-band
            if b"__main__" not in body:
                return _H_DILL + body
    if method in ("auto", "dill"):
        packed = _dill_out_of_band(obj, _H_DILL)
        if packed is not None:
            return packed
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


def deserialize(buf: bytes | bytearray | memoryview) -> Any:
    """Decode a buffer made by :func:`serialize`."""
    if not buf:
        raise SerializationError("empty buffer")
    method = buf[0]
    if method == PICKLE5:  # no slice of the whole buffer: the arrays are read where they lie
        stream, buffers = _out_of_band_parts(buf)
        try:
            loads = _dill().loads if b"dill" in stream else pickle.loads
            return loads(stream, buffers=buffers)
        except Exception as exc:
            raise SerializationError(
                f"cannot deserialize pickle5 buffer: {type(exc).__name__}: {exc}"
            ) from exc
    body = buf[1:]
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
    """Serialize a function's code once: dill by value, its source text when it can be had, and
    the source of every user module it reaches (see :func:`user_modules`)."""
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
        "modules": user_modules(code, getattr(fn, "__module__", None)),
        **runtime_versions(),
    }
    return _H_CODE + msgpack.packb(record, use_bin_type=True)


# ---- the user's own modules travel with the code that reaches them ------------------------------

# Source text shipped with one function, all modules together. Modules are taken nearest first
# (breadth first from the function); one that would go over is left behind with a warning, and
# then only loads where the endpoint can import it itself.
MAX_SHIPPED_MODULE_BYTES = 16 * 2**20


def user_modules(pickled: bytes, *roots: str | None) -> list[list[Any]]:
    """``[name, source, is_package]`` of every user module that ``pickled`` (dill output) needs,
    dependencies first.

    dill pickles a function of ``__main__`` by value but one of an importable module by reference
    (module name + qualname), and a module object as an import of its name: the worker must be able
    to import each such module. The modules named in the pickle (plus ``roots``) are walked, with
    what they import in turn (module-level names, ``import`` statements anywhere in their source,
    parent packages). Only modules of the user's own files travel: not ``__main__``, the standard
    library, installed packages or dlhub itself, and only modules this process has imported.
    """
    names = [r for r in roots if r] + _pickled_modules(pickled)
    queue, seen, edges, shipped, left_out, total = [], set(), {}, {}, [], 0
    for name in names:
        if name not in seen and _user_module(name) is not None:
            seen.add(name)
            queue.append(name)
    for name in queue:  # breadth first: the list grows while it is walked
        module = sys.modules[name]
        source = _module_source(module)
        if source is None:
            continue
        size = len(source.encode())
        if total + size > MAX_SHIPPED_MODULE_BYTES:
            left_out.append(name)
            continue
        total += size
        shipped[name] = [name, source, hasattr(module, "__path__")]
        edges[name] = []
        for dep in _module_imports(module, source):
            if dep != name and _user_module(dep) is not None:
                edges[name].append(dep)
                if dep not in seen:
                    seen.add(dep)
                    queue.append(dep)
    if left_out:
        import warnings

        warnings.warn(
            f"dlhub: user modules not shipped with the function, over MAX_SHIPPED_MODULE_BYTES "
            f"({MAX_SHIPPED_MODULE_BYTES:,} bytes of source in all): {', '.join(left_out)}; "
            "the endpoint must be able to import them itself",
            stacklevel=3,
        )
    return [shipped[n] for n in _dependencies_first(list(shipped), edges)]


def _pickled_modules(pickled: bytes) -> list[str]:
    """The loaded user modules whose name is a whole string in the pickle: a module name of a
    global, an imported module, a name the code reads. Searched as the bytes pickle writes for a
    string (far faster than walking the opcodes of a pickle with a big closure)."""
    found = []
    for name in list(sys.modules):
        if _user_module(name) is None:
            continue
        raw = name.encode()
        forms = [b"X" + len(raw).to_bytes(4, "little") + raw, b"c" + raw + b"\n"]  # BINUNICODE, GLOBAL
        if len(raw) < 256:
            forms.append(b"\x8c" + bytes([len(raw)]) + raw)  # SHORT_BINUNICODE
        if any(form in pickled for form in forms):
            found.append(name)
    return found


@functools.lru_cache(maxsize=1)
def _installed_dirs() -> tuple[str, ...]:
    """Directories of the standard library and installed packages (with a trailing separator)."""
    paths = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        import site

        paths.update(site.getsitepackages())
        paths.add(site.getusersitepackages())
    except Exception:  # site may be stripped down (embedded interpreters)
        pass
    paths = {p for p in paths if p}
    return tuple({os.path.join(q, "") for p in paths for q in (p, os.path.realpath(p))})


def _user_module(name: str) -> types.ModuleType | None:
    """The loaded module ``name`` when it is one of the user's own source files, else None."""
    top = name.partition(".")[0]
    if name == "__main__" or top.startswith("__") or top == "dlhub":
        return None
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return None
    module = sys.modules.get(name)
    if not isinstance(module, types.ModuleType):
        return None
    path = getattr(module, "__file__", None)
    if path:
        if not path.endswith(".py"):  # an extension module or bytecode only: no source to ship
            return None
        paths = [path]
    else:  # a namespace package: its directories
        paths = list(getattr(module, "__path__", None) or [])
        if not paths:
            return None
    installed = _installed_dirs()
    if any(p.startswith(installed) or os.path.realpath(p).startswith(installed) for p in paths):
        return None
    return module


def _module_source(module: types.ModuleType) -> str | None:
    path = getattr(module, "__file__", None)
    if not path:
        return ""  # a namespace package travels as an empty package
    import tokenize

    try:
        with tokenize.open(path) as f:  # honours the file's encoding declaration
            return f.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _module_imports(module: types.ModuleType, source: str) -> list[str]:
    """Names of the modules ``module`` refers to: its parent packages, modules and the modules of
    functions, classes and objects among its globals, and every module its source imports."""
    import ast

    name = module.__name__
    parts = name.split(".")
    found = [".".join(parts[:i]) for i in range(1, len(parts))]
    for value in list(vars(module).values()):
        if isinstance(value, types.ModuleType):
            found.append(value.__name__)
        elif isinstance(value, (type, types.FunctionType)):
            found.append(getattr(value, "__module__", None) or "")
        else:
            found.append(type(value).__module__)
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return found
    package = getattr(module, "__package__", None) or ""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bits = alias.name.split(".")
                found += [".".join(bits[:i]) for i in range(1, len(bits) + 1)]
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            except (ImportError, ValueError):
                continue
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]  # submodules, if any
    return [f for f in found if isinstance(f, str) and f]


def _dependencies_first(names: list[str], edges: dict[str, list[str]]) -> list[str]:
    """Depth-first post-order (iterative, cycles cut where they close)."""
    order: list[str] = []
    done: set[str] = set()
    for start in names:
        if start in done:
            continue
        done.add(start)
        stack = [(start, iter(edges.get(start, ())))]
        while stack:
            node, deps = stack[-1]
            for dep in deps:
                if dep in edges and dep not in done:
                    done.add(dep)
                    stack.append((dep, iter(edges[dep])))
                    break
            else:
                stack.pop()
                order.append(node)
    return order


class _ShippedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the user modules that came with functions, from their shipped source.

    It sits at the END of ``sys.meta_path``: a module this process can import from its own
    environment always wins over a shipped copy. A module is executed when first imported (by
    dill while it loads a function, or by another shipped module), so dependencies run first, as
    in the user's process. When a function ships a module under a name already shipped with other
    source, the newer source serves every load from then on: all shipped copies are dropped from
    ``sys.modules`` (so modules that import the changed one are rebuilt against it), while
    functions loaded before keep the module objects they were loaded with.
    """

    def __init__(self) -> None:
        self.sources: dict[str, tuple[str, bool]] = {}
        self.loaded: dict[str, types.ModuleType] = {}

    def provide(self, modules: list[list[Any]]) -> None:
        changed = False
        for name, source, is_package in modules:
            entry = (source, bool(is_package))
            changed = changed or self.sources.get(name, entry) != entry
            self.sources[name] = entry
        if changed:
            for name, module in self.loaded.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]
            self.loaded.clear()
        if self not in sys.meta_path:
            sys.meta_path.append(self)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        entry = self.sources.get(fullname)
        if entry is None:
            return None
        origin = f"<dlhub copy of {fullname}>"
        return importlib.machinery.ModuleSpec(fullname, self, origin=origin, is_package=entry[1])

    def create_module(self, spec: Any) -> None:
        return None  # the default module object

    def get_source(self, fullname: str) -> str | None:
        entry = self.sources.get(fullname)
        return entry[0] if entry else None

    def exec_module(self, module: types.ModuleType) -> None:
        import linecache

        name = module.__name__
        source = self.sources[name][0]
        filename = module.__spec__.origin
        module.__file__ = filename
        # tracebacks and inspect.getsource show the shipped lines
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        try:
            exec(compile(source, filename, "exec"), module.__dict__)
        except BaseException as exc:
            _add_note(exc, f"while importing {name}, a module of the user shipped with the function")
            raise
        self.loaded[name] = module


_SHIPPED = _ShippedModules()


def _add_note(exc: BaseException, note: str) -> None:
    try:
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        else:  # Python 3.10
            exc.__notes__ = [*getattr(exc, "__notes__", []), note]
    except Exception:
        pass


def _provide_modules(modules: list[list[Any]] | dict[str, str]) -> None:
    """Make the user's shipped modules importable here (where this worker cannot import them
    itself), before dill needs them. Records from before packages travelled hold ``{name: source}``."""
    if isinstance(modules, dict):
        modules = [[name, source, False] for name, source in modules.items()]
    _SHIPPED.provide(modules)


def code_digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def load_function(blob: bytes) -> Callable[..., Any]:
    """Rebuild a function from :func:`serialize_function` output.

    Falls back to the source text when the dill bytes do not load here (e.g. another Python
    version), but only when that text defines every global name the function reads; otherwise the
    error says why the bytes did not load (the real cause, such as a missing module).
    """
    if not blob or blob[0] != CODE:
        raise SerializationError("not a code buffer")
    record = msgpack.unpackb(blob[1:], raw=False)
    _refuse_other_python_minor(record)
    try:
        _provide_modules(record.get("modules") or [])
        return _dill().loads(record["code"])
    except Exception as exc:
        first_error = exc
    fn = _from_source(record)
    if fn is not None:
        return fn
    cause = _describe(first_error)
    here = runtime_versions()
    from .errors import VersionMismatch

    if (record.get("python"), record.get("dill")) != (here["python"], here["dill"]):
        raise VersionMismatch(
            f"function {record['name']!r} was serialized with Python {record.get('python')} / "
            f"dill {record.get('dill')}, this worker has Python {here['python']} / dill "
            f"{here['dill']}, and it does not load here ({cause}); match the versions or publish it "
            "as a servable"
        ) from first_error
    raise SerializationError(f"cannot load function {record['name']!r}: {cause}") from first_error


def _python_minor(version: object) -> str | None:
    parts = str(version).split(".") if isinstance(version, str) else []
    return ".".join(parts[:2]) if len(parts) >= 2 else None


def _refuse_other_python_minor(record: dict) -> None:
    """Python's bytecode and pickled code objects change between minor versions: dill bytes from
    3.11 may load under 3.12 and then misbehave, or crash the worker. A function serialized under
    another minor (a laptop's 3.12 against an image's 3.11) fails before it runs, naming both.
    Patch releases (3.11.2 against 3.11.7) share the bytecode and load as usual. A record without
    a version (hand-made) is left to the loaders."""
    theirs, here = _python_minor(record.get("python")), runtime_versions()
    if theirs is None or theirs == _python_minor(here["python"]):
        return
    from .errors import VersionMismatch

    raise VersionMismatch(
        f"function {record.get('name', 'function')!r} was serialized with Python "
        f"{record.get('python')} / dill {record.get('dill')}, this worker has Python {here['python']} "
        f"/ dill {here['dill']}: code does not move between Python minor versions; submit from "
        f"Python {_python_minor(here['python'])}, run it where Python {theirs} is (an endpoint, pool "
        "or container image with that version), or publish it as a servable"
    )


def _describe(exc: BaseException) -> str:
    """``Type: message``, with the notes saying which shipped module raised it, and a hint for a
    module that did not travel."""
    text = f"{type(exc).__name__}: {exc}"
    notes = [n for n in getattr(exc, "__notes__", None) or [] if isinstance(n, str)]
    if notes:
        text += f" ({'; '.join(notes)})"
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        text += (
            f"; {exc.name!r} cannot be imported where the function runs (only the user's own "
            "modules travel with a function, up to MAX_SHIPPED_MODULE_BYTES; install other packages "
            "there)"
        )
    return text


def _from_source(record: dict[str, Any]) -> Callable[..., Any] | None:
    """The function rebuilt from its source text, or None when that text alone does not define
    a function whose every global name resolves (so a fallback never turns a missing module into
    a NameError at call time)."""
    source = record.get("source")
    if not source:
        return None
    namespace: dict[str, Any] = {"__name__": "__dlhub_source__"}
    try:
        exec(compile(source, f"<dlhub source of {record['name']}>", "exec"), namespace)
    except Exception:
        return None
    fn = namespace.get(record["name"])
    if not isinstance(fn, types.FunctionType) or _unresolved_globals(fn.__code__, namespace):
        return None
    return fn


def _unresolved_globals(code: types.CodeType, namespace: dict[str, Any]) -> set[str]:
    import builtins
    import dis

    read, written = set(), set()
    codes = [code]
    while codes:
        current = codes.pop()
        for ins in dis.get_instructions(current):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                read.add(ins.argval)
            elif ins.opname == "STORE_GLOBAL":
                written.add(ins.argval)
        codes += [c for c in current.co_consts if isinstance(c, types.CodeType)]
    return {n for n in read - written if n not in namespace and not hasattr(builtins, n)}


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
