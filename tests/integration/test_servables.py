"""The servable repository end to end on the session stack (``dlhub up``: manager + ``local``
endpoint with 2 workers): publish every kind, verify on the endpoint, route by name and version,
delete, run over REST and from the shell, and search.

The stack is shared by the whole session, so every test publishes under names of its own.
Functions published by value import what they need inside their bodies: they run in worker
processes that cannot import this module.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re

import numpy as np
import pytest
from conftest import RESULT_TIMEOUT_S, meta, wait_until
from servable_fns import (
    OWNER,
    assert_not_routable,
    double,
    featurize,
    halve_non_negative,
    make_scaler,
    shout,
    signal_then_echo,
    tagged,
    triple,
    write_module,
)

from dlhub.executor import PublishError, Servable
from dlhub.protocol.servable import RecordError, parse_record, record_digest

# ---- 1. a round trip for each kind -------------------------------------------------------------


def test_function_by_value_round_trip(client, ex, name):
    servable = Servable.from_function(double, **meta(name, examples=[((3,), 6), ((2.5,), 5.0)]))
    ref = client.publish(servable)
    assert ref == f"{OWNER}/{name}:1"
    info = client.describe(ref)
    assert info["status"] == "ready" and info["error"] is None
    assert info["record"]["kind"] == "function" and info["record"]["owner"] == OWNER
    assert ex.submit(f"{OWNER}/{name}", 21).result(RESULT_TIMEOUT_S) == 42
    assert ex.submit(ref, "ab").result(RESULT_TIMEOUT_S) == "abab"
    assert ex.submit(f"{OWNER}/{name}:latest", 1).result(RESULT_TIMEOUT_S) == 2


def test_module_function_from_shipped_files(client, ex, name, tmp_path):
    helper = write_module(
        tmp_path,
        "helper",
        """
        VOWELS = set("aeiou")

        def vowels(word):
            return sum(c in VOWELS for c in word.lower())
        """,
    )
    main = write_module(
        tmp_path,
        "features",
        f"""
        from {helper.stem} import vowels

        def describe_word(word):
            return {{"length": len(word), "vowels": vowels(word)}}
        """,
    )
    servable = Servable.from_module(
        f"{main.stem}:describe_word",
        files=[main, helper],
        **meta(name, examples=[(("banana",), {"length": 6, "vowels": 3})]),
    )
    assert set(servable.files) == {main.name, helper.name}
    ref = client.publish(servable)
    assert ex.submit(f"{OWNER}/{name}", "Queue").result(RESULT_TIMEOUT_S) == {"length": 5, "vowels": 4}
    assert client.describe(ref)["record"]["entry_point"] == f"{main.stem}:describe_word"


def test_method_of_a_pickled_object_keeps_its_state(client, ex, name):
    scaler = make_scaler(factor=3, offset=-1)
    servable = Servable.from_method(scaler, "apply", **meta(name, examples=[(([1, 2],), [2, 5])]))
    assert servable.record["entry_point"] == "object.pkl:apply"
    client.publish(servable)
    assert ex.submit(f"{OWNER}/{name}", [0, 10]).result(RESULT_TIMEOUT_S) == [-1, 29]
    assert scaler.calls == 0  # the published copy is the one that runs
    with pytest.raises(ValueError, match="no method 'missing'"):
        Servable.from_method(scaler, "missing", **meta(name))


def test_method_of_an_object_whose_class_is_in_the_users_module(client, ex, name, tmp_path, monkeypatch):
    """The class lives in a module of the user's (a file the endpoint cannot import): its source
    travels in the package."""
    path = write_module(
        tmp_path,
        "scaler_mod",
        """
        class Scaler:
            def __init__(self, factor, offset):
                self.factor, self.offset = factor, offset

            def apply(self, values):
                return [self.factor * v + self.offset for v in values]
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(path.stem)
    servable = Servable.from_method(
        module.Scaler(3, -1), "apply", **meta(name, examples=[(([1, 2],), [2, 5])])
    )
    assert f"{path.stem}.py" in servable.files
    client.publish(servable)
    assert ex.submit(f"{OWNER}/{name}", [0, 10]).result(RESULT_TIMEOUT_S) == [-1, 29]


