"""Endpoint policy (``policy:`` in config.yaml): validation, the rules, the task origin on the
wire, the manager's mirror (Router) and the endpoint's check (Scheduler)."""

from __future__ import annotations

import msgpack
import pytest

from dlhub.endpoint.config import ConfigError, parse_config
from dlhub.endpoint.scheduler import Scheduler
from dlhub.manager.routing import Router
from dlhub.protocol import ProtocolError
from dlhub.protocol import messages as m
from dlhub.protocol.errors import AccessDenied, exception_from_record
from dlhub.protocol.policy import Policy

BASE = {"name": "hpc", "manager": {"address": "tcp://hub:5581", "token": "t"}}
ISSUE_POLICY = {
    "allowed_users": ["alice"],
    "allowed_groups": ["chem"],
    "functions_by_value": False,
    "allowed_servable_owners": ["alice", "dlhub-examples"],
}
FN, RUN = "sha256:f", m.RUN_PREFIX + "d" * 64
EP_ID, CLIENT = b"e:hpc:s1", b"c:1"


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def origin(user: str, owner: str | None = None, admin: bool = False, groups=()) -> dict:
    out = {"user": user, "admin": admin, "groups": list(groups)}
    if owner:
        out["owner"] = owner
    return out


# ---- config ----------------------------------------------------------------------------------


def test_policy_from_the_issue_parses():
    cfg = parse_config({**BASE, "policy": ISSUE_POLICY})
    assert cfg.policy.allowed_users == ["alice"] and cfg.policy.functions_by_value is False
    assert cfg.policy.allowed_servable_owners == ["alice", "dlhub-examples"]
    default = parse_config(BASE).policy
    assert default.allowed_users is None and default.functions_by_value is True
    assert default.allowed_groups == [] and default.allowed_servable_owners is None


@pytest.mark.parametrize(
    "policy, text",
    [
        ({"allowed_user": ["alice"]}, "policy.allowed_user: unknown key; did you mean policy.allowed_users?"),
        (
            {"functions_by_values": False},
            "policy.functions_by_values: unknown key; did you mean policy.functions_by_value?",
        ),
        ({"allowed_group": ["chem"]}, "did you mean policy.allowed_groups?"),
        ({"functions_by_value": "no"}, "policy.functions_by_value: must be true or false"),
        ({"functions_by_value": 0}, "policy.functions_by_value: must be true or false"),
        ({"allowed_users": "alice"}, "policy.allowed_users: expected a list of user, group or owner names"),
        ({"allowed_groups": ["two words"]}, "policy.allowed_groups: expected a list"),
        ({"allowed_servable_owners": [3]}, "policy.allowed_servable_owners: expected a list"),
        ("everyone", "policy: Input should be a valid dictionary"),
    ],
)
def test_bad_policy_is_named(policy, text):
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "policy": policy})
    assert text in str(info.value)


def test_policy_typo_at_top_level_is_suggested():
    with pytest.raises(ConfigError, match="polcy: unknown key; did you mean policy"):
        parse_config({**BASE, "polcy": ISSUE_POLICY})


# ---- the rules -----------------------------------------------------------------------------------


def test_default_allows_the_owner_and_admins_only():
    p = parse_config(BASE).policy.to_policy("hpc", owner="admin")
    assert p.refusal(origin("admin"), FN) is None
    assert p.refusal(origin("root", admin=True), FN) is None
    why = p.refusal(origin("bob"), FN)
    assert (
        why == "bob may not submit to endpoint 'hpc' (policy.allowed_users: not set, so only the "
        "endpoint's owner admin)"
    )


def test_issue_policy_refuses_with_the_rule_named():
    p = Policy("hpc", "carol", **ISSUE_POLICY)
    assert p.refusal(origin("bob"), RUN) == (
        "bob may not submit to endpoint 'hpc' (policy.allowed_users: alice; policy.allowed_groups: chem)"
    )
    assert p.refusal(origin("carol"), RUN) is not None  # listed users replace the owner default
    assert p.refusal(origin("bob", "alice", groups=["chem"]), RUN) is None  # a group member
    assert p.refusal(origin("alice", "dlhub-examples"), RUN) is None
    assert p.refusal(origin("alice"), FN) == (
        "endpoint 'hpc' does not run functions by value (policy.functions_by_value: false); "
        "publish it as a servable"
    )
    assert "policy.allowed_servable_owners" in p.refusal(origin("alice", "mallory"), RUN)
    # the what rules hold for admins too: they are about the site's hardware
    assert p.refusal(origin("root", admin=True), FN) is not None
    assert p.refusal(origin("root", "mallory", admin=True), m.VERIFY_PREFIX + "e" * 64) is not None
    assert "cannot tell who submitted" in p.refusal(None, RUN)
    record = p.error(p.refusal(origin("bob"), RUN))
    assert isinstance(exception_from_record(record), AccessDenied)


