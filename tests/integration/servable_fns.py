"""What the servable integration tests share: functions published by value (they import what
they need inside their bodies: workers cannot import this module) and small helpers."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest
from conftest import RESULT_TIMEOUT_S

from dlhub.executor import ServableNotFound

OWNER = "admin"  # the user of the token `dlhub up` writes

# ---- functions published by value --------------------------------------------------------------


def double(x):
    return 2 * x


def triple(x):
    return 3 * x


def shout(word):
    return word.upper() + "!"


def featurize(word):
    return [float(len(word)), float(word.count("a"))]


def halve_non_negative(x):
    if x < 0:
        raise ValueError(f"negative input: {x}")
    return x / 2


def half_steps(n):
    import numpy as np

    return np.arange(n) * 0.5


def signal_then_echo(started, release, value, limit_s=60.0):
    """Mark that the call started, then wait (bounded) for ``release``: a call in flight."""
    import os
    import time

    open(started, "w").close()
    deadline = time.monotonic() + limit_s
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)
    return ["slow", value]


def tagged(value):
    return ["fast", value]


def make_scaler(factor, offset):
    """The same, of a class defined in a function (as in a notebook): dill ships it by value."""

    class LocalScaler:
        def __init__(self, factor, offset):
            self.factor, self.offset = factor, offset
            self.calls = 0

        def apply(self, values):
            self.calls += 1
            return [self.factor * v + self.offset for v in values]

    return LocalScaler(factor, offset)


# ---- fixtures and helpers ----------------------------------------------------------------------


def assert_not_routable(ex, ref: str, match: str = "") -> None:
    with pytest.raises(ServableNotFound, match=match):
        ex.submit(ref, 1).result(RESULT_TIMEOUT_S)


def write_module(directory: Path, prefix: str, source: str) -> Path:
    """A .py file whose module name is new to every process (so only the shipped copy imports)."""
    path = directory / f"{prefix}_{uuid.uuid4().hex[:10]}.py"
    path.write_text(textwrap.dedent(source))
    return path
