"""Loading and running published servables on a worker: one small loader class per kind.

    package blob (from the manager, cached by the endpoint) --load_package--> LoadedServable
        files written once per node under the servable cache (by record digest)
        requirements checked (a clear error instead of an ImportError deep inside)
        the kind's loader builds the callable; a pipeline loads its steps from the same blob

A worker keeps what it loaded in its function cache, keyed by the task's function name, so a
servable is loaded once per worker and stays warm. ``verify()`` runs the record's examples and
compares outputs with their tolerances: the manager marks a version ``ready`` only on its report.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from dlhub.protocol.errors import DLHubError, ServableLoadError
from dlhub.protocol.serialize import load_function, plain
from dlhub.protocol.servable import ServableRecord, TypeSpec, record_digest, unpack_package

_configured_root: Path | None = None
_checked_roots: set[Path] = set()


def set_cache_root(path: str | os.PathLike | None) -> None:
    """The endpoint's own folder for unpacked packages (from the worker's config:
    ``endpoints/<name>/servables/unpacked``); ``$DLHUB_SERVABLE_CACHE`` still overrides it."""
    global _configured_root
    _configured_root = Path(path) if path else None


def cache_root() -> Path:
    """Where package files are unpacked on this node: ``$DLHUB_SERVABLE_CACHE``, else the
    endpoint's folder, else ``<tmp>/dlhub-servables-<uid>``; in every case a folder of this user
    that nobody else may write (checked once per process, created 0700 if missing), since
    whatever is there gets imported."""
    root = os.environ.get("DLHUB_SERVABLE_CACHE")
    path = (
        Path(root)
        if root
        else _configured_root or Path(tempfile.gettempdir()) / f"dlhub-servables-{os.getuid()}"
    )
    if path not in _checked_roots:
        check_cache_dir(path, "$DLHUB_SERVABLE_CACHE" if root else "the servable cache")
        _checked_roots.add(path)
    return path


def check_cache_dir(path: Path, what: str) -> None:
    """Create ``path`` 0700, or refuse one that another user owns or others may write."""
    import stat

    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise ServableLoadError(f"{what} {path} cannot be created: {exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ServableLoadError(f"{what} {path} is not a folder (a link or a file): refused")
    if info.st_uid != os.getuid():
        raise ServableLoadError(
            f"{what} {path} belongs to uid {info.st_uid}, not to this user ({os.getuid()}): refused, "
            "as another user could plant code there; point $DLHUB_SERVABLE_CACHE at a folder of yours"
        )
    if info.st_mode & 0o022:
        raise ServableLoadError(
            f"{what} {path} may be written by others (mode {stat.S_IMODE(info.st_mode):o}): refused; "
            f"run `chmod go-w {path}` or choose another folder"
        )


def unmet_requirements(requirements: list[str]) -> list[str]:
    """Each requirement that the installed distributions do not satisfy, with what is installed."""
    from packaging.requirements import InvalidRequirement, Requirement

    problems = []
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            problems.append(f"{text!r} is not a valid requirement ({exc})")
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{text} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{text} (installed: {installed})")
    return problems


def _file_digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def _check_package_files(record: ServableRecord, files: dict[str, bytes]) -> None:
    """The package's files are exactly the record's, each with its digest."""
    if set(files) != set(record.files):
        extra, missing = sorted(set(files) - set(record.files)), sorted(set(record.files) - set(files))
        raise ServableLoadError(
            f"the package of {record.ref} does not match its record (extra files {extra}, missing {missing})"
        )
    for rel, data in files.items():
        if _file_digest(data) != record.files[rel]:
            raise ServableLoadError(f"the package of {record.ref} does not match its record: {rel} differs")


def _unpacked_problem(record: ServableRecord, root: Path) -> str | None:
    """Why the unpacked tree at ``root`` is not exactly the record's files (None: it is).
    Bytecode caches are removed first: a planted ``.pyc`` must not stand in for a source."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if "__pycache__" in dirnames:
            dirnames.remove("__pycache__")
            shutil.rmtree(Path(dirpath) / "__pycache__", ignore_errors=True)
        for filename in filenames:
            path = Path(dirpath) / filename
            rel = path.relative_to(root).as_posix()
            if rel not in record.files:
                return f"unexpected file {rel}"
            if path.is_symlink():
                return f"{rel} is a link"
            found.add(rel)
            if _file_digest(path.read_bytes()) != record.files[rel]:
                return f"{rel} does not match its digest"
    missing = set(record.files) - found
    return f"missing {sorted(missing)}" if missing else None


