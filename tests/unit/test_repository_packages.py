"""Repository packages: the digest that names a version, resolve() for routing, package() for
endpoints (pipelines carry their pinned steps), the routing generation, and the schema 2 -> 3
migration that added ``servable_versions.digest``. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json

import pytest
import sqlalchemy as sa

from dlhub.manager.repository import NotFound, Repository, RepositoryError, versions_table
from dlhub.manager.store import (
    SCHEMA_VERSION,
    code_table,
    make_engine,
    meta_table,
    metadata,
    migrate,
    tasks_table,
    users_table,
)
from dlhub.protocol.servable import parse_record, record_digest, unpack_package


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def record(name: str, **extra) -> dict:
    return {
        "name": name,
        "title": extra.pop("title", f"The {name} servable"),
        "authors": [{"name": "Doe, Jane"}],
        "kind": "function",
        "entry_point": "model:predict",
        **extra,
    }


def pipeline(name: str, steps: list[str]) -> dict:
    return record(name, kind="pipeline", entry_point="pipeline", steps=steps)


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def repo(engine, tmp_path):
    migrate(engine)
    return Repository(engine, tmp_path / "blobs", clock=lambda: 1000.0)


def ready(repo: Repository, owner: str, rec: dict, files: dict | None = None):
    published = repo.publish(owner, rec, files or {})
    repo.mark_ready(owner, published.name, published.version)
    return published


def stored_row(repo: Repository, owner: str, name: str, version: int):
    t = versions_table
    with repo.engine.connect() as conn:
        return conn.execute(
            sa.select(t.c.digest, t.c.record).where(
                t.c.owner == owner, t.c.name == name, t.c.version == version
            )
        ).one()


# ---- the digest ------------------------------------------------------------------------------


def test_publish_stores_the_digest_of_the_stored_record(repo):
    data = b"def predict(x):\n    return 2 * x\n"
    rec = record(
        "doubler",
        files={"model.py": sha(data)},
        examples=[{"args": [1.5], "output": 3.0, "rtol": 1e-9}],
        requirements=["numpy>=1"],
    )
    published = repo.publish("jane", rec, {"model.py": data})
    row = stored_row(repo, "jane", "doubler", 1)
    stored = parse_record(json.loads(row.record))
    assert stored == published and (stored.owner, stored.version) == ("jane", 1)
    assert row.digest == record_digest(stored) == record_digest(published)
    assert len(row.digest) == 64 and all(c in "0123456789abcdef" for c in row.digest)
    # the same record again is another version, so another digest (it names owner and version)
    repo.publish("jane", rec, {"model.py": data})
    assert stored_row(repo, "jane", "doubler", 2).digest != row.digest


# ---- resolve: what calls may route to ----------------------------------------------------------


def test_resolve_returns_record_and_digest_of_ready_versions_only(repo):
    v1 = ready(repo, "jane", record("model"))
    rec, digest = repo.resolve("jane", "model")
    assert (rec.ref, digest) == ("jane/model:1", stored_row(repo, "jane", "model", 1).digest)
    assert repo.resolve("jane", "model", 1) == (v1, digest)

    repo.publish("jane", record("model", title="pending v2"), {})
    assert repo.resolve("jane", "model")[0].version == 1  # the latest *ready* one
    with pytest.raises(NotFound, match=r"^jane/model:2 is pending: only ready versions run$"):
        repo.resolve("jane", "model", 2)
    repo.mark_failed("jane", "model", 2, "example 0 gave 3, expected 4")
    with pytest.raises(NotFound, match=r"jane/model:2 is failed"):
        repo.resolve("jane", "model", 2)

    v3 = ready(repo, "jane", record("model", title="v3"))
    rec3, digest3 = repo.resolve("jane", "model")
    assert rec3 == v3 and digest3 == stored_row(repo, "jane", "model", 3).digest != digest


def test_resolve_says_why_a_name_does_not_route(repo):
    with pytest.raises(NotFound, match=r"^there is no servable jane/nope$"):
        repo.resolve("jane", "nope")
    repo.publish("jane", record("pending"), {})
    with pytest.raises(NotFound, match=r"^jane/pending has no ready version \(versions are pending\)$"):
        repo.resolve("jane", "pending")
    with pytest.raises(NotFound, match=r"^there is no servable jane/pending:7$"):
        repo.resolve("jane", "pending", 7)

    repo.publish("jane", record("broken"), {})
    repo.mark_failed("jane", "broken", 1, "does not load")
    with pytest.raises(NotFound, match=r"^jane/broken has no ready version \(versions are failed\)$"):
        repo.resolve("jane", "broken")

    ready(repo, "jane", record("gone"))
    ready(repo, "jane", record("gone"))
    repo.delete("jane", "gone", 2)
    assert repo.resolve("jane", "gone")[0].version == 1  # v2 deleted: v1 routes again
    with pytest.raises(NotFound, match=r"^jane/gone:2 was deleted$"):
        repo.resolve("jane", "gone", 2)
    repo.delete("jane", "gone")
    with pytest.raises(NotFound, match=r"^jane/gone was deleted$"):
        repo.resolve("jane", "gone")
    with pytest.raises(NotFound, match=r"^jane/gone:1 was deleted$"):
        repo.resolve("jane", "gone", 1)


# ---- packages ----------------------------------------------------------------------------------


def test_package_round_trips_record_and_file_bytes(repo):
    files = {"model.py": b"def predict(x):\n    return x\n", "weights/w.bin": bytes(range(256)) * 64}
    rec = record("packed", files={path: sha(data) for path, data in files.items()})
    published = repo.publish("jane", rec, files)
    digest = stored_row(repo, "jane", "packed", 1).digest

    unpacked, unpacked_files, steps = unpack_package(repo.package(digest))
    assert unpacked == published and record_digest(unpacked) == digest
    assert unpacked_files == files and steps == []
    assert repo.package("0" * 64) is None  # an unknown digest

    # calls already routed to a version still get its package after it is deleted
    repo.mark_ready("jane", "packed", 1)
    repo.delete("jane", "packed", 1)
    assert unpack_package(repo.package(digest))[1] == files


def test_pipeline_steps_are_pinned_at_publish_and_shipped_inside_its_package(repo):
    feat_py, reg_py = b"def featurize(s):\n    return [len(s)]\n", b"def predict(v):\n    return v\n"
    ready(
        repo,
        "jane",
        record("featurize", files={"f.py": sha(feat_py)}, entry_point="f:featurize"),
        {"f.py": feat_py},
    )
    ready(repo, "bob", record("regress", title="regress v1"))
    ready(
        repo, "bob", record("regress", files={"r.py": sha(reg_py)}, entry_point="r:predict"), {"r.py": reg_py}
    )

    pipe = repo.publish("jane", pipeline("chain", ["jane/featurize", "bob/regress:1"]), {})
    assert pipe.steps == ["jane/featurize:1", "bob/regress:1"]  # unpinned -> latest ready
    stored = parse_record(json.loads(stored_row(repo, "jane", "chain", 1).record))
    assert stored.steps == pipe.steps

    # a newer ready featurizer does not change what the published pipeline runs
    ready(repo, "jane", record("featurize", title="featurize v2"))
    repo.mark_ready("jane", "chain", 1)
    rec, digest = repo.resolve("jane", "chain")
    assert rec.steps == ["jane/featurize:1", "bob/regress:1"]

    unpacked, files, step_blobs = unpack_package(repo.package(digest))
    assert unpacked == rec and files == {}
    steps = [unpack_package(blob) for blob in step_blobs]
    assert [s[0].ref for s in steps] == ["jane/featurize:1", "bob/regress:1"]
    assert steps[0][1] == {"f.py": feat_py} and steps[1][1] == {}
    assert [s[2] for s in steps] == [[], []]
    # each step blob is exactly what the repository serves for that version by itself
    assert step_blobs[0] == repo.package(stored_row(repo, "jane", "featurize", 1).digest)

    # a pipeline of pipelines nests the packages
    outer = repo.publish("jane", pipeline("outer", ["jane/chain", "bob/regress"]), {})
    assert outer.steps == ["jane/chain:1", "bob/regress:2"]
    _, _, outer_steps = unpack_package(repo.package(stored_row(repo, "jane", "outer", 1).digest))
    inner_rec, _, inner_steps = unpack_package(outer_steps[0])
    assert inner_rec.ref == "jane/chain:1" and len(inner_steps) == 2


@pytest.mark.parametrize(
    "setup, step, message",
    [
        (lambda r: None, "jane/absent", "pipeline step 'jane/absent': there is no ready version of it"),
        (lambda r: r.publish("jane", record("a"), {}), "jane/a", "there is no ready version of it"),
        (
            lambda r: r.publish("jane", record("a"), {}),
            "jane/a:1",
            "pipeline step 'jane/a:1' is pending, not ready",
        ),
        (
            lambda r: (r.publish("jane", record("a"), {}), r.mark_failed("jane", "a", 1, "x")),
            "jane/a:1",
            "pipeline step 'jane/a:1' is failed, not ready",
        ),
        (
            lambda r: (ready(r, "jane", record("a")), r.delete("jane", "a", 1)),
            "jane/a:1",
            "pipeline step 'jane/a:1': there is no ready version of it",
        ),
    ],
    ids=["unknown", "pending-latest", "pending-pinned", "failed", "deleted"],
)
def test_pinning_a_step_that_is_not_ready_refuses_the_pipeline(repo, setup, step, message):
    setup(repo)
    ready(repo, "jane", record("ok"))
    with pytest.raises(RepositoryError) as info:
        repo.publish("jane", pipeline("pipe", ["jane/ok", step]), {})
    assert message in str(info.value)
    with pytest.raises(NotFound, match="there is no servable jane/pipe"):
        repo.versions("jane", "pipe")  # nothing was stored


def test_generation_counts_every_status_change(repo):
    g = repo.generation
    repo.publish("jane", record("m"), {})
    repo.publish("jane", record("m"), {})
    assert repo.generation == g  # pending versions do not route: caches stay valid
    repo.mark_ready("jane", "m", 1)
    assert repo.generation == g + 1
    repo.mark_failed("jane", "m", 2, "bad")
    assert repo.generation == g + 2
    repo.delete("jane", "m", 1)
    assert repo.generation == g + 3
    repo.publish("jane", record("m"), {})
    repo.delete("jane", "m")
    assert repo.generation == g + 4


# ---- the schema 2 -> 3 migration -----------------------------------------------------------------

V2_SERVABLE_VERSIONS = """
CREATE TABLE servable_versions (
    owner VARCHAR(128) NOT NULL,
    name VARCHAR(80) NOT NULL,
    version INTEGER NOT NULL,
    status VARCHAR(16) NOT NULL,
    record TEXT NOT NULL,
    error TEXT,
    domains TEXT NOT NULL,
    authors TEXT NOT NULL,
    related TEXT NOT NULL,
    created FLOAT NOT NULL,
    updated FLOAT NOT NULL,
    PRIMARY KEY (owner, name, version)
)
"""


def make_v2_database(engine: sa.Engine, rows: list[dict] = ()) -> None:
    """The tables as a schema-2 manager left them: servable_versions without ``digest``."""
    # the current metadata has the new column: build the old table by hand, the others from it
    metadata.create_all(engine, tables=[tasks_table, code_table, users_table, meta_table])
    with engine.begin() as conn:
        conn.exec_driver_sql(V2_SERVABLE_VERSIONS)
        conn.exec_driver_sql("CREATE INDEX ix_servable_versions_status ON servable_versions (status)")
        conn.execute(meta_table.insert().values(key="schema_version", value="2"))
        for row in rows:
            conn.execute(
                sa.text(
                    "INSERT INTO servable_versions (owner, name, version, status, record, error, domains, "
                    "authors, related, created, updated) VALUES (:owner, :name, :version, :status, :record, "
                    "NULL, '|', '|', '|', 1.0, 1.0)"
                ),
                row,
            )


def columns(engine: sa.Engine, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


def schema_version(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")
        ).scalar()


def test_migrating_a_schema_2_database_adds_the_digest_column(engine, tmp_path):
    old = parse_record(record("legacy")).model_copy(update={"owner": "jane", "version": 1})
    make_v2_database(
        engine,
        [
            {
                "owner": "jane",
                "name": "legacy",
                "version": 1,
                "status": "pending",
                "record": old.model_dump_json(),
            }
        ],
    )
    assert "digest" not in columns(engine, "servable_versions") and schema_version(engine) == "2"

    migrate(engine)
    assert "digest" in columns(engine, "servable_versions")
    assert "ix_servable_versions_digest" in {
        i["name"] for i in sa.inspect(engine).get_indexes("servable_versions")
    }
    assert schema_version(engine) == str(SCHEMA_VERSION)
    assert "options" in columns(engine, "tasks")
    migrate(engine)  # idempotent: a second start changes nothing
    assert schema_version(engine) == str(SCHEMA_VERSION)

    # the old row survived and the repository works on the migrated database
    repo = Repository(engine, tmp_path / "blobs")
    assert [(v["version"], v["status"]) for v in repo.versions("jane", "legacy")] == [(1, "pending")]
    new = repo.publish("jane", record("legacy"), {})
    assert new.version == 2 and stored_row(repo, "jane", "legacy", 2).digest == record_digest(new)


def test_versions_ready_before_the_migration_still_have_a_package(engine, tmp_path):
    old = parse_record(record("legacy")).model_copy(update={"owner": "jane", "version": 1})
    make_v2_database(
        engine,
        [
            {
                "owner": "jane",
                "name": "legacy",
                "version": 1,
                "status": "ready",
                "record": old.model_dump_json(),
            }
        ],
    )
    migrate(engine)
    repo = Repository(engine, tmp_path / "blobs")
    rec, digest = repo.resolve("jane", "legacy")  # routes ...
    assert rec == old
    assert repo.package(digest) is not None  # ... but the endpoint could never fetch it


def test_concurrent_publishes_of_one_name_each_get_their_own_version(repo):
    """Version numbers are max+1: publishes racing for one name retry instead of failing."""
    import threading

    barrier = threading.Barrier(8)
    failures: list[str] = []

    def publish() -> None:
        barrier.wait()
        try:
            repo.publish("jane", record("raced"), {})
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=publish) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failures == []
    assert [v["version"] for v in repo.versions("jane", "raced")] == list(range(1, 9))