def test_sklearn_model_predicts_for_rows_and_for_one_sample(client, ex, name):
    from sklearn.linear_model import LinearRegression

    x = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 3]], dtype=float)
    y = 1 + 2 * x[:, 0] + 3 * x[:, 1]  # a plane the fit recovers exactly
    model = LinearRegression().fit(x, y)
    example = {"args": [[[2, 1]]], "output": [8.0], "rtol": 1e-6}
    servable = Servable.from_sklearn(model, **meta(name, examples=[example]))
    assert servable.record["requirements"] == ["scikit-learn"]
    assert "scikit-learn" in servable.record["environment"]
    ref = client.publish(servable)
    rows = ex.submit(ref, [[0, 0], [1, 2]]).result(RESULT_TIMEOUT_S)
    assert np.allclose(rows, [1.0, 9.0]) and len(rows) == 2
    one = ex.submit(f"{OWNER}/{name}", [3, 3]).result(RESULT_TIMEOUT_S)
    assert np.ndim(one) == 0 and one == pytest.approx(16.0)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_model_round_trip(client, ex, name):
    import torch  # pinned in the dev install (dlhub[examples]): a broken install fails, not skips

    class Affine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))

        def forward(self, x):
            return x @ self.weight + 1.0

    scripted = torch.jit.script(Affine())
    servable = Servable.from_torch(scripted, **meta(name, examples=[(([[1.0, 1.0]],), [[5.0, 7.0]])]))
    assert servable.record["entry_point"] == "model.pt" and servable.record["requirements"] == ["torch"]
    client.publish(servable)
    out = ex.submit(f"{OWNER}/{name}", [[1, 0], [0, 2]]).result(RESULT_TIMEOUT_S)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.tolist() == [[2.0, 3.0], [7.0, 9.0]]
    with pytest.raises(TypeError, match="TorchScript"):
        Servable.from_torch(Affine(), **meta(name))


def test_pipeline_of_two_published_servables_pins_its_steps(client, ex, name):
    from sklearn.linear_model import LinearRegression

    featurizer, regressor, pipe = f"{name}-feat", f"{name}-reg", f"{name}-pipe"
    client.publish(Servable.from_function(featurize, **meta(featurizer, examples=[(("aab",), [3.0, 2.0])])))
    x = np.array([[1, 0], [2, 1], [3, 0], [4, 2]], dtype=float)
    model = LinearRegression().fit(x, 10 * x[:, 0] + x[:, 1])
    client.publish(Servable.from_sklearn(model, **meta(regressor)))

    servable = Servable.pipeline(
        [f"{OWNER}/{featurizer}", f"{OWNER}/{regressor}"],
        **meta(pipe, examples=[(("banana",), 63.0)]),
    )
    ref = client.publish(servable)
    steps = client.describe(ref)["record"]["steps"]
    assert steps == [f"{OWNER}/{featurizer}:1", f"{OWNER}/{regressor}:1"]
    assert all(re.search(r":\d+$", s) for s in steps)
    assert ex.submit(f"{OWNER}/{pipe}", "aa").result(RESULT_TIMEOUT_S) == pytest.approx(22.0)

    # a new version of a step does not change the pinned pipeline
    client.publish(Servable.from_function(shout, **meta(featurizer)))
    assert ex.submit(f"{OWNER}/{featurizer}", "aa").result(RESULT_TIMEOUT_S) == "AA!"
    assert ex.submit(f"{OWNER}/{pipe}", "aa").result(RESULT_TIMEOUT_S) == pytest.approx(22.0)


