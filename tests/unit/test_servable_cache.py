"""The worker's servable cache is private and checked: a folder someone else may write is
refused, an unpacked package is verified against the record's file digests before anything in
it is imported (an altered or planted tree is unpacked again from the package's bytes), and a
package that does not match its own record, or a cached copy of another package, is refused."""

from __future__ import annotations

import os
import sys

import pytest

from dlhub.endpoint import servables
from dlhub.endpoint.servables import cache_root, load_package
from dlhub.executor.servable import Servable
from dlhub.protocol.errors import ServableLoadError
from dlhub.protocol.serialize import serialize_function
from dlhub.protocol.servable import pack_package, parse_record, record_digest

META = {"title": "A test servable", "authors": ["Doe, Jane"]}


def double(x):
    return 2 * x


def evil(x):
    return "planted"


def package(servable: Servable) -> tuple[bytes, str]:
    record = {**servable.record, "owner": "jane", "version": 1}
    return pack_package(record, servable.files, []), record_digest(parse_record(record))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DLHUB_SERVABLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(servables, "_checked_roots", set(), raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_a_planted_tree_at_the_digest_path_is_not_what_runs(capfd):
    """The attack: the digest path is computable, so a file planted there ran instead."""
    blob, digest = package(Servable.from_function(double, name="double", **META))
    planted = cache_root() / digest
    planted.mkdir(parents=True)
    (planted / "function.code").write_bytes(serialize_function(evil))
    assert load_package(blob)(21) == 42
    assert "was altered" in capfd.readouterr().err
    # an extra module beside the right files (it could shadow an import) is refused the same way
    (planted / "numpy.py").write_text("raise SystemExit('planted')\n")
    assert load_package(blob)(2) == 4
    assert not (planted / "numpy.py").exists()


def test_a_package_that_does_not_match_its_record_is_refused():
    servable = Servable.from_function(double, name="double", **META)
    servable.files["function.code"] = serialize_function(evil)  # the record names the real one
    blob, _ = package(servable)
    with pytest.raises(ServableLoadError, match="does not match its record: function.code differs"):
        load_package(blob)


def test_a_cached_package_copy_must_be_the_package_named():
    blob, digest = package(Servable.from_function(double, name="double", **META))
    other, _ = package(Servable.from_function(evil, name="evil", **META))
    with pytest.raises(ServableLoadError, match="holds another record"):
        load_package(other, digest)
    assert load_package(blob, digest)(1) == 2


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_cache_folder_others_may_write_is_refused(tmp_path, monkeypatch, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    monkeypatch.setenv("DLHUB_SERVABLE_CACHE", str(shared))
    blob, _ = package(Servable.from_function(double, name="double", **META))
    with pytest.raises(ServableLoadError, match=r"\$DLHUB_SERVABLE_CACHE .* may be written by others"):
        load_package(blob)


def test_a_cache_folder_is_created_private(tmp_path, monkeypatch):
    monkeypatch.setenv("DLHUB_SERVABLE_CACHE", str(tmp_path / "new" / "cache"))
    old = os.umask(0)  # whatever the umask, the folder is 0700
    try:
        assert (cache_root().stat().st_mode & 0o777) == 0o700
    finally:
        os.umask(old)


def test_the_endpoint_folder_is_the_default_and_the_variable_overrides_it(tmp_path, monkeypatch):
    monkeypatch.delenv("DLHUB_SERVABLE_CACHE")
    monkeypatch.setattr(servables, "_configured_root", None)
    servables.set_cache_root(tmp_path / "ep" / "servables" / "unpacked")
    assert cache_root() == tmp_path / "ep" / "servables" / "unpacked"
    monkeypatch.setenv("DLHUB_SERVABLE_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
