"""Sharing servables on a real manager + endpoint (item 5 of issue 10), with three ordinary users:
alice publishes a private servable; for bob it is "not found" everywhere, in the same words as a
servable that does not exist (search over REST, ``Client`` and ``dlhub search``; describe;
versions; run over REST and through the Executor; delete; per-servable metrics and ``dlhub
status``; pipelines); shared with bob he can run it, unshared it is gone again; shared with a
group its members can run it. A servable published without ``visibility`` stays public.

Functions published by value import what they need inside their bodies.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import RESULT_TIMEOUT_S, dlhub_cli, start_custom_stack, stop_custom_stack, wait_until

from dlhub.executor import AccessDenied, Client, Servable, ServableNotFound
from dlhub.executor.client import NotFoundError
from dlhub.manager.auth import add_group, create_user

USERS = ("alice", "bob", "carol")


def secret_sauce(x):
    return f"secret:{x}"


def plus_one(x):
    return x + 1


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A manager + endpoint ``custom`` that alice, bob and carol may submit to; carol is in
    group ``chem``; each user has a home (config.json) for the CLI."""
    root = tmp_path_factory.mktemp("dlhub-sharing")
    cs = start_custom_stack(root, endpoint={"policy": {"allowed_users": list(USERS)}}, workers=1)
    try:
        engine = cs.manager.auth.engine
        cs.tokens = {user: create_user(engine, user) for user in USERS}
        add_group(engine, "chem", ["carol"])
        cs.rest_url = cs.manager.api.url
        cs.homes = {}
        for user in (*USERS, "admin"):
            home = root / f"home-{user}"
            home.mkdir()
            config = {
                "manager": cs.manager.client_url,
                "rest_url": cs.rest_url,
                "token": cs.tokens.get(user, cs.token),
                "default_endpoint": cs.endpoint_name,
            }
            (home / "config.json").write_text(json.dumps(config))
            cs.homes[user] = home
        yield cs
    finally:
        stop_custom_stack(cs)


def client(hub, user: str) -> Client:
    return Client(hub.rest_url, hub.tokens.get(user, hub.token))


