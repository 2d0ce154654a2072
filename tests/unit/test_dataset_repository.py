"""Data sets in the repository (issue 16, items 1-2), on SQLite and on PostgreSQL: published and
versioned beside servables (one name space, one search index), linked both ways to the servables
trained/validated on them, private ones "not found" for others; the chunked, resumable upload
store (offset and digest checked); a schema-8 database migrated with its servables intact."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa

from dlhub.manager.datasets import get_dataset, linked_datasets, linked_servables, publish_dataset
from dlhub.manager.files import DigestMismatch, FileStore, OffsetMismatch, UploadError
from dlhub.manager.repository import NotFound, Repository, RepositoryError, Viewer
from dlhub.manager.store import make_engine, migrate
from dlhub.protocol.dataset import parse_dataset
from dlhub.protocol.search import SearchParameterError, SearchQuery
from dlhub.protocol.servable import RecordError, parse_record, record_digest

ALICE, BOB = Viewer("alice"), Viewer("bob")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def ds_record(name: str, files: dict[str, bytes], **extra) -> dict:
    return {
        "name": name,
        "title": extra.pop("title", f"The {name} data"),
        "authors": [{"name": "Doe, Jane"}],
        "domains": ["materials science"],
        "files": {p: {"sha256": sha(d), "size": len(d)} for p, d in files.items()},
        **extra,
    }


def servable(name: str, **extra) -> dict:
    return {
        "name": name,
        "title": f"The {name} model",
        "authors": [{"name": "Doe, Jane"}],
        "kind": "function",
        "entry_point": "sha256:" + "0" * 64,
        **extra,
    }


@pytest.fixture
def repo(tmp_path, db_url):
    engine = make_engine(db_url)
    migrate(engine)
    r = Repository(engine, tmp_path / "blobs")
    yield r
    engine.dispose()


def store_bytes(repo: Repository, data: bytes, user: str = "alice") -> str:
    files = FileStore(repo.blobs)
    begun = files.begin(user, len(data), sha(data))
    if not begun["complete"]:
        files.append(user, begun["upload_id"], 0, [data])
        files.finish(user, begun["upload_id"])
    return sha(data)


def test_publish_version_search_and_links_both_ways(repo):
    data = b"x,y\n1,2\n"
    store_bytes(repo, data)
    v1 = publish_dataset(repo, "alice", ds_record("bandgaps", {"train.csv": data}))
    v2 = publish_dataset(repo, "alice", ds_record("bandgaps", {"train.csv": data}, title="Band gaps v2"))
    assert (v1.ref, v2.ref) == ("alice/bandgaps:1", "alice/bandgaps:2")
    assert get_dataset(repo, "alice/bandgaps", None).version == 2  # the latest
    assert [v["version"] for v in repo.versions("alice", "bandgaps", kind="dataset")] == [1, 2]

    # search: data sets only with kind=dataset; servables unaffected
    hits = repo.search(SearchQuery("band", kind="dataset"))
    assert [(h["name"], h["version"], h["file_count"], h["size"]) for h in hits] == [
        ("bandgaps", 2, 1, len(data))
    ]
    assert repo.search(SearchQuery("band")) == []

    # a servable names the data set; the unversioned reference is pinned to the latest version
    linked = servable("gap-model", trained_on=["alice/bandgaps"], validated_on=["alice/bandgaps:1"])
    rec = repo.publish("alice", linked, {}, publisher=ALICE)
    assert rec.trained_on == ["alice/bandgaps:2"] and rec.validated_on == ["alice/bandgaps:1"]
    repo.mark_ready("alice", "gap-model", 1)
    other = repo.publish("alice", servable("other-model"), {})
    repo.mark_ready("alice", "other-model", 1)
    assert record_digest(other) == record_digest(
        parse_record(servable("other-model", owner="alice", version=1))
    )

    by_dataset = repo.search(SearchQuery(dataset="alice/bandgaps"))
    assert [h["name"] for h in by_dataset] == ["gap-model"]
    assert [h["name"] for h in repo.search(SearchQuery(dataset="alice/bandgaps:1"))] == ["gap-model"]
    by_servable = repo.search(SearchQuery(servable="alice/gap-model", kind="dataset", only_latest=False))
    assert sorted(h["version"] for h in by_servable) == [1, 2]

    # describe of either side shows the other
    assert linked_servables(repo, v2, BOB) == [
        {"ref": "alice/gap-model:1", "relation": "trained_on", "status": "ready"}
    ]
    assert [(d["ref"], d["relation"]) for d in linked_datasets(repo, rec, BOB)] == [
        ("alice/bandgaps:2", "trained_on"),
        ("alice/bandgaps:1", "validated_on"),
    ]


def test_private_data_sets_are_not_found_for_others_everywhere(repo):
    data = b"secret"
    store_bytes(repo, data)
    publish_dataset(repo, "alice", ds_record("scans", {"a.bin": data}), visibility="private")
    with pytest.raises(NotFound, match=r"^there is no data set alice/scans$"):
        get_dataset(repo, "alice/scans", BOB)
    assert get_dataset(repo, "alice/scans", ALICE).ref == "alice/scans:1"
    assert repo.search(SearchQuery("scans", kind="dataset"), viewer=BOB) == []
    assert len(repo.search(SearchQuery("scans", kind="dataset"), viewer=ALICE)) == 1

    # bob may not link to it: the same words as for a data set that does not exist
    with pytest.raises(RepositoryError) as hidden:
        repo.publish("bob", servable("m", trained_on=["alice/scans"]), {}, publisher=BOB)
    with pytest.raises(RepositoryError) as missing:
        repo.publish("bob", servable("m", trained_on=["alice/nothing"]), {}, publisher=BOB)
    assert str(hidden.value) == "trained_on 'alice/scans': there is no data set alice/scans"
    assert str(missing.value) == "trained_on 'alice/nothing': there is no data set alice/nothing"

    # shared with bob, he can see it and link to it
    repo.share("alice", "scans", users=["bob"])
    assert repo.publish("bob", servable("m", trained_on=["alice/scans"]), {}, publisher=BOB).trained_on == [
        "alice/scans:1"
    ]
    repo.mark_ready("bob", "m", 1)
    # filters naming something the viewer may not see find nothing (no existence leak)
    repo.unshare("alice", "scans", users=["bob"])
    assert repo.search(SearchQuery(dataset="alice/scans"), viewer=BOB) == []
    assert [h["name"] for h in repo.search(SearchQuery(dataset="alice/scans"), viewer=ALICE)] == ["m"]


def test_bad_input_is_a_clear_error(repo):
    with pytest.raises(RepositoryError, match=r"file 'a.csv' \(sha256:.*\) was not uploaded"):
        publish_dataset(repo, "alice", ds_record("d", {"a.csv": b"never sent"}))
    with pytest.raises(RecordError, match="files: Value error|a data set needs at least one file"):
        publish_dataset(repo, "alice", ds_record("d", {}))
    with pytest.raises(RecordError, match=r"files.a.csv.sha256"):
        parse_dataset({**ds_record("d", {"a.csv": b""}), "files": {"a.csv": {"sha256": "md5:1", "size": 0}}})
    with pytest.raises(RecordError, match=r"must be relative"):
        parse_dataset(ds_record("d", {"../etc/passwd": b""}))
    with pytest.raises(RecordError, match=r"a https location needs url"):
        parse_dataset(
            {
                **ds_record("d", {}),
                "files": {"x": {"sha256": sha(b""), "size": 0, "location": {"type": "https"}}},
            }
        )
    with pytest.raises(RecordError, match=r"is not a data set reference"):
        parse_record(servable("m", trained_on=["not a ref"]))
    with pytest.raises(SearchParameterError, match="kind"):
        SearchQuery(kind="model")
    with pytest.raises(SearchParameterError, match="dataset"):
        SearchQuery(dataset="nope")
    # one name space: a data set and a servable never share owner/name
    repo.publish("alice", servable("taken"), {})
    store_bytes(repo, b"1")
    with pytest.raises(RepositoryError, match="alice/taken is a servable"):
        publish_dataset(repo, "alice", ds_record("taken", {"a": b"1"}))
    # an external location is listed, not uploaded
    ext = {
        "big.h5": {"sha256": sha(b"far"), "size": 3, "location": {"type": "https", "url": "https://x.org/b"}}
    }
    assert publish_dataset(repo, "alice", {**ds_record("ext", {}), "files": ext}).files["big.h5"].location


def test_uploads_resume_check_offsets_and_digests(tmp_path):
    from dlhub.manager.repository import BlobStore

    files = FileStore(BlobStore(tmp_path / "blobs"))
    data = bytes(range(256)) * 1000
    begun = files.begin("alice", len(data), sha(data))
    uid = begun["upload_id"]
    assert begun["offset"] == 0 and not begun["complete"]
    files.append("alice", uid, 0, [data[:1000]])
    with pytest.raises(OffsetMismatch, match="resume at offset 1,000") as wrong:
        files.append("alice", uid, 5, [data[5:10]])
    assert wrong.value.expected == 1000
    with pytest.raises(NotFound, match=f"there is no upload {uid}"):
        files.status("bob", uid)  # another user's upload does not exist for them
    assert FileStore(files.blobs).status("alice", uid)["offset"] == 1000  # survives a new store
    with pytest.raises(UploadError, match="has 1,000 of"):
        files.finish("alice", uid)
    with pytest.raises(UploadError, match="more bytes than the declared size"):
        files.append("alice", uid, 1000, [data[1000:] + b"extra"])
    assert files.status("alice", uid)["offset"] == 1000  # the refused chunk left nothing
    files.append("alice", uid, 1000, [data[1000:]])
    assert files.finish("alice", uid)["sha256"] == sha(data)
    assert files.blobs.path(sha(data)).read_bytes() == data
    assert files.begin("alice", len(data), sha(data))["complete"]  # stored already: nothing to send
    # only for a holder: bob knows the digest, not the bytes, so he must send them (once)
    again = files.begin("bob", len(data), sha(data))
    assert not again["complete"] and not files.holds("bob", sha(data))
    files.append("bob", again["upload_id"], 0, [data])
    assert files.finish("bob", again["upload_id"])["complete"] and files.holds("bob", sha(data))
    assert files.begin("bob", len(data), sha(data))["complete"]
    # read grants: for one digest, unforgeable, expiring
    grant = files.grant("bob", sha(data), ttl_s=60)
    assert files.check_grant(sha(data), grant) == "bob"
    flipped = grant[:-1] + ("1" if grant.endswith("0") else "0")
    for bad in (grant.replace("bob", "eve"), flipped, "", "1.bob.x"):
        with pytest.raises(NotFound):
            files.check_grant(sha(data), bad)
    with pytest.raises(NotFound):
        files.check_grant(sha(b"other"), grant)
    with pytest.raises(NotFound):
        files.check_grant(sha(data), files.grant("bob", sha(data), ttl_s=-1))

    liar = files.begin("alice", 3, sha(b"abc"))["upload_id"]
    files.append("alice", liar, 0, [b"abd"])
    with pytest.raises(DigestMismatch, match="not the declared"):
        files.finish("alice", liar)
    assert not files.blobs.has(sha(b"abd")) and not files.blobs.has(sha(b"abc"))
    with pytest.raises(NotFound):
        files.status("alice", liar)  # discarded
    with pytest.raises(UploadError, match="sha256 must look like"):
        files.begin("alice", 3, "abc")

    # hashed as the chunks arrive; with bytes this store did not see (another process, a restart)
    # it reads the file whole instead
    two = files.begin("alice", 6, sha(b"abcdef"))["upload_id"]
    files.append("alice", two, 0, [b"abc"])
    assert FileStore(files.blobs).append("alice", two, 3, [b"def"])["offset"] == 6
    assert files.finish("alice", two)["sha256"] == sha(b"abcdef")

    # abandoned uploads go at the next start, once older than the TTL
    old = files.begin("alice", 3, sha(b"old"))["upload_id"]
    assert FileStore(files.blobs, ttl_s=3600).status("alice", old)["offset"] == 0
    assert FileStore(files.blobs, clock=lambda: 2e10, ttl_s=3600).expire(3600) == 0  # gone already
    with pytest.raises(NotFound):
        files.status("alice", old)


def test_a_schema_8_database_migrates_with_its_servables(repo):
    engine = repo.engine
    repo.publish("jane", servable("old"), {})
    repo.mark_ready("jane", "old", 1)
    with engine.begin() as conn:  # back to schema 8: no record_type, no dataset_links
        conn.exec_driver_sql("DROP INDEX IF EXISTS ix_servable_versions_record_type")
        conn.exec_driver_sql("ALTER TABLE servable_versions DROP COLUMN record_type")
        conn.exec_driver_sql("DROP TABLE dataset_links")
        conn.exec_driver_sql("UPDATE dlhub_meta SET value = '8' WHERE key = 'schema_version'")
    migrate(engine)
    with engine.connect() as conn:
        assert (
            conn.execute(sa.text("SELECT value FROM dlhub_meta WHERE key='schema_version'")).scalar() == "9"
        )
    fresh = Repository(engine, repo.blobs.root)
    assert fresh.get("jane", "old")[0].ref == "jane/old:1"
    assert [h["name"] for h in fresh.search(SearchQuery("old"))] == ["old"]
    store_bytes(fresh, b"d")
    assert publish_dataset(fresh, "jane", ds_record("new", {"d": b"d"})).ref == "jane/new:1"
