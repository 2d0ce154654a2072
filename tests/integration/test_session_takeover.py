"""Session takeover after a disconnect (issue 10, item 3): a routing identity (``c:<session>``
for clients, ``e:<name>:...`` for endpoints) names a session, not a user. When the connection
that said Hello on it drops, another peer may connect with the same identity: ZeroMQ then
routes whatever the manager sends to that identity to the new connection. Results, payloads and
acknowledgements must only ever reach the session's own user, so the manager forgets a session
whose connection ended and sends it nothing until the same user says Hello again on it.

A manager in this process, an endpoint process with one worker, and raw ZeroMQ peers.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
import zmq
from conftest import start_custom_stack, stop_custom_stack, wait_until

from dlhub.manager.auth import create_user, users_generation
from dlhub.protocol import messages as m
from dlhub.protocol.curve import secure_dealer
from dlhub.protocol.serialize import code_digest, runtime_versions, serialize, serialize_function


def alices_slow_secret(seconds):
    import time

    time.sleep(seconds)
    return "alice's secret result"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cs = start_custom_stack(
        tmp_path_factory.mktemp("dlhub-takeover"),
        endpoint={"policy": {"allowed_users": ["alice", "bob"]}},
        workers=1,
    )
    engine = cs.manager.auth.engine
    cs.tokens = {"alice": create_user(engine, "alice"), "bob": create_user(engine, "bob")}
    wait_until(lambda: cs.manager.auth.generation == users_generation(engine), 10, what="the new users")
    try:
        yield cs
    finally:
        stop_custom_stack(cs)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _dealer(ctx, hub, url: str, identity: bytes, who: str):
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = identity
    secure_dealer(sock, url, hub.tokens[who], hub.manager.curve_public_key)
    sock.connect(url)
    return sock


def _client_hello(token: str, session: str) -> bytes:
    versions = {**runtime_versions(), "protocol": m.PROTOCOL_VERSION}
    return m.pack(m.Hello("client", "", token, session, versions, {}))


def _received(sock, seconds: float) -> list[m.Message]:
    out, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            out.append(m.unpack(sock.recv()))
    return out


def _task_ids(msgs: list[m.Message]) -> set[bytes]:
    """Every task id carried by results, acknowledgements, states or task batches."""
    ids = set()
    for msg in msgs:
        if isinstance(msg, m.Results):
            ids |= {bytes(r[m.R_ID]) for r in msg.results}
        elif isinstance(msg, m.Accepted):
            ids |= {bytes(t) for t in msg.task_ids}
        elif isinstance(msg, m.Tasks):
            ids |= {bytes(t[m.T_ID]) for t in msg.tasks}
    return ids


def _wait_state(hub, task_id: bytes, states: set[str], timeout_s: float = 20) -> None:
    def state():
        entry = hub.manager.router.tasks.get(task_id)
        if entry is not None:
            return entry.state
        return "finished" if task_id in hub.manager.router.finished else None

    wait_until(lambda: state() in states, timeout_s, what=f"task state in {states}")


def test_client_session_is_not_taken_over_by_another_user(hub, ctx):
    """alice submits a 2 s task and her connection drops; bob connects with her routing
    identity and listens. Her result must not reach him; alice, saying Hello again on the same
    identity, fetches it."""
    url = hub.manager.client_url
    session = uuid.uuid4().hex[:16]
    identity = f"c:{session}".encode()
    alice = _dealer(ctx, hub, url, identity, "alice")
    alice.send(_client_hello(hub.tokens["alice"], session))
    assert isinstance(_received(alice, 5)[0], m.Welcome)

    blob = serialize_function(alices_slow_secret)
    digest = code_digest(blob)
    task_id = os.urandom(m.TASK_ID_BYTES)
    alice.send(m.pack(m.PutCode(digest, blob)))
    rec = [task_id, digest, serialize([[2.0], {}]), None, "auto", None, None]
    alice.send(m.pack(m.Submit("custom", [rec])))
    _wait_state(hub, task_id, {"dispatched", "running"})
    alice.close(0)  # her connection ends (a crash, a network cut)
    time.sleep(0.3)  # the manager sees the end of the stream; the identity is free again

    bob = _dealer(ctx, hub, url, identity, "bob")
    bob.send(m.pack(m.Heartbeat({})))  # a frame from bob's connection on her identity
    _wait_state(hub, task_id, {"finished"})
    got = _received(bob, 1.5)
    assert task_id not in _task_ids(got), f"bob received alice's result: {got!r}"
    assert all(isinstance(msg, (m.Refused, m.Heartbeat)) for msg in got), got
    assert not any(isinstance(msg, m.Heartbeat) for msg in got), "bob was answered as alice's session"
    bob.close(0)
    time.sleep(0.3)

    again = _dealer(ctx, hub, url, identity, "alice")  # alice reconnects: her session, her result
    again.send(_client_hello(hub.tokens["alice"], session))
    again.send(m.pack(m.Fetch([task_id])))
    got = _received(again, 3)
    results = [r for msg in got if isinstance(msg, m.Results) for r in msg.results]
    assert [r[m.R_STATE] for r in results if bytes(r[m.R_ID]) == task_id] == ["succeeded"], got


def test_endpoint_session_is_not_taken_over_by_another_user(hub, ctx):
    """An endpoint-role session (a raw one registered by the admin) drops; bob connects with
    its identity. Tasks submitted for it afterwards must not be sent to bob's connection."""
    url = hub.manager.endpoint_url
    name = f"ep-{uuid.uuid4().hex[:6]}"
    identity = f"e:{name}:{uuid.uuid4().hex[:8]}".encode()
    ep = ctx.socket(zmq.DEALER)
    ep.linger = 0
    ep.identity = identity
    secure_dealer(ep, url, hub.token, hub.manager.curve_public_key)
    ep.connect(url)
    versions = {**runtime_versions(), "protocol": m.PROTOCOL_VERSION}
    policy = {"allowed_users": ["alice"]}
    ep.send(m.pack(m.Hello("endpoint", name, hub.token, "s1", versions, {"policy": policy})))
    assert isinstance(_received(ep, 5)[0], m.Welcome)
    ep.close(0)
    time.sleep(0.3)

    bob = _dealer(ctx, hub, url, identity, "bob")
    bob.send(m.pack(m.Heartbeat({})))
    time.sleep(0.3)
    from dlhub.executor import Executor

    url, token = hub.manager.client_url, hub.tokens["alice"]
    alice_ex = Executor(endpoint=name, manager=url, token=token, home=str(hub.home))
    hub.executors.append(alice_ex)
    fut = alice_ex.submit(alices_slow_secret, 0)
    got = _received(bob, 2)
    assert not any(isinstance(msg, m.Tasks) for msg in got), f"bob received alice's payload: {got!r}"
    assert not fut.done()
    fut.cancel()