def http(hub, user: str) -> httpx.Client:
    token = hub.tokens.get(user, hub.token)
    return httpx.Client(base_url=hub.rest_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def cli(hub, user: str, *args: str):
    return dlhub_cli(*args, "--home", str(hub.homes[user]))


def run_as(hub, user: str, ref: str, *args):
    ex = hub.executor(token=hub.tokens[user])
    try:
        return ex.submit(ref, *args).result(RESULT_TIMEOUT_S)
    finally:
        ex.shutdown(wait=False)


def absent_twin(ref: str) -> tuple[str, str]:
    """A name under the same owner that does not exist, and ``ref`` -> it for comparing messages."""
    owner, name = ref.split("/")
    return f"{owner}/nothing-{uuid.uuid4().hex[:8]}", name


def same_words(hidden: Exception | str, absent: Exception | str, absent_ref: str, ref: str) -> None:
    assert str(hidden) == str(absent).replace(absent_ref, ref), (str(hidden), str(absent))


def servable_labels(status: dict) -> set[str]:
    return {
        label
        for ep in status["endpoints"].values()
        for label in ((ep.get("info") or {}).get("servables") or {})
    }


@pytest.fixture(scope="module")
def secret(hub):
    """alice/secret-model, private, run once by alice (so the endpoint counts it)."""
    alice = client(hub, "alice")
    s = Servable.from_function(
        secret_sauce,
        name="secret-model",
        title="Alice's secret model",
        authors=["Doe, Alice"],
        keywords=["sharingtest"],
        examples=[((1,), "secret:1")],
        visibility="private",
    )
    ref = alice.publish(s, endpoint=hub.endpoint_name)
    assert ref == "alice/secret-model:1"
    assert run_as(hub, "alice", "alice/secret-model", 2) == "secret:2"
    return "alice/secret-model"


def assert_hidden_from(hub, user: str, ref: str) -> None:
    """``ref`` is not found for ``user`` everywhere, in the words used for a servable that does
    not exist."""
    absent, name = absent_twin(ref)
    c = client(hub, user)
    # search: REST, Client, CLI
    assert not [h for h in c.search("sharingtest", limit=500) if h["name"] == name]
    with http(hub, user) as h:
        body = h.get("/api/v1/servables", params={"q": "sharingtest", "limit": 500}).json()
        assert name not in {r["name"] for r in body["results"]}
        # describe, versions, REST run, delete: 404 with the same message as for `absent`
        for method, path, kwargs in (
            ("GET", "", {}),
            ("GET", "/versions", {}),
            ("POST", "/run", {"json": {"args": [1], "endpoint": hub.endpoint_name}}),
            ("DELETE", "", {}),
            ("DELETE", "/1", {}),
        ):
            hidden = h.request(method, f"/api/v1/servables/{ref}{path}", **kwargs)
            missing = h.request(method, f"/api/v1/servables/{absent}{path}", **kwargs)
            assert hidden.status_code == missing.status_code == 404, (method, path, hidden.text)
            assert hidden.json()["code"] == missing.json()["code"]
            same_words(hidden.json()["message"], missing.json()["message"], absent, ref)
    found = cli(hub, user, "search", "sharingtest", "--json")
    assert found.returncode == 0 and name not in found.stdout
    for command in (("describe",), ("versions",)):
        hidden_cli, missing_cli = cli(hub, user, *command, ref), cli(hub, user, *command, absent)
        assert hidden_cli.returncode == missing_cli.returncode == 1
        same_words(hidden_cli.stderr, missing_cli.stderr, absent, ref)
    # Client and Executor
    for call in (c.describe, c.versions, c.delete):
        with pytest.raises(NotFoundError) as hidden_exc:
            call(ref)
        with pytest.raises(NotFoundError) as missing_exc:
            call(absent)
        same_words(hidden_exc.value, missing_exc.value, absent, ref)
    with pytest.raises(ServableNotFound) as hidden_exc:
        c.run(ref, 1, endpoint=hub.endpoint_name)
    with pytest.raises(ServableNotFound) as missing_exc:
        c.run(absent, 1, endpoint=hub.endpoint_name)
    same_words(hidden_exc.value, missing_exc.value, absent, ref)
    with pytest.raises(ServableNotFound) as hidden_exc:
        run_as(hub, user, ref, 1)
    with pytest.raises(ServableNotFound) as missing_exc:
        run_as(hub, user, absent, 1)
    same_words(hidden_exc.value, missing_exc.value, absent, ref)
    with pytest.raises(ServableNotFound, match=f"there is no servable {ref}:1$"):
        run_as(hub, user, f"{ref}:1", 1)
    # sharing it is not theirs to do, and says nothing more
    with pytest.raises(NotFoundError) as hidden_exc:
        c.share(ref, users=[user])
    with pytest.raises(NotFoundError) as missing_exc:
        c.share(absent, users=[user])
    same_words(hidden_exc.value, missing_exc.value, absent, ref)


def test_a_private_servable_is_not_found_for_others_everywhere(hub, secret):
    assert_hidden_from(hub, "bob", secret)
    assert_hidden_from(hub, "carol", secret)
    # the owner and an admin see it, with its visibility; the owner sees the shares
    info = client(hub, "alice").describe(secret)
    assert info["visibility"] == "private" and info["shares"] == {"users": [], "groups": []}
    assert client(hub, "admin").describe(secret)["visibility"] == "private"
    assert [h["name"] for h in client(hub, "alice").search("sharingtest")] == ["secret-model"]
    assert run_as(hub, "alice", secret, 3) == "secret:3"


def test_metrics_and_status_list_only_servables_the_caller_may_see(hub, secret):
    label = "alice/secret-model:1"

    def metrics(user: str) -> tuple[dict, str]:
        with http(hub, user) as h:
            return h.get("/api/v1/metrics").json(), h.get("/metrics").text

    # the endpoint reports its per-servable counts at its next heartbeat
    wait_until(lambda: label in servable_labels(metrics("alice")[0]), 30, what="the servable's counters")
    as_admin, prometheus = metrics("admin")
    assert label in servable_labels(as_admin) and label in prometheus
    as_bob, prometheus = metrics("bob")
    assert label not in servable_labels(as_bob) and "secret-model" not in prometheus
    assert as_bob["received"] >= 1  # totals are still shown
    # `dlhub status` (ZeroMQ) the same
    shown = cli(hub, "bob", "status", "--json", "--endpoint", hub.endpoint_name)
    assert shown.returncode == 0, shown.stderr
    assert label not in servable_labels(json.loads(shown.stdout)) and "secret-model" not in shown.stdout
    shown = cli(hub, "alice", "status", "--json", "--endpoint", hub.endpoint_name)
    assert label in servable_labels(json.loads(shown.stdout))


def test_share_and_unshare_with_a_user(hub, secret):
    alice = client(hub, "alice")
    access = alice.share(secret, users=["bob"])
    assert access == {"servable": secret, "visibility": "private", "users": ["bob"], "groups": []}
    try:
        assert run_as(hub, "bob", secret, 4) == "secret:4"
        assert client(hub, "bob").run(secret, 5, endpoint=hub.endpoint_name) == "secret:5"
        assert "secret-model" in {h["name"] for h in client(hub, "bob").search("sharingtest")}
        info = client(hub, "bob").describe(secret)
        assert info["visibility"] == "private" and "shares" not in info  # shares: for the owner
        # bob may see it but it is not his: 403, not 404
        with pytest.raises(AccessDenied):
            client(hub, "bob").share(secret, users=["carol"])
        with pytest.raises(AccessDenied):
            client(hub, "bob").delete(secret)
        assert alice.access(secret)["users"] == ["bob"]
        described = cli(hub, "alice", "describe", secret)
        assert "visibility: private   shared with: bob" in described.stdout
    finally:
        access = alice.unshare(secret, users=["bob"])
    assert access["users"] == []
    assert_hidden_from(hub, "bob", secret)


def test_share_with_a_group_lets_its_members_run_it(hub, secret):
    alice = client(hub, "alice")
    alice.share(secret, groups=["chem"])
    try:
        assert run_as(hub, "carol", secret, 6) == "secret:6"  # carol is in chem
        with pytest.raises(ServableNotFound):
            run_as(hub, "bob", secret, 6)  # bob is not
    finally:
        alice.unshare(secret, groups=["chem"])
    with pytest.raises(ServableNotFound):
        run_as(hub, "carol", secret, 7)


def test_cli_share_unshare_and_publish_private(hub, secret, tmp_path):
    shared = cli(hub, "alice", "share", secret, "--user", "bob", "--group", "chem")
    assert shared.returncode == 0, shared.stderr
    assert shared.stdout.strip() == f"{secret}: private, shared with bob, group chem"
    assert run_as(hub, "bob", secret, 8) == "secret:8"
    unshared = cli(hub, "alice", "unshare", secret, "--user", "bob", "--group", "chem")
    assert unshared.stdout.strip() == f"{secret}: private, shared with nobody"
    with pytest.raises(ServableNotFound):
        run_as(hub, "bob", secret, 8)
    refused = cli(hub, "bob", "share", secret, "--user", "bob")
    assert refused.returncode == 1 and "there is no servable alice/secret-model" in refused.stderr

    module = Path(tmp_path) / "mine.py"
    module.write_text("def count_letters(word):\n    return len(word)\n")
    published = cli(
        hub, "alice", "publish", f"{module}:count_letters", "--private", "--example", '[["abc"], 3]'
    )
    assert published.returncode == 0, published.stderr
    assert published.stdout.strip() == "alice/count-letters:1"
    assert client(hub, "alice").access("alice/count-letters")["visibility"] == "private"
    with pytest.raises(NotFoundError):
        client(hub, "bob").describe("alice/count-letters")
    assert cli(hub, "alice", "visibility", "alice/count-letters", "public").returncode == 0
    assert client(hub, "bob").describe("alice/count-letters")["visibility"] == "public"


def test_a_pipeline_can_pin_only_steps_its_publisher_may_see(hub, secret):
    bob = client(hub, "bob")
    step = bob.publish(
        Servable.from_function(
            plus_one, name="plus-one", title="Add one", authors=["Doe, Bob"], examples=[((1,), 2)]
        ),
        endpoint=hub.endpoint_name,
    )
    assert step == "bob/plus-one:1"

    def pipeline(second: str) -> Servable:
        return Servable.pipeline(
            ["bob/plus-one", second], name=f"pipe-{uuid.uuid4().hex[:6]}", title="p", authors=["Doe, Bob"]
        )

    absent, _ = absent_twin(secret)
    with pytest.raises(ValueError) as hidden_exc:
        bob.publish(pipeline(secret), endpoint=hub.endpoint_name)
    with pytest.raises(ValueError) as missing_exc:
        bob.publish(pipeline(absent), endpoint=hub.endpoint_name)
    same_words(hidden_exc.value, missing_exc.value, absent, secret)
    assert "there is no ready version" in str(hidden_exc.value)


def test_public_stays_the_default(hub):
    alice = client(hub, "alice")
    ref = alice.publish(
        Servable.from_function(
            plus_one, name="open-model", title="Open", authors=["Doe, Alice"], examples=[((1,), 2)]
        ),
        endpoint=hub.endpoint_name,
    )
    assert client(hub, "bob").describe(ref)["visibility"] == "public"
    assert run_as(hub, "bob", "alice/open-model", 41) == 42
    assert "open-model" in {h["name"] for h in client(hub, "carol").search("open")}
    # bob can see it but may not change it
    with pytest.raises(AccessDenied):
        client(hub, "bob").set_visibility("alice/open-model", "private")
    with pytest.raises(ValueError, match="visibility must be 'public' or 'private', got 'hidden'"):
        alice.set_visibility("alice/open-model", "hidden")
    # a share with a name nobody has (yet) is kept, and said
    access = alice.share("alice/open-model", users=["nobody-here"], groups=["no-group"])
    assert access["users"] == ["nobody-here"] and access["groups"] == ["no-group"]
    assert access["warnings"] == [
        "there is no user 'nobody-here' (yet)",
        "there is no group 'no-group' (yet)",
    ]
    with pytest.raises(ValueError, match="user name 'not ok' is not valid"):
        alice.share("alice/open-model", users=["not ok"])
    with pytest.raises(ValueError, match="name at least one of 'users' or 'groups'"):
        alice.unshare("alice/open-model")