def test_pipeline_of_a_missing_step_is_refused(client, name):
    servable = Servable.pipeline([f"{OWNER}/{name}-absent", f"{OWNER}/{name}-absent2"], **meta(name))
    with pytest.raises(ValueError, match="no ready version"):
        client.publish(servable)
    with pytest.raises(RecordError, match="at least two steps"):
        Servable.pipeline([f"{OWNER}/{name}-absent"], **meta(name))


# ---- 2. versions ---------------------------------------------------------------------------------


def test_latest_ready_version_routes_and_pinned_versions_stay(client, ex, name):
    base = f"{OWNER}/{name}"
    assert client.publish(Servable.from_function(double, **meta(name, examples=[((2,), 4)]))) == f"{base}:1"
    assert client.publish(Servable.from_function(triple, **meta(name, examples=[((2,), 6)]))) == f"{base}:2"
    assert ex.submit(base, 5).result(RESULT_TIMEOUT_S) == 15
    assert ex.submit(f"{base}:1", 5).result(RESULT_TIMEOUT_S) == 10
    assert ex.submit(f"{base}:2", 5).result(RESULT_TIMEOUT_S) == 15

    bad = Servable.from_function(double, **meta(name, examples=[((2,), 5)]))
    with pytest.raises(PublishError) as failed:
        client.publish(bad)
    assert failed.value.ref == f"{base}:3"
    assert ex.submit(base, 5).result(RESULT_TIMEOUT_S) == 15  # still v2
    assert_not_routable(ex, f"{base}:3", "failed")
    assert [(v["version"], v["status"]) for v in client.versions(base)] == [
        (1, "ready"),
        (2, "ready"),
        (3, "failed"),
    ]
    described = client.describe(base)
    assert described["status"] == "ready" and described["record"]["version"] == 2
    assert_not_routable(ex, f"{base}:9", "no servable")


# ---- 3. publishing failures leave nothing routable ---------------------------------------------


def test_invalid_metadata_fails_before_upload(client, ex, name):
    with pytest.raises(RecordError, match=r"name: 'Bad_Name' must be lowercase") as exc:
        Servable.from_function(double, **meta("Bad_Name"))
    assert isinstance(exc.value, ValueError)
    with pytest.raises(RecordError, match=r"authors: .*at least 1"):
        Servable.from_function(double, **meta(name, authors=[]))
    servable = Servable.from_function(double, **meta(name))
    servable.record["title"] = ""  # broken after building: publish checks again before uploading
    with pytest.raises(RecordError, match="title"):
        client.publish(servable)
    with pytest.raises(LookupError, match="no servable"):
        client.versions(f"{OWNER}/{name}")
    assert_not_routable(ex, f"{OWNER}/{name}", "no servable")


def test_invalid_record_over_rest_is_422_naming_the_field(rest, ex, name):
    http, auth = rest
    record = {
        "name": name.upper(),
        "title": "Upper case",
        "authors": [{"name": "Doe, Jane"}],
        "kind": "function",
        "entry_point": "mod:fn",
    }
    files = [("files", ("mod.py", b"def fn(x):\n    return x\n", "text/x-python"))]
    r = http.post("/api/v1/servables", data={"record": json.dumps(record)}, files=files, headers=auth)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "invalid-record" and "name:" in body["message"] and name.upper() in body["message"]

    del record["title"]
    record["name"] = name
    r = http.post("/api/v1/servables", data={"record": json.dumps(record)}, files=files, headers=auth)
    assert r.status_code == 422 and set(r.json()) == {"code", "message"}
    assert "title: required field is missing" in r.json()["message"]

    r = http.post("/api/v1/servables", data={"record": "{not json"}, files=files, headers=auth)
    assert r.status_code == 422 and r.json()["code"] == "invalid-record"
    record["title"] = "Fine"
    for field, value in (("owner", "mallory"), ("version", 7)):
        form = {"record": json.dumps({**record, field: value})}
        r = http.post("/api/v1/servables", data=form, files=files, headers=auth)
        assert r.status_code == 422 and "set by the manager" in r.json()["message"]
    form = {"record": json.dumps({**record, "files": {}}), "endpoint": "nowhere"}
    r = http.post("/api/v1/servables", data=form, headers=auth)
    assert (
        r.status_code == 404 and r.json()["code"] == "unknown-endpoint" and "nowhere" in r.json()["message"]
    )
    r = http.post("/api/v1/servables", data={"record": json.dumps(record)}, files=files)  # no token
    assert r.status_code == 401 and r.json()["code"] == "access-denied"
    assert_not_routable(ex, f"{OWNER}/{name}", "no servable")


