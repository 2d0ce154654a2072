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


def cache_root() -> Path:
    """Where package files are unpacked on this node (``DLHUB_SERVABLE_CACHE`` overrides)."""
    root = os.environ.get("DLHUB_SERVABLE_CACHE")
    return Path(root) if root else Path(tempfile.gettempdir()) / f"dlhub-servables-{os.getuid()}"


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


def _materialize(digest: str, files: dict[str, bytes]) -> Path:
    """Write the package's files under the cache once (atomic rename; concurrent workers agree)."""
    final = cache_root() / digest
    if final.is_dir() or not files:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=final.parent))
    for rel, data in files.items():
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    try:
        tmp.rename(final)
    except OSError:  # another worker got there first
        shutil.rmtree(tmp, ignore_errors=True)
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


def load_package(blob: bytes) -> LoadedServable:
    """Unpack, check requirements, and load a servable package (and its pipeline steps)."""
    record, files, step_blobs = unpack_package(blob)
    unmet = unmet_requirements(record.requirements)
    if unmet:
        raise ServableLoadError(
            f"{record.ref} needs requirements this endpoint does not meet: {'; '.join(unmet)}"
        )
    steps = [load_package(b) for b in step_blobs]
    root = _materialize(record_digest(record), files)
    try:
        fn = Loader.registry[record.kind](record, root, steps).load()
    except DLHubError:
        raise
    except Exception as exc:
        raise ServableLoadError(f"{record.ref} does not load: {type(exc).__name__}: {exc}") from exc
    return LoadedServable(record, fn, root)
