"""Endpoint policy end to end: an in-process manager, a real endpoint process whose config.yaml
has a ``policy:``, workers, and several users (alice, bob, carol in group chem, the admin).

The manager mirrors the endpoint's policy (sent in its Hello), so a refused task fails at once
and never reaches the endpoint; the endpoint checks every task again on arrival (its own check
is driven in tests/unit/test_endpoint_policy_rules.py)."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa
import yaml
from conftest import RESULT_TIMEOUT_S, _session_members, kill_pids, meta, wait_until

from dlhub.executor import AccessDenied, Client, PublishError, Servable

POLICY = {"allowed_users": ["alice"], "allowed_groups": ["chem"], "functions_by_value": False}


def double(x):
    return 2 * x


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def add_users(engine: sa.Engine) -> dict[str, str]:
    """alice, bob and carol (carol in group chem): name -> token."""
    from dlhub.manager.auth import add_group, create_user

    tokens = {name: create_user(engine, name, "user") for name in ("alice", "bob", "carol")}
    add_group(engine, "chem", ["carol"])
    return tokens


def restart_endpoint(cs, policy: dict) -> None:
    """Stop the custom stack's endpoint, write ``policy`` into its config.yaml, start it again."""
    proc = cs.endpoint_proc
    members = _session_members(proc.pid)
    proc.terminate()
    proc.wait(30)
    kill_pids(members)
    path = cs.endpoint_dir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "policy": policy}))
    cs.endpoint_proc = subprocess.Popen(
        [sys.executable, "-m", "dlhub.endpoint.cli", "start", cs.endpoint_name, "--home", str(cs.home)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=cs.home,
    )
    wait_until(
        lambda: cs.status().get("pid") == cs.endpoint_proc.pid and cs.status().get("workers", 0) >= 1,
        60,
        what="the restarted endpoint's worker",
    )


def test_endpoint_policy_end_to_end(custom_stack_factory):
    cs = custom_stack_factory(name="hpc", endpoint={"heartbeat_s": 0.5, "policy": POLICY}, workers=1)
    tokens = add_users(cs.manager.auth.engine)
    url = cs.manager.api.url
    before = cs.status()

    # bob is neither listed nor in chem: refused, with the rule named
    bob = cs.executor(token=tokens["bob"])
    with pytest.raises(AccessDenied) as info:
        bob.submit(double, 2).result(RESULT_TIMEOUT_S)
    assert str(info.value) == (
        "bob may not submit to endpoint 'hpc' (policy.allowed_users: alice; policy.allowed_groups: chem)"
    )
    # alice may submit, but not a function by value
    alice = cs.executor(token=tokens["alice"])
    with pytest.raises(AccessDenied) as info:
        alice.submit(double, 2).result(RESULT_TIMEOUT_S)
    assert str(info.value) == (
        "endpoint 'hpc' does not run functions by value (policy.functions_by_value: false); "
        "publish it as a servable"
    )

    # a published servable runs: alice's (verified here as alice), for carol through her group
    name = unique("policy-double")
    with Client(url, tokens["alice"], home=str(cs.home)) as c:
        ref = c.publish(Servable.from_function(double, **meta(name, examples=[((2,), 4)])), endpoint="hpc")
    carol = cs.executor(token=tokens["carol"])
    assert carol.submit(f"alice/{name}", 21).result(RESULT_TIMEOUT_S) == 42
    assert alice.submit(ref, 5).result(RESULT_TIMEOUT_S) == 10
    with pytest.raises(AccessDenied, match="bob may not submit"):
        bob.submit(f"alice/{name}", 1).result(RESULT_TIMEOUT_S)
    # an admin publishes for another owner: any owner may run here so far
    other = unique("policy-examples")
    with Client(url, cs.token, home=str(cs.home)) as c:
        c.publish(Servable.from_function(double, **meta(other, examples=[((1,), 2)])), owner="examples")

    # the manager refused before forwarding: the endpoint saw only the allowed calls
    assert cs.manager.status()["refused"] == 3
    received = before.get("received", 0) + 4  # 2 verifications + carol's and alice's calls
    wait_until(lambda: cs.status().get("received") == received, 10, what="the endpoint's counters")
    assert cs.status()["refused"] == 0
    assert "may not submit" not in (cs.endpoint_dir / "endpoint.log").read_text()

    # the endpoint enforces on its own: with the manager's mirror off (as in a manager that does
    # not know policies), bob's task reaches the endpoint, which refuses it in the same words
    cs.manager.call_soon(lambda: setattr(cs.manager.router.endpoints["hpc"], "policy", None))
    cs.manager.status()  # runs on the loop after the call above: the mirror is off now
    with pytest.raises(AccessDenied) as info:
        bob.submit(double, 3).result(RESULT_TIMEOUT_S)
    assert str(info.value) == (
        "bob may not submit to endpoint 'hpc' (policy.allowed_users: alice; policy.allowed_groups: chem)"
    )
    wait_until(lambda: cs.status().get("refused") == 1, 10, what="the endpoint's refusal count")

    # now only alice's servables may run here: the examples one is refused, at run and at publish
    restart_endpoint(cs, {**POLICY, "allowed_servable_owners": ["alice"]})
    wait_until(lambda: cs.manager.status()["endpoints"]["hpc"]["connected"], 10, what="re-registration")
    with pytest.raises(AccessDenied) as info:
        alice.submit(f"examples/{other}", 1).result(RESULT_TIMEOUT_S)
    assert str(info.value) == (
        "endpoint 'hpc' runs only servables of alice (policy.allowed_servable_owners), not of examples"
    )
    with Client(url, cs.token, home=str(cs.home)) as c, pytest.raises(PublishError) as published:
        c.publish(
            Servable.from_function(double, **meta(unique("refused"), examples=[((1,), 2)])), owner="examples"
        )
    assert "policy.allowed_servable_owners" in str(published.value)
    assert carol.submit(f"alice/{name}", 4).result(RESULT_TIMEOUT_S) == 8


def test_dlhub_up_local_endpoint_runs_admin_tasks_and_only_theirs(stack):
    """`dlhub up` registers `local` with the admin token: the admin runs everything as before;
    another user is refused by the default policy (only the endpoint's owner)."""
    from dlhub.manager.auth import create_user
    from dlhub.manager.store import make_engine

    admin = stack.executor()
    assert admin.submit(double, 4).result(RESULT_TIMEOUT_S) == 8
    engine = make_engine(f"sqlite:///{stack.home / 'manager' / 'dlhub.db'}")
    try:
        dave = unique("dave")
        token = create_user(engine, dave, "user")
    finally:
        engine.dispose()
    other = stack.executor(token=token)
    with pytest.raises(AccessDenied) as info:
        other.submit(double, 4).result(RESULT_TIMEOUT_S)
    assert str(info.value) == (
        f"{dave} may not submit to endpoint 'local' (policy.allowed_users: not set, so only the "
        "endpoint's owner admin)"
    )