def _materialize(record: ServableRecord, digest: str, files: dict[str, bytes]) -> Path:
    """Write the package's files under the cache once (atomic rename; concurrent workers agree).
    A tree already there is used only if it holds exactly the record's files, each matching
    its digest; otherwise it is replaced from the package's bytes."""
    final = cache_root() / digest
    if not files:
        return final
    _check_package_files(record, files)
    if final.is_dir() or final.is_symlink():
        problem = _unpacked_problem(record, final) if not final.is_symlink() else "it is a link"
        if problem is None:
            return final
        print(
            f"dlhub: unpacked servable {record.ref} at {final} was altered ({problem}): unpacking it again",
            file=sys.stderr,
            flush=True,
        )
        doomed = final.with_name(f".bad-{digest[:12]}-{os.getpid()}")
        try:
            final.rename(doomed)
        except OSError as exc:
            raise ServableLoadError(
                f"{final} holds an altered copy of {record.ref} and cannot be moved: {exc}"
            ) from None
        shutil.rmtree(doomed, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=final.parent))
    for rel, data in files.items():
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    try:
        tmp.rename(final)
    except OSError:  # another worker got there first
        shutil.rmtree(tmp, ignore_errors=True)
        problem = _unpacked_problem(record, final)
        if problem is not None:
            raise ServableLoadError(f"the unpacked copy of {record.ref} at {final} is altered: {problem}")
    return final


def _convert(value: Any, spec: TypeSpec | None) -> Any:
    """Inputs declared as arrays arrive as lists over JSON/msgpack: make them arrays here."""
    if spec is None or spec.type != "ndarray" or value is None:
        return value
    import numpy as np

    return np.asarray(value, dtype=spec.dtype) if spec.dtype else np.asarray(value)


def outputs_match(actual: Any, expected: Any, rtol: float, atol: float) -> str | None:
    """None when ``actual`` equals ``expected`` within the tolerances, else where they differ."""
    return _diff(plain(actual), expected, rtol, atol, "output")


