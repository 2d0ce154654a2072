"""Servables at the worker, in-process: output comparison, requirement checks, one loader per kind
(built with the executor's builders, packed as the manager packs them) and ``verify()``; plus the
builders' own validation and example forms."""

from __future__ import annotations

import hashlib
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dlhub.endpoint.servables import (
    LoadedServable,
    cache_root,
    load_package,
    outputs_match,
    unmet_requirements,
)
from dlhub.executor.servable import Servable
from dlhub.protocol.errors import ServableLoadError
from dlhub.protocol.servable import RecordError, pack_package, parse_record, record_digest

META = {"title": "A test servable", "authors": ["Doe, Jane"]}


def double(x):
    return 2 * x


def inverse(x):
    return 1 / x


def count_letters(text):
    return [len(text), sum(c.isupper() for c in text)]


def total(values):
    return float(sum(values))


class Scaler:
    def __init__(self, factor: float):
        self.factor = factor

    def scale(self, values, offset=0.0):
        return [self.factor * v + offset for v in values]


def package(servable: Servable, owner: str = "jane", version: int = 1, steps: list[bytes] = ()) -> bytes:
    """The servable packed as the repository packs a published version."""
    record = {**servable.record, "owner": owner, "version": version}
    return pack_package(record, servable.files, list(steps))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Package files go under tmp_path; sys.path and modules imported from packages are undone."""
    monkeypatch.setenv("DLHUB_SERVABLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]


# ---- outputs_match -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "actual, expected, rtol, atol",
    [
        (1.0 + 1e-9, 1.0, 1e-7, 0.0),
        (100.0, 101.0, 0.01, 0.0),
        (1e-9, 0.0, 1e-7, 1e-8),  # near zero only an absolute tolerance helps
        (2, 2.0, 0.0, 0.0),
        (np.float32(0.1), 0.1, 1e-6, 0.0),
        ([1.0, [2.0, {"a": 3.0000001}]], [1.0, [2.0, {"a": 3.0}]], 1e-6, 0.0),
        ((1, 2), [1, 2], 0.0, 0.0),  # tuples travel as lists
        (np.array([[1.0, 2.0], [3.0, 4.0]]), [[1.0, 2.0], [3.0, 4.0]], 1e-7, 0.0),
        ({"v": np.arange(3)}, {"v": [0, 1, 2]}, 0.0, 0.0),
        (np.int64(7), 7, 0.0, 0.0),
        ("NaCl", "NaCl", 0.0, 0.0),
        (None, None, 0.0, 0.0),
        (True, True, 0.0, 0.0),
        (np.bool_(False), False, 0.0, 0.0),
    ],
)
def test_outputs_that_match(actual, expected, rtol, atol):
    assert outputs_match(actual, expected, rtol, atol) is None


@pytest.mark.parametrize(
    "actual, expected, rtol, atol, problem",
    [
        (1.001, 1.0, 1e-7, 0.0, "output: got 1.001, expected 1.0 (rtol 1e-07, atol 0.0)"),
        (1e-9, 0.0, 1e-7, 0.0, "output: got 1e-09, expected 0.0 (rtol 1e-07, atol 0.0)"),
        (1.5, 1.0, 0.0, 0.4, "output: got 1.5, expected 1.0 (rtol 0.0, atol 0.4)"),
        ([1.0, [2.0, 5.0]], [1.0, [2.0, 4.0]], 1e-7, 0.0, "output[1][1]: got 5.0, expected 4.0"),
        ({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}}, 0.0, 0.0, "output['a']['b'][1]: got 2, expected 3"),
        ([1, 2], [1, 2, 3], 0.0, 0.0, "output: got 2 items, expected 3"),
        ({"a": 1, "c": 2}, {"a": 1, "b": 2}, 0.0, 0.0, "output: keys ['a', 'c'] differ from ['a', 'b']"),
        (np.array([1.0, 2.5]), [1.0, 2.0], 1e-7, 0.0, "output[1]: got 2.5, expected 2.0"),
        (np.zeros((2, 2)), [0.0, 0.0], 0.0, 0.0, "output[0]: got [0.0, 0.0], expected 0.0"),
        ("a", "b", 0.0, 0.0, "output: got 'a', expected 'b'"),
        (None, [1], 0.0, 0.0, "output: got None, expected [1]"),
        (True, False, 0.0, 0.0, "output: got True, expected False"),
        # bools are not numbers with tolerances
        (True, 1.0000001, 0.1, 0.1, "output: got True, expected 1.0000001"),
        (1.0000001, True, 0.1, 0.1, "output: got 1.0000001, expected True"),
    ],
)
def test_outputs_that_differ_say_where(actual, expected, rtol, atol, problem):
    found = outputs_match(actual, expected, rtol, atol)
    assert found is not None and found.startswith(problem)


@pytest.mark.parametrize("actual, expected", [(True, 1), (1, True), (False, 0), (np.bool_(True), 1)])
def test_a_bool_does_not_match_an_int(actual, expected):
    assert outputs_match(actual, expected, 0.0, 0.0) is not None


# ---- unmet_requirements ------------------------------------------------------------------------


def test_unmet_requirements_name_what_is_installed():
    import importlib.metadata

    installed = importlib.metadata.version("pyzmq")
    assert unmet_requirements([]) == []
    assert unmet_requirements(["pyzmq>=1", "pyzmq", "numpy>=1.0,<1000", "PyZMQ>=1"]) == []
    assert unmet_requirements(["pyzmq<1"]) == [f"pyzmq<1 (installed: {installed})"]
    assert unmet_requirements(["not-a-real-package-xyz"]) == ["not-a-real-package-xyz (not installed)"]
    assert unmet_requirements(["not-a-real-package-xyz>=2"]) == ["not-a-real-package-xyz>=2 (not installed)"]
    (bad,) = unmet_requirements(["pyzmq>>=1"])
    assert bad.startswith("'pyzmq>>=1' is not a valid requirement (")
    # a requirement whose marker does not apply here is met
    assert unmet_requirements(['not-a-real-package-xyz; python_version < "3"']) == []
    # every problem is reported, in order
    assert [p.split(" ")[0] for p in unmet_requirements(["pyzmq<1", "pyzmq>=1", "nope-xyz-abc"])] == [
        "pyzmq<1",
        "nope-xyz-abc",
    ]


def test_a_record_with_unmet_requirements_does_not_load():
    servable = Servable.from_function(
        double, name="needs", requirements=["not-a-real-package-xyz>=1", "pyzmq<1", "numpy"], **META
    )
    with pytest.raises(ServableLoadError) as info:
        load_package(package(servable))
    message = str(info.value)
    assert message.startswith("jane/needs:1 needs requirements this endpoint does not meet: ")
    assert "not-a-real-package-xyz>=1 (not installed)" in message and "pyzmq<1 (installed: " in message
    assert "numpy" not in message


# ---- loaders, one per kind ---------------------------------------------------------------------


def test_function_by_value_loads_runs_and_verifies():
    servable = Servable.from_function(double, name="double", examples=[(3, 6), ((2.5,), 5.0)], **META)
    loaded = load_package(package(servable))
    assert isinstance(loaded, LoadedServable) and loaded.record.ref == "jane/double:1"
    assert loaded(21) == 42
    assert loaded.verify() == {"ok": True, "error": None, "examples": 2}
    # a function shipped by value writes its code file under the servable cache
    assert (cache_root() / record_digest(loaded.record) / "function.code").is_file()


def test_verify_reports_the_first_failing_example():
    wrong = Servable.from_function(double, name="double", examples=[(1, 2), (2, 4), (3, 7), (4, 9)], **META)
    report = load_package(package(wrong)).verify()
    assert report == {
        "ok": False,
        "error": "example 2 gave a different output: output: got 6, expected 7 (rtol 1e-07, atol 0.0)",
    }

    raising = Servable.from_function(inverse, name="inverse", examples=[(2, 0.5), (0, 0)], **META)
    report = load_package(package(raising)).verify()
    assert report["ok"] is False
    assert report["error"].startswith("example 1 raised ZeroDivisionError: ")

    tolerant = Servable.from_function(
        inverse, name="inverse", examples=[{"args": [3], "output": 0.3333, "rtol": 1e-3}], **META
    )
    assert load_package(package(tolerant)).verify()["ok"] is True


def test_module_function_loads_from_shipped_files(tmp_path):
    src = tmp_path / "src"
    (src / "helpers_pkg").mkdir(parents=True)
    (src / "helpers_pkg" / "__init__.py").write_text("")
    (src / "helpers_pkg" / "scale.py").write_text("FACTOR = 10\n")
    (src / "featurize_mod_a.py").write_text(
        textwrap.dedent(
            """
            from helpers_pkg.scale import FACTOR

            def featurize(text, upper=False):
                text = text.upper() if upper else text
                return [FACTOR * len(text), sum(c.isupper() for c in text)]
            """
        )
    )
    files = [
        src / "featurize_mod_a.py",
        src / "helpers_pkg" / "__init__.py",
        src / "helpers_pkg" / "scale.py",
    ]
    servable = Servable.from_module(
        "featurize_mod_a:featurize",
        files=files,
        name="featurize",
        examples=[(("NaCl",), [40, 2]), (("nacl",), {"upper": True}, [40, 4])],
        **META,
    )
    assert sorted(servable.files) == ["featurize_mod_a.py", "helpers_pkg/__init__.py", "helpers_pkg/scale.py"]
    loaded = load_package(package(servable))
    assert loaded("ab") == [20, 0]
    assert loaded.verify() == {"ok": True, "error": None, "examples": 2}
    root = Path(cache_root()) / record_digest(loaded.record)
    assert root.is_relative_to(tmp_path / "cache")
    assert (root / "helpers_pkg" / "scale.py").read_text() == "FACTOR = 10\n"
    # loaded again (another worker on the node): the unpacked files are reused
    assert load_package(package(servable))("abc") == [30, 0]

    missing = Servable.from_module("featurize_mod_a:nope", files=files, name="featurize", **META)
    with pytest.raises(ServableLoadError, match="featurize_mod_a has no callable 'nope'"):
        load_package(package(missing, version=2))
    no_attr = Servable.from_module("featurize_mod_a", files=files, name="featurize", **META)
    with pytest.raises(ServableLoadError, match="must be module:function"):
        load_package(package(no_attr, version=3))


def test_two_packages_shipping_the_same_module_name_each_run_their_own_code(tmp_path):
    loaded = []
    for version, factor in ((1, 2), (2, 3)):
        src = tmp_path / f"v{version}"
        src.mkdir()
        (src / "shared_mod_b.py").write_text(f"def run(x):\n    return {factor} * x\n")
        servable = Servable.from_module(
            "shared_mod_b:run", files=[src / "shared_mod_b.py"], name="scaler", examples=[(1, factor)], **META
        )
        loaded.append(load_package(package(servable, version=version)))
    assert [s(10) for s in loaded] == [20, 30]
    assert loaded[1].verify()["ok"] is True


def test_method_of_a_pickled_object():
    servable = Servable.from_method(
        Scaler(2.0),
        "scale",
        name="scaler",
        examples=[(([1.0, 2.0],), [2.0, 4.0]), (([1.0],), {"offset": 0.5}, [2.5])],
        **META,
    )
    assert servable.record["entry_point"] == "object.pkl:scale"
    loaded = load_package(package(servable))
    assert loaded([3.0]) == [6.0]
    assert loaded.verify() == {"ok": True, "error": None, "examples": 2}
    with pytest.raises(ValueError, match="Scaler has no method 'predict'"):
        Servable.from_method(Scaler(1.0), "predict", name="scaler", **META)


def test_sklearn_predicts_one_sample_from_a_1d_input_and_many_from_2d():
    from sklearn.linear_model import LinearRegression

    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 3.0]])
    model = LinearRegression().fit(x, x @ np.array([2.0, 3.0]) + 1.0)  # y = 2 a + 3 b + 1
    servable = Servable.from_sklearn(
        model,
        name="linear",
        inputs=[{"type": "ndarray", "shape": [None], "dtype": "float64"}],
        examples=[
            {"args": [[1.0, 2.0]], "output": 9.0, "atol": 1e-9},  # one sample: one number
            {"args": [[[1.0, 2.0], [0.0, 0.0]]], "output": [9.0, 1.0], "atol": 1e-9},  # a batch
        ],
        **META,
    )
    assert servable.record["requirements"] == ["scikit-learn"]
    assert "scikit-learn" in servable.record["environment"]
    loaded = load_package(package(servable))
    assert loaded.verify() == {"ok": True, "error": None, "examples": 2}
    one = loaded([2.0, 3.0])
    assert np.ndim(one) == 0 and one == pytest.approx(14.0)
    assert np.asarray(loaded([[2.0, 3.0], [1.0, 1.0]])) == pytest.approx([14.0, 6.0])

    wrong = Servable.from_sklearn(
        model, name="linear", examples=[{"args": [[1.0, 2.0]], "output": 10.0}], **META
    )
    error = load_package(package(wrong, version=2)).verify()["error"]
    assert error.startswith("example 0 gave a different output: output: got 9.0")
    with pytest.raises(ValueError, match="method must be predict"):
        Servable.from_sklearn(model, method="fit", name="linear", **META)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torch_script_module():
    import torch  # pinned in the dev install (dlhub[examples]): a broken install fails, not skips

    class Affine(torch.nn.Module):
        def forward(self, x):
            return x * 2.0 + 1.0

    scripted = torch.jit.script(Affine())
    servable = Servable.from_torch(
        scripted,
        name="affine",
        examples=[(([[1.0, 2.0]],), [[3.0, 5.0]]), ((np.array([0.5]),), np.array([2.0]))],
        **META,
    )
    assert servable.record["examples"][1] == {"args": [[0.5]], "output": [2.0]}
    loaded = load_package(package(servable))
    out = loaded([1.0, -1.0])
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.tolist() == [3.0, -1.0]
    assert loaded.verify() == {"ok": True, "error": None, "examples": 2}

    wrong = Servable.from_torch(
        scripted, name="affine", examples=[(([1.0],), [3.0]), (([1.0, 2.0],), [3.0, 6.0])], **META
    )
    assert load_package(package(wrong, version=2)).verify() == {
        "ok": False,
        "error": "example 1 gave a different output: output[1]: got 5.0, expected 6.0 (rtol 1e-07, atol 0.0)",
    }
    with pytest.raises(TypeError, match="from_torch needs TorchScript"):
        Servable.from_torch(Affine(), name="affine", **META)


def test_pipeline_runs_its_step_packages_in_order():
    featurize = Servable.from_function(
        count_letters, name="count-letters", examples=[("NaCl", [4, 2])], **META
    )
    scale = Servable.from_method(Scaler(0.5), "scale", name="half", examples=[(([2.0],), [1.0])], **META)
    add = Servable.from_function(total, name="total", examples=[(([1, 2],), 3.0)], **META)
    steps = [package(featurize, version=1), package(scale, version=4), package(add, owner="bob", version=2)]
    pipe = Servable.pipeline(
        ["jane/count-letters:1", "jane/half:4", "bob/total:2"],
        name="letters-score",
        examples=[("NaCl", 3.0), ("ABc", 2.5)],
        **META,
    )
    assert pipe.files == {} and pipe.record["kind"] == "pipeline"
    loaded = load_package(package(pipe, steps=steps))
    assert loaded("HeLLo") == 4.0  # [5, 3] -> [2.5, 1.5] -> 4.0
    assert loaded.verify() == {"ok": True, "error": None, "examples": 2}

    bad = Servable.pipeline(
        ["jane/count-letters:1", "jane/half:4", "bob/total:2"],
        name="letters-score",
        examples=[("ab", 2.0)],
        **META,
    )
    assert load_package(package(bad, version=2, steps=steps)).verify()["error"] == (
        "example 0 gave a different output: output: got 1.0, expected 2.0 (rtol 1e-07, atol 0.0)"
    )
    # a step whose requirements are unmet stops the whole pipeline from loading
    needy = Servable.from_function(total, name="total", requirements=["not-a-real-package-xyz"], **META)
    with pytest.raises(ServableLoadError, match="bob/total:3 needs requirements .*not-a-real-package-xyz"):
        load_package(package(pipe, version=3, steps=[steps[0], package(needy, owner="bob", version=3)]))


def test_a_package_whose_code_does_not_load_is_a_load_error():
    servable = Servable.from_method(Scaler(1.0), "scale", name="broken", **META)
    servable.files["object.pkl"] = b"not a pickle"
    servable.record["files"]["object.pkl"] = "sha256:" + hashlib.sha256(b"not a pickle").hexdigest()
    with pytest.raises(ServableLoadError, match=r"^jane/broken:1 does not load: "):
        load_package(package(servable))


# ---- builders ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        ({"name": "Bad Name"}, "name: 'Bad Name' must be lowercase"),
        ({"title": ""}, "title: String should have at least 1 character"),
        ({"authors": []}, "authors: List should have at least 1 item"),
        (
            {"examples": [{"args": [1], "rtol": -1}]},
            "examples.0.rtol: Input should be greater than or equal to 0",
        ),
        ({"inputs": [{"type": "tensor"}]}, "inputs.0.type: Input should be"),
    ],
)
def test_builders_refuse_bad_fields_naming_them(change, field):
    with pytest.raises(RecordError) as info:
        Servable.from_function(double, **{"name": "double", **META, **change})
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


def test_builders_accept_the_three_example_forms():
    servable = Servable.from_function(
        double,
        name="double",
        examples=[
            (3, 6),  # one argument, not in a tuple
            ((4,), 8),  # (args, output)
            ((5,), {}, 10),  # (args, kwargs, output)
            ([6], 12),  # a list of args is args too
            {"args": [0.1], "output": 0.2, "rtol": 1e-3, "atol": 1e-9},
        ],
        **META,
    )
    assert servable.record["examples"] == [
        {"args": [3], "output": 6},
        {"args": [4], "output": 8},
        {"args": [5], "output": 10, "kwargs": {}},
        {"args": [6], "output": 12},
        {"args": [0.1], "output": 0.2, "rtol": 1e-3, "atol": 1e-9},
    ]
    rec = parse_record(servable.record)
    assert [e.output for e in rec.examples] == [6, 8, 10, 12, 0.2] and rec.examples[4].rtol == 1e-3
    assert (
        rec.environment["python"]
        == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    )
    with pytest.raises(
        ValueError, match=r"an example is \(args, output\), \(args, kwargs, output\) or a dict"
    ):
        Servable.from_function(double, name="double", examples=[(1, 2, 3, 4)], **META)


def test_numpy_example_values_become_lists():
    servable = Servable.from_function(
        double,
        name="double",
        examples=[
            ((np.array([1.0, 2.0]),), np.array([2.0, 4.0])),
            ((np.arange(4).reshape(2, 2),), {"scale": np.float64(0.5)}, {"sum": np.int64(12), 3: (1, 2)}),
        ],
        **META,
    )
    first, second = servable.record["examples"]
    assert first == {"args": [[1.0, 2.0]], "output": [2.0, 4.0]}
    assert second["args"] == [[[0, 1], [2, 3]]] and second["kwargs"] == {"scale": 0.5}
    assert second["output"] == {"sum": 12, "3": [1, 2]}
    assert type(second["kwargs"]["scale"]) is float and type(second["output"]["sum"]) is int
    import json

    json.dumps(servable.record)  # plain JSON: what Client.publish sends
