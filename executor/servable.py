"""Builders: turn a function, an object, a scikit-learn estimator, a PyTorch model or a chain of
published servables into a record plus files, ready for ``Client.publish``.

    Servable.from_function(fn, name=..., title=..., authors=[...], examples=[((args), output)])
    Servable.from_module("featurize:featurize", files=["featurize.py"], ...)
    Servable.from_method(obj, "predict", ...)
    Servable.from_sklearn(estimator_or_joblib_path, method="predict", ...)
    Servable.from_torch(scripted_module_or_pt_path, ...)
    Servable.pipeline(["jane/featurizer", "jane/regressor"], ...)

Metadata keywords of every builder: name, title, authors, description, domains, keywords, license,
related_identifiers, inputs, output, examples, requirements, deterministic (same inputs, same
output: results may be cached), vectorized (takes a list of inputs, returns a list; the endpoint
batches calls) and batching ({"max_batch_size", "max_batch_delay_ms", "weight": "count"|"len"}),
trained_on and validated_on (data sets, ``["alice/scans:1"]``: pinned to a version at publish).
``visibility="private"`` (or "public") is not metadata: it is sent with the publish and belongs to
``owner/name``, changeable later (``Client.set_visibility``, ``share``, ``unshare``); left out,
a new servable is public and an existing one keeps its visibility.

Every builder records the environment (Python, dill, dlhub and the installed versions of the
declared requirements) and validates the record here, so a bad field fails before any upload
with the same message the manager would give.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import platform
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dlhub.protocol.serialize import plain, runtime_versions, serialize_function, user_modules


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _example(item: Any) -> dict[str, Any]:
    """``(args, output)``, ``(args, kwargs, output)`` or a dict with args/kwargs/output/rtol/atol."""
    if isinstance(item, dict):
        out = dict(item)
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        args = item[0] if isinstance(item[0], (tuple, list)) else (item[0],)
        out = {"args": list(args), "output": item[-1]}
        if len(item) == 3:
            out["kwargs"] = item[1]
    else:
        raise ValueError(
            f"an example is (args, output), (args, kwargs, output) or a dict, got {type(item).__name__}"
        )
    for key in ("args", "kwargs", "output"):
        if key in out:
            out[key] = plain(out[key], str_keys=True)
    return out


def _author(author: Any) -> dict[str, Any]:
    return {"name": author} if isinstance(author, str) else dict(author)


def _environment(requirements: Iterable[str]) -> dict[str, str]:
    env = {**runtime_versions(), "platform": platform.platform()}
    try:
        env["dlhub"] = importlib.metadata.version("dlhub")
    except importlib.metadata.PackageNotFoundError:
        pass
    for req in requirements:
        name = re.split(r"[\s\[<>=!~;@]", str(req).strip(), maxsplit=1)[0]
        if not name:
            continue  # the record's validation names the bad requirement
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return env


class Servable:
    """A servable ready to publish: ``record`` (a dict in the record schema), ``files``, and the
    ``visibility`` to set when it is published (None: leave it as it is, public when new)."""

    def __init__(
        self, record: dict[str, Any], files: dict[str, bytes] | None = None, visibility: str | None = None
    ):
        self.record = record
        self.files = dict(files or {})
        self.visibility = visibility

    def __repr__(self) -> str:
        kind, files = self.record.get("kind"), sorted(self.files)
        return f"Servable({self.record.get('name')!r}, kind={kind!r}, files={files})"

    @property
    def name(self) -> str:
        return self.record["name"]

    def validate(self):
        """The checked :class:`ServableRecord`, or :class:`RecordError` naming each bad field."""
        from dlhub.protocol.servable import RecordError, check_visibility, parse_record

        if self.visibility is not None:
            check_visibility(self.visibility)
        rec = parse_record(self.record)
        missing = sorted(set(rec.files) - set(self.files))
        if missing:
            raise RecordError(f"invalid servable record:\n  files: {', '.join(missing)} not attached")
        return rec

    # ---- builders ----------------------------------------------------------------------------

    @classmethod
    def _build(
        cls,
        kind: str,
        entry_point: str,
        files: dict[str, bytes],
        *,
        name: str,
        title: str,
        authors: Sequence[Any],
        description: str = "",
        domains: Sequence[str] = (),
        keywords: Sequence[str] = (),
        license: str | None = None,
        related_identifiers: Sequence[Any] = (),
        inputs: Sequence[dict[str, Any]] | None = None,
        output: dict[str, Any] | None = None,
        examples: Sequence[Any] = (),
        requirements: Sequence[str] = (),
        deterministic: bool = False,
        vectorized: bool = False,
        batching: dict[str, Any] | None = None,
        steps: Sequence[str] = (),
        visibility: str | None = None,
        container: str | None = None,
        trained_on: Sequence[str] = (),
        validated_on: Sequence[str] = (),
    ) -> Servable:
        record: dict[str, Any] = {
            "name": name,
            "title": title,
            "description": description,
            "authors": [_author(a) for a in authors],
            "domains": list(domains),
            "keywords": list(keywords),
            "license": license,
            "related_identifiers": [
                {"identifier": r} if isinstance(r, str) else dict(r) for r in related_identifiers
            ],
            "inputs": list(inputs or []),
            "examples": [_example(e) for e in examples],
            "kind": kind,
            "files": {path: _sha(data) for path, data in files.items()},
            "entry_point": entry_point,
            "steps": list(steps),
            "requirements": list(requirements),
            "environment": _environment(requirements),
            "deterministic": deterministic,
            "vectorized": vectorized,
            "batching": dict(batching) if batching is not None else None,
        }
        if container is not None:  # left out when None: the record (and digest) as before
            record["container"] = container
        for key, refs in (("trained_on", trained_on), ("validated_on", validated_on)):
            if isinstance(refs, str):
                raise TypeError(f"{key} is a list of data sets, e.g. {key}=['alice/scans:1']")
            if refs:  # left out when empty, as container (data sets: owner/name[:version])
                record[key] = list(refs)
        if output is not None:
            record["output"] = output
        servable = cls(record, files, visibility)
        servable.validate()
        return servable

    @classmethod
    def from_function(cls, fn: Callable[..., Any], **metadata: Any) -> Servable:
        """A plain function, by value (dill + its source, and the source of every user module it
        reaches, as :meth:`Executor.submit <dlhub.executor.Executor.submit>` ships them)."""
        if not callable(fn):
            raise TypeError(f"from_function needs a callable, got {type(fn).__name__}")
        files = {"function.code": serialize_function(fn)}
        return cls._build("function", "function.code", files, **metadata)

    @classmethod
    def from_module(
        cls,
        entry_point: str,
        files: Iterable[str | os.PathLike],
        *,
        root: str | os.PathLike | None = None,
        **metadata: Any,
    ) -> Servable:
        """``module:function`` imported from shipped files (paths kept relative to ``root``,
        by default the directory of the first file)."""
        paths = [Path(p) for p in files]
        if not paths:
            raise ValueError("from_module needs the files that define the module")
        base = Path(root) if root is not None else paths[0].resolve().parent
        shipped = {}
        for path in paths:
            rel = path.resolve().relative_to(base.resolve()).as_posix()
            shipped[rel] = path.read_bytes()
        return cls._build("function", entry_point, shipped, **metadata)

    @classmethod
    def from_method(cls, obj: Any, method: str, **metadata: Any) -> Servable:
        """A method of an object, which is pickled (dill) with its state."""
        import dill

        if not callable(getattr(obj, method, None)):
            raise ValueError(f"{type(obj).__name__} has no method {method!r}")
        files = {"object.pkl": dill.dumps(obj, protocol=5, recurse=True)}
        # an object of a class from the user's own module unpickles by importing that module (and
        # what it imports): the user modules it reaches travel as files, importable at the endpoint
        # from the package root
        for module_name, source, is_package in user_modules(files["object.pkl"], type(obj).__module__):
            parts = module_name.split(".")
            for i in range(1, len(parts)):
                files.setdefault("/".join(parts[:i]) + "/__init__.py", b"")
            path = "/".join(parts) + ("/__init__.py" if is_package else ".py")
            files[path] = source.encode()
        return cls._build("method", f"object.pkl:{method}", files, **metadata)

    @classmethod
    def from_sklearn(cls, model: Any, method: str = "predict", **metadata: Any) -> Servable:
        """A scikit-learn estimator (or a joblib file of one); ``method`` predict or predict_proba."""
        import joblib

        if method not in ("predict", "predict_proba", "transform", "decision_function"):
            raise ValueError(
                f"method must be predict, predict_proba, transform or decision_function, not {method!r}"
            )
        if isinstance(model, (str, os.PathLike)):
            data = Path(model).read_bytes()
        else:
            if not callable(getattr(model, method, None)):
                raise ValueError(f"{type(model).__name__} has no method {method!r}")
            buf = io.BytesIO()
            joblib.dump(model, buf)
            data = buf.getvalue()
        metadata.setdefault("requirements", ["scikit-learn"])
        return cls._build("sklearn", f"model.joblib:{method}", {"model.joblib": data}, **metadata)

    @classmethod
    def from_torch(cls, model: Any, **metadata: Any) -> Servable:
        """A TorchScript module (``torch.jit.script``/``trace`` output) or a saved ``.pt`` file."""
        if isinstance(model, (str, os.PathLike)):
            data = Path(model).read_bytes()
        else:
            import torch

            if not isinstance(model, torch.jit.ScriptModule):
                raise TypeError(
                    "from_torch needs TorchScript: pass torch.jit.script(model) or "
                    "torch.jit.trace(model, example_input), or a saved .pt file"
                )
            buf = io.BytesIO()
            torch.jit.save(model, buf)
            data = buf.getvalue()
        metadata.setdefault("requirements", ["torch"])
        return cls._build("torch", "model.pt", {"model.pt": data}, **metadata)

    @classmethod
    def pipeline(cls, steps: Sequence[str], **metadata: Any) -> Servable:
        """Published servables chained at the endpoint: each output is the next one's input.
        Unpinned steps are pinned to their latest ready version when published."""
        return cls._build("pipeline", "pipeline", {}, steps=steps, **metadata)