def test_star_allows_anyone_and_any_owner():
    p = Policy("hpc", "carol", allowed_users=["*"], allowed_servable_owners=["*"])
    assert p.refusal(origin("bob", "mallory"), RUN) is None


def test_wire_round_trip_and_malformed():
    p = Policy("hpc", "carol", **ISSUE_POLICY)
    again = Policy.from_wire("hpc", msgpack.unpackb(msgpack.packb(p.to_wire())), "carol")
    assert again.to_wire() == p.to_wire() and again.describe() == p.describe()
    default = Policy.from_wire("hpc", parse_config(BASE).policy.model_dump(mode="json"), "carol")
    assert default.users == {"carol"}
    with pytest.raises(ValueError, match="unknown keys"):
        Policy.from_wire("hpc", {"allowed": []}, None)
    with pytest.raises(ValueError, match="allowed_users must be a list"):
        Policy.from_wire("hpc", {"allowed_users": "bob"}, None)


# ---- the task origin on the wire -----------------------------------------------------------------


def test_task_origin_is_checked_and_old_records_still_read():
    rec = m.task_record(tid(1), FN, b"p", None, "auto", None, None, origin("alice", groups=["chem"]))
    assert m.task_origin(m.unpack(m.pack(m.Tasks([rec]))).tasks[0]) == origin("alice", groups=["chem"])
    for old in (rec[:6], rec[:7]):  # from before options, from before origins
        got = m.unpack(m.pack(m.Tasks([list(old)]))).tasks[0]
        assert len(got) == m.TASK_FIELDS and m.task_origin(got) is None
    for bad, text in [
        ("alice", "origin: must be a mapping"),
        ({"user": "a", "root": True}, "origin: unknown key 'root'"),
        ({"user": "a", "admin": "yes"}, "origin: admin must be bool"),
        ({"admin": True}, "origin: user is required"),
        ({"user": "a", "groups": [1]}, "origin: groups must be a list of str"),
    ]:
        with pytest.raises(ProtocolError, match=text):
            m.unpack(m.pack(m.Tasks([[*rec[:7], bad]])))


# ---- the manager mirrors it ----------------------------------------------------------------------


class NullStore:
    """The Router's store interface, recording what it would write."""

    def __init__(self):
        self.rows: list[dict] = []

    def received(self, rows, acks):
        self.rows += rows

    def update(self, changes, acks=()):
        pass


def router_with_policy(policy: dict | None) -> tuple[Router, NullStore]:
    store = NullStore()
    principals = {"bob": (False, frozenset({"chem"})), "root": (True, frozenset())}
    router = Router(
        store,
        clock=lambda: 1000.0,
        principal=lambda user: principals.get(user, (False, frozenset())),
        servable_owner=lambda digest: "mallory",
    )
    info = {"pid": 1} if policy is None else {"pid": 1, "policy": policy}
    router.endpoint_hello(EP_ID, m.Hello("endpoint", "hpc", "t", "s1", {}, info), owner="carol")
    router.drain()
    return router, store


def sent_tasks(router: Router) -> list[list]:
    return [
        r for lk, _, msg in router.drain() if lk == "endpoint" and isinstance(msg, m.Tasks) for r in msg.tasks
    ]


