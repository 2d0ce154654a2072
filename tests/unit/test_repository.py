"""The servable repository on a real SQLite database and blob directory."""

from __future__ import annotations

import hashlib

import pytest

from dlhub.manager.repository import BlobStore, NotFound, Repository, RepositoryError
from dlhub.manager.store import make_engine, migrate
from dlhub.protocol.servable import RecordError


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def record(name: str, **extra) -> dict:
    return {
        "name": name,
        "title": extra.pop("title", f"The {name} servable"),
        "authors": extra.pop("authors", [{"name": "Doe, Jane"}]),
        "kind": "function",
        "entry_point": "sha256:" + "0" * 64,
        **extra,
    }


@pytest.fixture
def repo(tmp_path, db_url):
    engine = make_engine(db_url)
    migrate(engine)
    t = [1000.0]
    r = Repository(engine, tmp_path / "blobs", clock=lambda: t[0])
    yield r
    engine.dispose()


def test_versions_count_up_and_are_never_reused(repo):
    v1 = repo.publish("jane", record("featurizer"), {})
    v2 = repo.publish("jane", record("featurizer"), {})
    assert (v1.owner, v1.version, v2.version) == ("jane", 1, 2)
    repo.mark_failed("jane", "featurizer", 2, "example 0 gave 3, expected 4")
    repo.delete("jane", "featurizer", 1)
    assert repo.publish("jane", record("featurizer"), {}).version == 3  # 1 and 2 keep their numbers
    assert repo.publish("bob", record("featurizer"), {}).version == 1  # per owner
    assert [(v["version"], v["status"]) for v in repo.versions("jane", "featurizer")] == [
        (1, "deleted"),
        (2, "failed"),
        (3, "pending"),
    ]


def test_only_ready_versions_route(repo):
    repo.publish("jane", record("model"), {})
    with pytest.raises(NotFound, match="there is no ready version of jane/model"):
        repo.get("jane", "model")  # pending is not routable
    repo.mark_ready("jane", "model", 1)
    repo.publish("jane", record("model", title="newer"), {})
    repo.mark_failed("jane", "model", 2, "import failed: No module named 'nope'")
    rec, status, _ = repo.get("jane", "model")
    assert (rec.version, status) == (1, "ready")  # latest *ready*, not the failed v2
    rec2, status2, error2 = repo.get("jane", "model", 2)  # describe shows the failure
    assert (rec2.title, status2) == ("newer", "failed") and "No module named" in error2
    repo.delete("jane", "model", 1)
    with pytest.raises(NotFound):
        repo.get("jane", "model")
    with pytest.raises(NotFound, match="jane/model:1"):
        repo.get("jane", "model", 1)


def test_status_changes_only_from_pending(repo):
    repo.publish("jane", record("m"), {})
    repo.mark_ready("jane", "m", 1)
    with pytest.raises(NotFound, match="is not pending"):
        repo.mark_failed("jane", "m", 1, "late")


def test_files_are_checked_against_the_record_and_stored_by_digest(repo, tmp_path):
    data = b"\x80\x04 a pickled model"
    rec = record(
        "clf", kind="sklearn", entry_point="model.joblib:predict", files={"model.joblib": digest(data)}
    )
    with pytest.raises(RepositoryError, match=r"missing \['model.joblib'\]"):
        repo.publish("jane", rec, {})
    with pytest.raises(RepositoryError, match="unlisted \\['extra.txt'\\]"):
        repo.publish("jane", rec, {"model.joblib": data, "extra.txt": b"x"})
    with pytest.raises(RepositoryError, match="file 'model.joblib' has digest sha256:"):
        repo.publish("jane", rec, {"model.joblib": b"tampered"})
    # nothing stored: no version row, no blob
    with pytest.raises(NotFound, match="there is no servable jane/clf"):
        repo.versions("jane", "clf")
    assert not any((tmp_path / "blobs").rglob("*"))
    published = repo.publish("jane", rec, {"model.joblib": data})
    assert published.version == 1  # the refused publishes took no version number
    assert repo.blobs.get(published.files["model.joblib"]) == data