def test_a_file_listed_but_not_attached_is_400(rest, ex, name):
    http, auth = rest
    source = b"def fn(x):\n    return x\n"
    record = {
        "name": name,
        "title": "Missing file",
        "authors": [{"name": "Doe, Jane"}],
        "kind": "function",
        "entry_point": "mod:fn",
        "files": {"mod.py": "sha256:" + hashlib.sha256(source).hexdigest(), "extra.py": "sha256:" + "0" * 64},
    }
    files = [("files", ("mod.py", source, "text/x-python"))]
    r = http.post("/api/v1/servables", data={"record": json.dumps(record)}, files=files, headers=auth)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "bad-request" and "extra.py" in r.json()["message"]
    assert "missing" in r.json()["message"]

    # an attached file that differs from its recorded digest is refused the same way
    record["files"] = {"mod.py": "sha256:" + "1" * 64}
    r = http.post("/api/v1/servables", data={"record": json.dumps(record)}, files=files, headers=auth)
    assert r.status_code == 400 and "digest" in r.json()["message"]
    r = http.get(f"/api/v1/servables/{OWNER}/{name}/versions", headers=auth)
    assert r.status_code == 404
    assert_not_routable(ex, f"{OWNER}/{name}", "no servable")


def test_client_refuses_a_servable_missing_an_attached_file(client, name, tmp_path):
    path = write_module(tmp_path, "lonely", "def fn(x):\n    return x\n")
    servable = Servable.from_module(f"{path.stem}:fn", files=[path], **meta(name))
    servable.files.clear()
    with pytest.raises(RecordError, match="not attached"):
        client.publish(servable)


def _wrong_example(name, tmp_path):
    return Servable.from_function(double, **meta(name, examples=[((2,), 4), ((3,), 7)]))


def _import_fails(name, tmp_path):
    path = write_module(
        tmp_path,
        "broken",
        """
        raise ImportError("the quux backend is not available")

        def fn(x):
            return x
        """,
    )
    return Servable.from_module(f"{path.stem}:fn", files=[path], **meta(name))


def _unmet_requirement(name, tmp_path):
    return Servable.from_function(
        double, **meta(name, requirements=["definitely-not-installed-pkg>=1"], examples=[((1,), 2)])
    )


def _example_raises(name, tmp_path):
    return Servable.from_function(halve_non_negative, **meta(name, examples=[((-4,), -2.0)]))


@pytest.mark.parametrize(
    "build, reason",
    [
        (_wrong_example, r"example 1 gave a different output: output: got 6, expected 7"),
        (_import_fails, r"ImportError: the quux backend is not available"),
        (_unmet_requirement, r"definitely-not-installed-pkg>=1 \(not installed\)"),
        (_example_raises, r"example 0 raised ValueError: negative input: -4"),
    ],
    ids=["wrong-output", "import-fails", "unmet-requirement", "example-raises"],
)
def test_a_version_that_fails_verification_never_routes(client, ex, name, tmp_path, build, reason):
    servable = build(name, tmp_path)
    with pytest.raises(PublishError, match=reason) as failed:
        client.publish(servable)
    ref = f"{OWNER}/{name}:1"
    assert failed.value.ref == ref
    info = client.describe(ref)
    assert info["status"] == "failed" and re.search(reason, info["error"])
    assert "on endpoint local" in info["error"]
    assert client.versions(f"{OWNER}/{name}")[0]["status"] == "failed"
    assert_not_routable(ex, f"{OWNER}/{name}", "no ready version")
    assert_not_routable(ex, ref, "failed")
    assert name not in [hit["name"] for hit in client.search(name)]


