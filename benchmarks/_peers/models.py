"""The six example servables as plain callables, loaded from the files the benchmark wrote.

Every peer server imports this (in the peers venv, without dlhub): the featurizer is the function
in executor/examples.py itself, loaded from its file; the models are the same trained objects
(joblib pickles and a TorchScript file) that dlhub serves.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

NAMES = [
    "noop",
    "composition-featurizer",
    "composition-rf",
    "diabetes-rf",
    "digits-cnn",
    "composition-pipeline",
    "diabetes-rf-rows",
]

_LOADED: dict = {}


def cached(model_dir: str) -> dict:
    """``load`` once per process (for Parsl HTEX workers, which run a shipped function)."""
    if model_dir not in _LOADED:
        _LOADED[model_dir] = load(model_dir)
    return _LOADED[model_dir]


def _examples_module():
    path = Path(os.environ["EVAL_EXAMPLES_PY"])
    spec = importlib.util.spec_from_file_location("eval_examples", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(model_dir: str) -> dict:
    """name -> (one(x) -> output, many(list of x) -> list of outputs)."""
    import joblib
    import numpy as np
    import torch

    torch.set_num_threads(1)
    d = Path(model_dir)
    ex = _examples_module()
    crf = joblib.load(d / "composition-rf.joblib")
    drf = joblib.load(d / "diabetes-rf.joblib")
    cnn = torch.jit.load(str(d / "digits-cnn.pt"))

    def cnn_many(xs):
        with torch.no_grad():
            out = cnn(torch.tensor(np.asarray(xs, dtype=np.float32).reshape(-1, 1, 8, 8)))
        return [row.tolist() for row in out.numpy().reshape(len(xs), -1, 10)]

    def drf_many(xs):
        return drf.predict(np.asarray(xs, dtype=np.float64).reshape(-1, 10)).tolist()

    def crf_many(xs):
        return [crf.predict(np.asarray(x, dtype=np.float64)).tolist() for x in xs]

    def pipe_many(xs):
        return crf.predict(np.array([ex.featurize(f) for f in xs])).tolist()

    table = {
        "noop": lambda xs: list(xs),
        "composition-featurizer": lambda xs: [ex.featurize(f) for f in xs],
        "composition-rf": crf_many,
        "diabetes-rf": drf_many,
        "digits-cnn": cnn_many,
        "composition-pipeline": pipe_many,
        "diabetes-rf-rows": lambda xs: [drf_many(x) for x in xs],  # one call carries many rows
    }
    return {name: (lambda x, many=many: many([x])[0], many) for name, many in table.items()}