def test_bad_records_are_refused_with_the_field(repo):
    with pytest.raises(RecordError, match="name: 'Bad Name' must be lowercase"):
        repo.publish("jane", record("Bad Name"), {})


def test_a_publish_interrupted_after_commit_is_failed_at_start(repo):
    repo.publish("jane", record("half"), {})
    repo.publish("jane", record("done"), {})
    repo.mark_ready("jane", "done", 1)
    assert repo.fail_interrupted() == 1
    _, status, error = repo.get("jane", "half", 1)
    assert status == "failed" and "interrupted" in error
    assert repo.get("jane", "done")[1] == "ready"


def test_search_ranks_filters_and_shows_only_latest_ready(repo):
    def ready(owner, rec):
        r = repo.publish(owner, rec, {})
        repo.mark_ready(owner, r.name, r.version)
        return r

    ready(
        "jane",
        record(
            "composition-featurizer",
            title="Composition featurizer",
            description="Turns a chemical formula into numeric features",
            domains=["materials"],
            keywords=["featurizer", "matminer"],
            related_identifiers=[{"identifier": "10.1000/xyz"}],
        ),
    )
    ready("jane", record("composition-featurizer", title="Composition featurizer v2", domains=["materials"]))
    ready(
        "bob",
        record(
            "image-classifier",
            title="CNN image classifier",
            domains=["vision"],
            description="featurizer-free convolutional network",
            authors=[{"name": "Roe, Bob"}],
        ),
    )
    repo.publish("bob", record("featurize-draft", title="draft featurizer"), {})  # pending: hidden

    hits = repo.search("featurizer")
    assert [(h["owner"], h["name"], h["version"]) for h in hits][0] == ("jane", "composition-featurizer", 2)
    assert all(h["status"] == "ready" for h in hits)
    assert ("bob", "featurize-draft") not in {(h["owner"], h["name"]) for h in hits}
    assert len([h for h in hits if h["name"] == "composition-featurizer"]) == 1  # only the latest
    both = repo.search("featurizer", only_latest=False, owner="jane")
    assert [h["version"] for h in both] and sorted(h["version"] for h in both) == [1, 2]
    assert [h["name"] for h in repo.search(domain="vision")] == ["image-classifier"]
    assert [h["name"] for h in repo.search(author="roe, bob")] == ["image-classifier"]
    assert [h["version"] for h in repo.search(related="10.1000/xyz", only_latest=False)] == [1]
    assert repo.search("featuriz")  # prefixes match
    assert repo.search("no-such-word-anywhere") == []
    drafts = repo.search("draft", include_unready=True)
    assert [(h["name"], h["status"]) for h in drafts] == [("featurize-draft", "pending")]
    repo.delete("jane", "composition-featurizer")
    assert "composition-featurizer" not in {h["name"] for h in repo.search("composition")}


def test_search_tolerates_punctuation_and_fts_syntax(repo):
    r = repo.publish("jane", record("m", title="AND OR NOT near"), {})
    repo.mark_ready("jane", "m", r.version)
    assert repo.search('"AND" OR (NOT*) near:') and repo.search("")


def test_blob_store_is_content_addressed_and_idempotent(tmp_path):
    store = BlobStore(tmp_path)
    d1 = store.put(b"hello")
    assert d1 == digest(b"hello") and store.put(b"hello") == d1 and store.has(d1)
    assert store.get(d1) == b"hello"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [d1.removeprefix("sha256:")[2:]]
    with pytest.raises(NotFound):
        store.get(digest(b"absent"))


def test_other_databases_are_refused_clearly(tmp_path):
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    engine.dialect.name = "mysql"  # what a MySQL engine reports
    with pytest.raises(RepositoryError, match="supports SQLite and PostgreSQL, not mysql"):
        Repository(engine, tmp_path / "blobs")