def _diff(actual: Any, expected: Any, rtol: float, atol: float, where: str) -> str | None:
    if isinstance(expected, bool) or isinstance(actual, bool):  # True is not 1 here
        same = type(actual) is type(expected) and actual == expected
        return None if same else f"{where}: got {actual!r}, expected {expected!r}"
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        if math.isclose(actual, expected, rel_tol=rtol, abs_tol=atol) or actual == expected:
            return None
        return f"{where}: got {actual!r}, expected {expected!r} (rtol {rtol}, atol {atol})"
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(actual) != len(expected):
            return f"{where}: got {len(actual)} items, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            problem = _diff(a, e, rtol, atol, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(actual) != set(expected):
            return f"{where}: keys {sorted(map(str, actual))} differ from {sorted(map(str, expected))}"
        for key in expected:
            problem = _diff(actual[key], expected[key], rtol, atol, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    return None if actual == expected else f"{where}: got {actual!r}, expected {expected!r}"


# ---- loaders ---------------------------------------------------------------------------------


class Loader:
    """Turns a record and its unpacked files into a callable. One subclass per kind."""

    kind: ClassVar[str]
    registry: ClassVar[dict[str, type[Loader]]] = {}

    def __init_subclass__(cls) -> None:
        Loader.registry[cls.kind] = cls

    def __init__(self, record: ServableRecord, root: Path, steps: list[LoadedServable]):
        self.record, self.root, self.steps = record, root, steps

    def load(self) -> Callable[..., Any]:
        raise NotImplementedError

    def _import_path(self) -> None:
        """Put this package's files first on the path, and forget modules imported from *other*
        servables' files: a warm worker must not run another version's module of the same name."""
        cache = str(cache_root())
        mine = str(self.root)
        sys.path[:] = [p for p in sys.path if not (p.startswith(cache) and p != mine)]
        if mine not in sys.path:
            sys.path.insert(0, mine)
        for name, module in list(sys.modules.items()):
            origin = getattr(module, "__file__", None) or ""
            if origin.startswith(cache) and not origin.startswith(mine + os.sep):
                del sys.modules[name]


class FunctionLoader(Loader):
    """``module:function`` from the shipped files, or a function shipped by value (``*.code``)."""

    kind = "function"

    def load(self):
        entry = self.record.entry_point
        if entry in self.record.files:  # by value: serialize_function output
            return load_function((self.root / entry).read_bytes())
        module_name, _, attr = entry.partition(":")
        if not attr:
            raise ServableLoadError(f"entry point {entry!r} must be module:function or a shipped .code file")
        self._import_path()
        module = importlib.import_module(module_name)
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise ServableLoadError(f"{module_name} has no callable {attr!r}")
        return fn


class MethodLoader(Loader):
    """A method of a pickled object: ``object.pkl:method``."""

    kind = "method"

    def _object(self):
        import dill

        path, _, _ = self.record.entry_point.partition(":")
        self._import_path()
        with open(self.root / path, "rb") as f:
            return dill.load(f)

    def load(self):
        method = self.record.entry_point.partition(":")[2] or "__call__"
        obj = self._object()
        fn = getattr(obj, method, None)
        if not callable(fn):
            raise ServableLoadError(f"the shipped {type(obj).__name__} has no method {method!r}")
        return fn


class SklearnLoader(MethodLoader):
    """A scikit-learn estimator saved with joblib: ``model.joblib:predict|predict_proba``.

    A 1-D input is one sample: it is reshaped to one row and the single prediction returned, so
    the estimator chains after a featurizer that returns one feature vector."""

    kind = "sklearn"

    def _object(self):
        import joblib

        return joblib.load(self.root / self.record.entry_point.partition(":")[0])

    def load(self):
        import numpy as np

        method = super().load()

        def predict(x, *args, **kwargs):
            arr = np.asarray(x)
            if arr.ndim == 1:
                return method(arr.reshape(1, -1), *args, **kwargs)[0]
            return method(arr, *args, **kwargs)

        return predict


class TorchLoader(Loader):
    """A TorchScript file: inputs become float tensors, outputs come back as numpy arrays."""

    kind = "torch"

    def load(self):
        import numpy as np
        import torch

        model = torch.jit.load(str(self.root / self.record.entry_point), map_location="cpu")
        model.eval()
        specs = self.record.inputs

        def run(*args):
            tensors = []
            for i, arg in enumerate(args):
                spec = specs[i] if i < len(specs) else None
                dtype = np.dtype(spec.dtype) if spec is not None and spec.dtype else np.float32
                if not isinstance(arg, torch.Tensor):
                    arg = torch.as_tensor(np.asarray(arg, dtype))
                tensors.append(arg)
            with torch.no_grad():
                out = model(*tensors)
            return out.numpy() if isinstance(out, torch.Tensor) else out

        return run


class PipelineLoader(Loader):
    """Steps run in order at the worker: each output is the next step's only argument."""

    kind = "pipeline"

    def load(self):
        steps = self.steps

        def run(*args, **kwargs):
            value = steps[0](*args, **kwargs)
            for step in steps[1:]:
                value = step(value)
            return value

        return run


class LoadedServable:
    """A servable ready to call: inputs converted by their declared types, examples verifiable."""

    def __init__(self, record: ServableRecord, fn: Callable[..., Any], root: Path | None = None):
        self.record, self._fn, self.root = record, fn, root

    def unload(self) -> None:
        """Forget modules imported from this servable's files (so evicting it frees them)."""
        if self.root is None:
            return
        mine = str(self.root)
        sys.path[:] = [p for p in sys.path if p != mine]
        for name, module in list(sys.modules.items()):
            if (getattr(module, "__file__", None) or "").startswith(mine + os.sep):
                del sys.modules[name]

    def __call__(self, *args, **kwargs):
        specs = self.record.inputs
        args = tuple(_convert(a, specs[i] if i < len(specs) else None) for i, a in enumerate(args))
        return self._fn(*args, **kwargs)

    def verify(self) -> dict[str, Any]:
        """Run every example; the report is JSON: ``{"ok": bool, "error": str|None, "examples": n}``."""
        for i, example in enumerate(self.record.examples):
            try:
                actual = self(*example.args, **example.kwargs)
            except Exception as exc:  # noqa: BLE001 - the example's failure is the report
                return {"ok": False, "error": f"example {i} raised {type(exc).__name__}: {exc}"}
            problem = outputs_match(actual, example.output, example.rtol, example.atol)
            if problem:
                return {"ok": False, "error": f"example {i} gave a different output: {problem}"}
        return {"ok": True, "error": None, "examples": len(self.record.examples)}


def load_package(blob: bytes, digest: str | None = None) -> LoadedServable:
    """Unpack, check requirements, and load a servable package (and its pipeline steps).
    ``digest``: the record digest the package must have (a copy read back from disk)."""
    record, files, step_blobs = unpack_package(blob)
    if digest is not None and record_digest(record) != digest:
        raise ServableLoadError(f"the package for {digest[:12]} holds another record ({record.ref}): refused")
    unmet = unmet_requirements(record.requirements)
    if unmet:
        raise ServableLoadError(
            f"{record.ref} needs requirements this endpoint does not meet: {'; '.join(unmet)}"
        )
    steps = [load_package(b) for b in step_blobs]
    root = _materialize(record, record_digest(record), files)
    try:
        fn = Loader.registry[record.kind](record, root, steps).load()
    except DLHubError:
        raise
    except Exception as exc:
        raise ServableLoadError(f"{record.ref} does not load: {type(exc).__name__}: {exc}") from exc
    return LoadedServable(record, fn, root)
