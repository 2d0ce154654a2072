"""Users and groups: the `dlhub-manager user|group` commands, the auth functions behind them, the
users generation a running manager watches, and the bounded token cache. On SQLite and on a real
PostgreSQL (the ``db_url`` fixture)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tracemalloc

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from dlhub.manager.auth import (
    Authenticator,
    UserAdminError,
    add_group,
    add_user,
    groups_of,
    list_users,
    reissue_token,
    revoke_user,
    users_generation,
)
from dlhub.manager.cli import main
from dlhub.manager.store import SCHEMA_VERSION, make_engine, meta_table, migrate


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    migrate(eng)
    yield eng
    eng.dispose()


def cli(db_url: str, tmp_path, *args: str):
    """Run ``dlhub-manager ARGS --home ... --db-url ...`` in-process; return (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, [*args, "--home", str(tmp_path / "home"), "--db-url", db_url])
    return result.exit_code, result.stdout, result.stderr


def test_user_add_prints_a_token_once_that_authenticates(engine, db_url, tmp_path):
    code, out, err = cli(db_url, tmp_path, "user", "add", "alice")
    assert code == 0 and "shown only once" in err
    token = out.strip()
    assert token.startswith("dlh_") and Authenticator(engine).check(token) == ("alice", "user")

    code, out, _ = cli(db_url, tmp_path, "user", "add", "ep-bot", "--role", "endpoint")
    assert code == 0 and Authenticator(engine).check(out.strip()) == ("ep-bot", "endpoint")

    code, out, err = cli(db_url, tmp_path, "user", "add", "alice")  # exists: points to `user token`
    assert code == 1 and "user 'alice' exists" in err and "dlhub-manager user token alice" in err
    assert Authenticator(engine).check(token) == ("alice", "user")  # and nothing changed


@pytest.mark.parametrize(
    "args, message",
    [
        (["user", "add", "b@d"], "bad user name 'b@d'"),
        (["user", "add", "-x"], "No such option"),  # click's own refusal
        (["user", "add", "carol", "--role", "boss"], "'boss' is not one of"),
        (["user", "token", "zed"], "unknown user 'zed'"),
        (["user", "revoke", "zed"], "unknown user 'zed'"),
        (["group", "add", "chem", "--member", "zed"], "unknown user 'zed'"),
        (["group", "add", "c h e m"], "bad group name 'c h e m'"),
        (["group", "remove", "nope"], "unknown group 'nope'"),
    ],
)
def test_bad_input_is_a_clear_error(db_url, tmp_path, args, message):
    code, out, err = cli(db_url, tmp_path, *args)
    assert code != 0 and message in err, (out, err)


def test_user_token_replaces_the_old_one_and_revoke_refuses_it(engine, db_url, tmp_path):
    old = add_user(engine, "alice")
    auth = Authenticator(engine, refresh_s=None)
    assert auth.check(old) == ("alice", "user")  # now cached

    code, out, _ = cli(db_url, tmp_path, "user", "token", "alice")
    assert code == 0
    new = out.strip()
    assert auth.refresh() == {"alice"}  # the manager learns which sessions to close
    assert auth.check(old) is None and auth.check(new) == ("alice", "user")

    code, out, _ = cli(db_url, tmp_path, "user", "revoke", "alice")
    assert code == 0 and "revoked 'alice'" in out
    assert auth.refresh() == {"alice"}
    assert auth.check(new) is None
    assert cli(db_url, tmp_path, "user", "revoke", "alice")[1].strip() == "'alice' was revoked already"

    # `user token` lifts the revocation with a fresh token
    again = reissue_token(engine, "alice")
    auth.refresh()
    assert auth.check(new) is None and auth.check(again) == ("alice", "user")


def test_user_list_shows_roles_revocations_and_groups_never_tokens(engine, db_url, tmp_path):
    tokens = [add_user(engine, "alice"), add_user(engine, "bob"), add_user(engine, "ep-bot", "endpoint")]
    add_group(engine, "chem", ["alice", "bob"])
    revoke_user(engine, "bob")
    code, out, _ = cli(db_url, tmp_path, "user", "list", "--json")
    assert code == 0 and not any(t in out for t in tokens)
    users = {u["name"]: u for u in json.loads(out)}
    assert set(users) == {"alice", "bob", "ep-bot"}
    assert users["alice"]["role"] == "user" and users["alice"]["revoked"] is None
    assert users["bob"]["revoked"] is not None and users["bob"]["groups"] == ["chem"]
    assert users["ep-bot"]["role"] == "endpoint" and users["ep-bot"]["groups"] == []
    assert "token" not in json.dumps(users)

    code, out, _ = cli(db_url, tmp_path, "user", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "CREATED", "REVOKED", "GROUPS"]
    assert lines[1].split()[0] == "alice" and lines[1].endswith("chem")
    assert not any(t in out for t in tokens)


def test_groups_add_members_list_and_remove(engine, db_url, tmp_path):
    for name in ("alice", "bob", "carol"):
        add_user(engine, name)
    code, out, _ = cli(db_url, tmp_path, "group", "add", "chem", "--member", "alice", "--member", "bob")
    assert code == 0 and "created group 'chem'" in out
    assert groups_of(engine, "alice") == groups_of(engine, "bob") == frozenset({"chem"})
    assert groups_of(engine, "carol") == frozenset()

    code, out, _ = cli(db_url, tmp_path, "group", "add", "chem", "--member", "carol", "--member", "alice")
    assert code == 0 and "added carol, alice" in out  # an existing group gains members
    cli(db_url, tmp_path, "group", "add", "bio", "--member", "alice")
    with engine.connect() as conn:  # the connection form, as routing code holding one uses it
        assert groups_of(conn, "alice") == frozenset({"chem", "bio"})

    code, out, _ = cli(db_url, tmp_path, "group", "list", "--json")
    assert {g["name"]: g["members"] for g in json.loads(out)} == {
        "bio": ["alice"],
        "chem": ["alice", "bob", "carol"],
    }
    code, _, err = cli(db_url, tmp_path, "group", "remove", "chem", "--member", "zed")
    assert code == 1 and "not members of group 'chem': zed" in err
    assert cli(db_url, tmp_path, "group", "remove", "chem", "--member", "bob")[0] == 0
    assert groups_of(engine, "bob") == frozenset()
    assert cli(db_url, tmp_path, "group", "remove", "chem")[0] == 0
    assert groups_of(engine, "alice") == frozenset({"bio"})
    assert "chem" not in cli(db_url, tmp_path, "group", "list")[1]