# ---- 4. delete -----------------------------------------------------------------------------------


def test_delete_lets_calls_in_flight_finish_and_refuses_new_ones(client, ex, name, tmp_path):
    base = f"{OWNER}/{name}"
    client.publish(Servable.from_function(signal_then_echo, **meta(name)))
    client.publish(Servable.from_function(tagged, **meta(name, examples=[((1,), ["fast", 1])])))
    assert ex.submit(base, 2).result(RESULT_TIMEOUT_S) == ["fast", 2]

    # deleting the latest of two versions: the name falls back to the other one
    assert client.delete(f"{base}:2") == 1
    assert_not_routable(ex, f"{base}:2", f"{base}:2 was deleted")
    started, release = tmp_path / "started", tmp_path / "release"
    in_flight = ex.submit(base, str(started), str(release), "kept")
    try:
        wait_until(started.exists, RESULT_TIMEOUT_S, what="the slow call to start")
        # deleting the last one while a call runs: that call finishes, new calls are refused
        assert client.delete(base) == 1
        assert_not_routable(ex, base, f"{base} was deleted")
        assert_not_routable(ex, f"{base}:1", "was deleted")
        assert not in_flight.done()
    finally:
        release.touch()  # never leave a worker waiting
    assert in_flight.result(RESULT_TIMEOUT_S) == ["slow", "kept"]
    assert [v["status"] for v in client.versions(base)] == ["deleted", "deleted"]
    with pytest.raises(LookupError, match="nothing to delete"):
        client.delete(base)
    with pytest.raises(LookupError):
        client.describe(base)


def test_deleting_an_older_version_keeps_the_latest(client, ex, name):
    base = f"{OWNER}/{name}"
    client.publish(Servable.from_function(double, **meta(name)))
    client.publish(Servable.from_function(triple, **meta(name)))
    assert client.delete(f"{base}:1") == 1
    assert ex.submit(base, 3).result(RESULT_TIMEOUT_S) == 9
    assert ex.submit(f"{base}:2", 3).result(RESULT_TIMEOUT_S) == 9
    assert_not_routable(ex, f"{base}:1", "was deleted")
    # a new version after deletions gets a fresh number; numbers are never reused
    assert client.publish(Servable.from_function(double, **meta(name))) == f"{base}:3"
    assert ex.submit(base, 3).result(RESULT_TIMEOUT_S) == 6


# ---- 5. the endpoint's package cache ---------------------------------------------------------------


def test_endpoint_keeps_the_package_on_disk(stack, client, ex, name):
    ref = client.publish(Servable.from_function(triple, **meta(name, examples=[((1,), 3)])))
    assert ex.submit(ref, 2).result(RESULT_TIMEOUT_S) == 6
    digest = record_digest(parse_record(client.describe(ref)["record"]))
    cache = stack.home / "endpoints" / "local" / "servables"
    package = cache / f"{digest}.pkg"
    wait_until(package.exists, 10, what=f"{package} to be written")
    assert package in set(cache.glob("*.pkg"))
    assert package.read_bytes()[0] == 0x20  # the package header
    assert not list(cache.glob("*.tmp*"))


# ---- regressions of bugs found while writing these tests ---------------------------------------


def test_describe_skips_a_deleted_latest_version(client, name):
    with pytest.raises(PublishError):
        client.publish(Servable.from_function(double, **meta(name, examples=[((1,), 3)])))
    client.publish(Servable.from_function(double, **meta(name)))
    client.delete(f"{OWNER}/{name}:2")
    info = client.describe(f"{OWNER}/{name}")
    assert info["status"] == "failed" and info["record"]["version"] == 1


def test_a_nameless_requirement_is_a_record_error_naming_the_field(name):
    with pytest.raises(RecordError, match="requirements"):
        Servable.from_function(double, **meta(name, requirements=[">=1"]))
