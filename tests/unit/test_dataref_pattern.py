"""A data set reference (``owner/name[:v]/path``) means the same to every regex engine that reads
its pattern: Python's ``re`` (the client, ``protocol.refs.DATAREF``), pydantic-core's Rust regex
(the REST API's ``RefByName``) and hypothesis' generator (what the OpenAPI fuzzer sends). The
path's first character was ``\\S``: a generator that classes U+0085 as a control produced it,
Python and Rust class it as whitespace, and the API refused a reference its own schema allowed
(found by ``tests/fuzz/test_openapi.py`` with one seed in CI)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlhub.manager.datasets_api import RefByName
from dlhub.protocol.refs import DATAREF

PATTERN = next(m.pattern for m in RefByName.model_fields["ref"].metadata if hasattr(m, "pattern"))


@settings(max_examples=1500, suppress_health_check=list(HealthCheck), database=None, deadline=None)
@given(st.from_regex(PATTERN, fullmatch=True))
def test_every_reference_the_schema_allows_is_accepted_by_the_api_and_the_client(ref):
    if len(ref) <= 1000:  # the API's max_length
        assert RefByName(ref=ref).ref == ref
        assert DATAREF.match(ref) is not None


def test_a_path_may_not_start_with_whitespace_or_a_control_character():
    assert DATAREF.match("alice/scans:2/run 1/a b.h5").group("path") == "run 1/a b.h5"
    for bad in (
        "alice/scans/ x",
        "alice/scans/\x85x",
        "alice/scans/\x01x",
        "alice/scans/\xa0x",
        "alice/scans/",
    ):
        assert DATAREF.match(bad) is None, repr(bad)