def test_authenticator_groups_are_cached_until_a_change(engine):
    add_user(engine, "alice")
    auth = Authenticator(engine, refresh_s=None)
    assert auth.groups_of("alice") == frozenset()
    add_group(engine, "chem", ["alice"])
    assert auth.groups_of("alice") == frozenset()  # cached: no query per call
    assert auth.refresh() == frozenset()  # a group change closes no session...
    assert auth.groups_of("alice") == frozenset({"chem"})  # ...but drops the cache


def test_rest_authenticator_notices_a_revocation_by_itself_within_its_refresh(engine):
    """The REST API's Authenticator (refresh_s set) has no watcher: check() looks itself."""
    token = add_user(engine, "alice")
    auth = Authenticator(engine, refresh_s=0.2)
    assert auth.check(token) == ("alice", "user")
    revoke_user(engine, "alice")
    time.sleep(0.25)
    assert auth.check(token) is None


def test_every_change_moves_the_users_generation(engine):
    seen = {users_generation(engine)}
    for change in (
        lambda: add_user(engine, "alice"),
        lambda: reissue_token(engine, "alice"),
        lambda: revoke_user(engine, "alice"),
        lambda: add_group(engine, "chem", ["alice"]),
    ):
        change()
        generation = users_generation(engine)
        assert generation not in seen
        seen.add(generation)
    with pytest.raises(UserAdminError):
        add_user(engine, "alice")
    assert users_generation(engine) in seen  # a refused command changes nothing


def test_create_user_keeps_working_as_before(engine, db_url, tmp_path):
    """`dlhub-manager create-user` creates a user, or replaces its token (no error)."""
    home = str(tmp_path / "home")
    run = [
        sys.executable,
        "-m",
        "dlhub.manager.cli",
        "create-user",
        "dave",
        "--home",
        home,
        "--db-url",
        db_url,
    ]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    second = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == second.returncode == 0
    auth = Authenticator(engine)
    assert auth.check(first.stdout.strip()) is None
    assert auth.check(second.stdout.strip()) == ("dave", "user")


def test_many_distinct_wrong_tokens_leave_the_cache_bounded(tmp_path):
    """The attack: 60,000 distinct wrong tokens grew the auth cache by 35 MB (~600 B each).

    12,000 here, twelve times the cap: unbounded, that is ~7 MB; each is a database lookup, so
    the full 60,000 took 40-90 s of the suite and shows nothing more.
    """
    engine = make_engine(f"sqlite:///{tmp_path / 'dlhub.db'}")
    migrate(engine)
    good = add_user(engine, "alice")
    auth = Authenticator(engine, refresh_s=None, max_refused=1000)
    assert auth.check(good) == ("alice", "user")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(12_000):
        assert auth.check(f"dlh_wrong{i:08d}") is None
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    sizes = auth.cache_sizes()
    assert sizes["refused"] <= 1000 and sizes["valid"] == 1
    assert grown < 2 * 2**20, f"the token cache grew by {grown:,} bytes"
    assert auth.check(good) == ("alice", "user")  # the valid token stayed cached


def test_valid_tokens_are_an_lru_of_bounded_size(engine):
    tokens = [add_user(engine, f"u{i}") for i in range(8)]
    auth = Authenticator(engine, refresh_s=None, max_tokens=5)
    for t in tokens:
        assert auth.check(t) is not None
    assert auth.cache_sizes()["valid"] == 5
    assert all(auth.check(t) is not None for t in tokens)  # evicted ones are looked up again


def test_a_schema_4_database_migrates_to_users_revoked_and_groups(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:  # what a schema-4 manager left: users without `revoked`, no groups
        conn.exec_driver_sql(
            "CREATE TABLE users (name VARCHAR(128) PRIMARY KEY, token_sha256 VARCHAR(64) NOT NULL UNIQUE, "
            "role VARCHAR(16) NOT NULL, created FLOAT NOT NULL)"
        )
        conn.exec_driver_sql("CREATE TABLE tasks (task_id INTEGER PRIMARY KEY)")  # not a fresh database
        conn.exec_driver_sql(
            "CREATE TABLE dlhub_meta (key VARCHAR(64) PRIMARY KEY, value VARCHAR(256) NOT NULL)"
        )
        conn.execute(meta_table.insert().values(key="schema_version", value="4"))
        conn.exec_driver_sql("INSERT INTO users VALUES ('old', 'ab', 'user', 1.0)")
    migrate(engine)
    inspector = sa.inspect(engine)
    assert "revoked" in {c["name"] for c in inspector.get_columns("users")}
    assert inspector.has_table("groups") and inspector.has_table("group_members")
    with engine.connect() as conn:
        version = conn.execute(
            sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")
        ).scalar()
    assert int(version) == SCHEMA_VERSION >= 6
    assert [u["name"] for u in list_users(engine)] == ["old"]
    engine.dispose()