def test_manager_refuses_before_forwarding_and_writes_the_origin():
    router, store = router_with_policy({"allowed_users": ["alice"], "functions_by_value": True})
    forged = {"user": "alice", "admin": True}  # what a client writes there is replaced
    router.submit(CLIENT, "dave", "s", m.Submit("hpc", [m.task_record(tid(1), FN, b"p", origin=forged)]))
    out = router.drain()
    assert not [x for x in out if x[0] == "endpoint"]
    # stored as failed, without its payload, so Fetch and Query answer with the refusal
    (row,) = store.rows
    assert row["state"] == "failed" and row["payload"] is None and row["owner"] == "dave"
    (res,) = [r for lk, _, msg in out if lk == "client" for r in msg.results]
    assert res[m.R_STATE] == "failed" and res[m.R_ERROR][0] == "access-denied"
    assert res[m.R_ERROR][1] == "dave may not submit to endpoint 'hpc' (policy.allowed_users: alice)"
    assert router.counters["refused"] == 1
    router.submit(CLIENT, "alice", "s", m.Submit("hpc", [m.task_record(tid(2), FN, b"p")]))
    (rec,) = sent_tasks(router)
    assert m.task_origin(rec) == {"user": "alice", "admin": False}
    # an internal call of a package (e.g. verification) carries the servable's owner
    router.submit(
        b"", "alice", "manager", m.Submit("hpc", [m.task_record(tid(3), RUN, b"p")]), callback=lambda r: None
    )
    (rec,) = sent_tasks(router)
    assert m.task_origin(rec) == {"user": "alice", "admin": False, "owner": "mallory"}


def test_manager_without_a_policy_from_the_endpoint_forwards_with_the_origin():
    router, _ = router_with_policy(None)
    router.submit(CLIENT, "bob", "s", m.Submit("hpc", [m.task_record(tid(1), FN, b"p")]))
    (rec,) = sent_tasks(router)
    assert m.task_origin(rec) == {"user": "bob", "admin": False, "groups": ["chem"]}


def test_tasks_queued_before_the_endpoint_said_its_policy_are_checked_at_hello():
    store = NullStore()
    router = Router(store, clock=lambda: 1000.0, known_endpoints=["hpc"])
    results = []
    for n, user in ((1, "bob"), (2, "carol")):
        router.submit(
            b"", user, "manager", m.Submit("hpc", [m.task_record(tid(n), FN, b"p")]), callback=results.append
        )
    assert not sent_tasks(router) and len(router.endpoints["hpc"].pending) == 2
    hello = m.Hello("endpoint", "hpc", "t", "s1", {}, {"policy": {"allowed_users": None}})
    router.endpoint_hello(EP_ID, hello, owner="carol")
    assert [r[m.T_ID] for r in sent_tasks(router)] == [tid(2)]
    assert [(r[m.R_ID], r[m.R_ERROR][0]) for r in results] == [(tid(1), "access-denied")]
    assert not router.endpoints["hpc"].pending


# ---- the endpoint enforces it ----------------------------------------------------------------------


def test_scheduler_refuses_by_policy_without_queueing():
    s = Scheduler(clock=lambda: 0.0, wall_clock=lambda: 5000.0)
    s.policy = Policy("hpc", "carol", allowed_users=["alice"], functions_by_value=False)
    s.add_tasks(
        [
            m.task_record(tid(1), FN, b"p", origin=origin("alice")),
            m.task_record(tid(2), RUN, b"p", origin=origin("bob", "alice")),
            m.task_record(tid(3), RUN, b"p", origin=origin("alice", "alice")),
            m.task_record(tid(4), RUN, b"p"),  # no origin: an older manager
        ]
    )
    refused = {r[m.R_ID]: r[m.R_ERROR] for r in s.results}
    assert set(refused) == {tid(1), tid(2), tid(4)}
    assert all(e[0] == "access-denied" for e in refused.values())
    assert "functions_by_value: false" in refused[tid(1)][1]
    assert refused[tid(2)][1].startswith("bob may not submit to endpoint 'hpc'")
    assert s.counters["refused"] == 3 and s.counters["received"] == 1
    assert list(s.tasks) == [tid(3)] and s.code_requests == [RUN]
    assert m.task_origin(s.tasks[tid(3)].record) is None  # checked here; workers are not sent it


def test_the_readme_policy_block_is_a_valid_config():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Endpoints on a cluster", 1)[1]
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", section, re.S) if "policy:" in b]
    cfg = parse_config({**BASE, **yaml.safe_load(block)})
    assert cfg.policy.functions_by_value is False and cfg.policy.allowed_groups == ["chem"]
