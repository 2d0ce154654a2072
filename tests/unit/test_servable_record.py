"""The servable record schema (dlhub.protocol.servable): validation names fields, versions."""

from __future__ import annotations

import pytest

from dlhub.protocol import servable as sv
from dlhub.protocol.servable import RecordError, parse_record, parse_ref

DIGEST = "sha256:" + "ab" * 32

GOOD = {
    "name": "composition-featurizer",
    "title": "Composition featurizer",
    "description": "String -> numeric features",
    "authors": [{"name": "Doe, Jane", "affiliation": "Somewhere", "orcid": "0000-0002-1825-009X"}],
    "domains": ["materials"],
    "keywords": ["featurizer"],
    "license": "MIT",
    "related_identifiers": [{"identifier": "10.1000/xyz", "type": "DOI", "relation": "IsDescribedBy"}],
    "inputs": [{"type": "string", "description": "a chemical formula"}],
    "output": {"type": "ndarray", "shape": [None], "dtype": "float64"},
    "examples": [{"args": ["NaCl"], "output": [1.0, 2.0], "rtol": 1e-6}],
    "kind": "function",
    "entry_point": DIGEST,
    "requirements": ["numpy>=1.26"],
    "environment": {"python": "3.11.7"},
    "deterministic": True,
}


def errors_of(data) -> str:
    with pytest.raises(RecordError) as info:
        parse_record(data)
    return str(info.value)


def test_a_complete_record_validates_and_keeps_every_field():
    rec = parse_record(GOOD)
    assert rec.schema_version == sv.SCHEMA_VERSION
    assert rec.name == "composition-featurizer" and rec.authors[0].orcid == "0000-0002-1825-009X"
    assert rec.output.shape == [None] and rec.output.dtype == "float64"
    assert rec.examples[0].args == ["NaCl"] and rec.examples[0].rtol == 1e-6
    assert rec.ref == "composition-featurizer"
    published = rec.model_copy(update={"owner": "jane", "version": 3})
    assert published.ref == "jane/composition-featurizer:3"
    # a record survives a JSON round trip unchanged (it is stored and sent as JSON)
    assert parse_record(rec.model_dump(mode="json")) == rec


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"name": "Bad Name"}, "name: 'Bad Name' must be lowercase letters"),
        ({"authors": []}, "authors: List should have at least 1 item"),
        ({"title": ""}, "title: String should have at least 1 character"),
        ({"titel": "x"}, "titel: unknown field"),
        ({"kind": "keras"}, "kind: Input should be"),
        (
            {"inputs": [{"type": "string", "shape": [3]}]},
            "inputs.0: shape and dtype apply to type ndarray only",
        ),
        (
            {"examples": [{"args": [], "rtol": -1}]},
            "examples.0.rtol: Input should be greater than or equal to 0",
        ),
        ({"files": {"../escape.py": DIGEST}}, "files: file path '../escape.py' must be relative"),
        ({"files": {"m.py": "md5:abc"}}, "files: file 'm.py' needs a digest like sha256:<64 hex>"),
        ({"kind": "sklearn", "entry_point": "model.joblib:predict"}, "entry_point: names 'model.joblib'"),
        ({"kind": "pipeline"}, "steps: a pipeline needs at least two steps"),
        ({"steps": ["a/b", "c/d"]}, "steps: apply to kind pipeline only, not function"),
        ({"kind": "pipeline", "steps": ["a/b", "nope"]}, "steps: 'nope' is not a servable reference"),
        ({"authors": [{"name": "X", "orcid": "12"}]}, "authors.0.orcid: String should match pattern"),
    ],
)
def test_invalid_records_name_the_field(change, expected):
    assert expected in errors_of({**GOOD, **change})


def test_missing_required_fields_are_each_named():
    message = errors_of({"kind": "function"})
    for field in ("name", "title", "authors", "entry_point"):
        assert f"  {field}: required field is missing" in message


def test_kinds_that_load_files_accept_a_shipped_entry_point():
    rec = parse_record(
        {**GOOD, "kind": "sklearn", "entry_point": "model.joblib:predict", "files": {"model.joblib": DIGEST}}
    )
    assert rec.kind == "sklearn"
    pipe = parse_record({**GOOD, "kind": "pipeline", "steps": ["jane/featurize", "jane/regress:2"]})
    assert pipe.steps == ["jane/featurize", "jane/regress:2"]


def test_schema_versions_newer_are_refused_and_older_are_upgraded(monkeypatch):
    assert "newer than this dlhub understands" in errors_of({**GOOD, "schema_version": sv.SCHEMA_VERSION + 1})
    assert "schema_version must be a positive integer" in errors_of({**GOOD, "schema_version": "1"})
    # a future v2 that renamed a field: v1 records are upgraded on the way in
    v1 = {**GOOD, "schema_version": sv.SCHEMA_VERSION}
    v1["summary"] = v1.pop("description")
    monkeypatch.setattr(
        sv,
        "UPGRADES",
        {
            sv.SCHEMA_VERSION + 1: lambda d: {
                **{k: v for k, v in d.items() if k != "summary"},
                "description": d["summary"],
            }
        },
    )
    monkeypatch.setattr(sv, "SCHEMA_VERSION", sv.SCHEMA_VERSION + 1)
    rec = parse_record(v1)
    assert rec.description == GOOD["description"] and rec.schema_version == sv.SCHEMA_VERSION


def test_a_record_must_be_a_mapping():
    assert "must be a mapping, got list" in errors_of([GOOD])


@pytest.mark.parametrize(
    "ref, parsed",
    [
        ("jane/composition-featurizer", ("jane", "composition-featurizer", None)),
        ("jane/composition-featurizer:1", ("jane", "composition-featurizer", 1)),
        ("jane/composition-featurizer:latest", ("jane", "composition-featurizer", None)),
    ],
)
def test_parse_ref(ref, parsed):
    assert parse_ref(ref) == parsed


@pytest.mark.parametrize("ref", ["composition-featurizer", "jane/", "jane/Name", "jane/x:v1", "/x"])
def test_bad_refs_are_refused(ref):
    with pytest.raises(RecordError, match="is not a servable reference"):
        parse_ref(ref)
