"""Visibility and shares in the repository (schema 7), on SQLite and PostgreSQL: private
servables are found only by their owner, admins, the users and the members of the groups they are
shared with; pipelines pin only steps their publisher may see; the routing generation moves on
every change (so cached name resolution and access checks are dropped)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from dlhub.manager.repository import (
    NotFound,
    Repository,
    RepositoryError,
    Viewer,
    access_table,
    shares_table,
)
from dlhub.manager.store import make_engine, migrate
from dlhub.protocol.servable import RecordError, record_digest


def record(name: str, **extra) -> dict:
    return {
        "name": name,
        "title": f"The {name} servable",
        "authors": [{"name": "Doe, Jane"}],
        "kind": "function",
        "entry_point": "model:predict",
        "keywords": ["sharing"],
        **extra,
    }


@pytest.fixture
def repo(db_url, tmp_path):
    engine = make_engine(db_url)
    migrate(engine)
    yield Repository(engine, tmp_path / "blobs", clock=lambda: 1000.0)
    engine.dispose()


def ready(repo: Repository, owner: str, rec: dict, **kwargs):
    published = repo.publish(owner, rec, {}, **kwargs)
    repo.mark_ready(owner, published.name, published.version)
    return published


BOB = Viewer("bob")
CAROL = Viewer("carol", groups=frozenset({"chem"}))
ADMIN = Viewer("root", admin=True)
ALICE = Viewer("alice")


def found(repo: Repository, viewer: Viewer | None) -> list[str]:
    return sorted(f"{h['owner']}/{h['name']}" for h in repo.search("sharing", viewer=viewer, limit=500))


def test_private_servables_are_found_only_by_those_who_may_see_them(repo):
    ready(repo, "alice", record("secret"), visibility="private")
    ready(repo, "alice", record("open"))
    assert repo.access("alice", "secret").visibility == "private"
    assert repo.access("alice", "open").visibility == "public"  # the default, as before
    assert found(repo, BOB) == ["alice/open"]
    assert found(repo, CAROL) == ["alice/open"]
    for who in (ALICE, ADMIN, None):
        assert found(repo, who) == ["alice/open", "alice/secret"]

    repo.share("alice", "secret", users=["bob"])
    assert found(repo, BOB) == ["alice/open", "alice/secret"]
    assert found(repo, CAROL) == ["alice/open"]
    repo.share("alice", "secret", groups=["chem"])
    repo.share("alice", "secret", users=["bob"], groups=["chem"])  # again: no duplicates
    assert repo.access("alice", "secret").as_dict() == {
        "visibility": "private",
        "users": ["bob"],
        "groups": ["chem"],
    }
    assert found(repo, CAROL) == ["alice/open", "alice/secret"]
    assert found(repo, Viewer("dave", groups=frozenset({"bio", "chem"}))) == ["alice/open", "alice/secret"]

    repo.unshare("alice", "secret", users=["bob"])
    assert found(repo, BOB) == ["alice/open"]
    assert found(repo, CAROL) == ["alice/open", "alice/secret"]

    repo.set_visibility("alice", "secret", "public")
    assert found(repo, BOB) == ["alice/open", "alice/secret"]


def test_access_rules(repo):
    ready(repo, "alice", record("secret"), visibility="private")
    access = repo.access("alice", "secret")
    assert access.allows("alice", ALICE) and access.allows("alice", ADMIN)
    assert not access.allows("alice", BOB) and not access.allows("alice", CAROL)
    access = repo.share("alice", "secret", groups=["chem"])
    assert access.allows("alice", CAROL) and not access.allows("alice", BOB)


def test_visibility_is_not_part_of_the_record_and_survives_new_versions(repo):
    first = ready(repo, "alice", record("secret"), visibility="private")
    twin = ready(repo, "carl", record("secret"))  # public
    assert "visibility" not in first.model_dump()
    # the same record published private and public: one digest (it names the package)
    assert record_digest(first.model_copy(update={"owner": "x"})) == record_digest(
        twin.model_copy(update={"owner": "x"})
    )
    ready(repo, "alice", record("secret"))  # a new version without visibility keeps it private
    assert repo.access("alice", "secret").visibility == "private"
    ready(repo, "alice", record("secret"), visibility="public")
    assert repo.access("alice", "secret").visibility == "public"


def test_a_private_publish_is_private_in_the_same_transaction(repo):
    published = repo.publish("alice", record("secret"), {}, visibility="private")
    with repo.engine.connect() as conn:
        rows = conn.execute(sa.select(access_table.c.visibility).where(access_table.c.name == "secret")).all()
    assert [r.visibility for r in rows] == ["private"] and published.version == 1


def test_bad_visibility_and_unknown_servables_are_refused(repo):
    with pytest.raises(RecordError, match="visibility must be 'public' or 'private', got 'secret'"):
        repo.publish("alice", record("x"), {}, visibility="secret")
    with pytest.raises(NotFound, match="there is no servable alice/x"):
        repo.versions("alice", "x")  # nothing was stored
    for call in (
        lambda: repo.share("alice", "nope", users=["bob"]),
        lambda: repo.unshare("alice", "nope", users=["bob"]),
        lambda: repo.set_visibility("alice", "nope", "private"),
    ):
        with pytest.raises(NotFound, match="^there is no servable alice/nope$"):
            call()
    ready(repo, "alice", record("x"))
    with pytest.raises(RecordError, match="got 'hidden'"):
        repo.set_visibility("alice", "x", "hidden")


def test_a_pipeline_pins_only_steps_its_publisher_may_see(repo):
    ready(repo, "alice", record("secret"), visibility="private")
    ready(repo, "bob", record("mine"))
    pipe = record("pipe", kind="pipeline", entry_point="pipeline", steps=["bob/mine", "alice/secret"])
    with pytest.raises(RepositoryError) as hidden:
        repo.publish("bob", pipe, {}, publisher=BOB)
    missing = record("pipe", kind="pipeline", entry_point="pipeline", steps=["bob/mine", "alice/absent"])
    with pytest.raises(RepositoryError) as absent:
        repo.publish("bob", missing, {}, publisher=BOB)
    # the same words as a step that does not exist
    assert str(hidden.value) == str(absent.value).replace("alice/absent", "alice/secret")
    assert str(hidden.value) == "pipeline step 'alice/secret': there is no ready version of it"
    repo.share("alice", "secret", users=["bob"])
    assert repo.publish("bob", pipe, {}, publisher=BOB).steps == ["bob/mine:1", "alice/secret:1"]


def test_every_change_moves_the_routing_generation(repo):
    ready(repo, "alice", record("secret"))
    for change in (
        lambda: repo.set_visibility("alice", "secret", "private"),
        lambda: repo.share("alice", "secret", users=["bob"]),
        lambda: repo.unshare("alice", "secret", users=["bob"]),
        lambda: repo.publish("alice", record("secret"), {}, visibility="public"),
    ):
        before = repo.generation
        change()
        assert repo.generation > before


def test_schema_7_tables_exist_after_migrate(repo):
    inspector = sa.inspect(repo.engine)
    assert inspector.has_table(access_table.name) and inspector.has_table(shares_table.name)
