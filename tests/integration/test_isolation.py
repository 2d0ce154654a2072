"""Isolation between users and roles that mean something (issue 10, items 3 and 4), tried as an
attacker would: a manager (in process) with an endpoint ``custom`` started with the admin token,
two ordinary users alice and bob, and endpoint-role tokens. Each test is one attack from the
issue; it fails on a manager that trusts ids, digests and identities.

Functions sent to the endpoint import what they need inside their bodies.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import httpx
import pytest
import zmq
from conftest import start_custom_stack, stop_custom_stack, wait_until

from dlhub.executor import AccessDenied, TaskLost
from dlhub.manager.auth import create_user, users_generation
from dlhub.protocol import messages as m
from dlhub.protocol.curve import secure_dealer
from dlhub.protocol.serialize import code_digest, runtime_versions, serialize_function

RESULT_TIMEOUT_S = 30


# ---- functions that run remotely --------------------------------------------------------------


def alices_secret(seconds):
    import time

    print("alice's secret output")
    time.sleep(seconds)
    return "alice's result"


def alices_function(x):
    return f"alice ran {x}"


def alices_new_function(x):
    return f"alice's new function ran {x}"


def bobs_function(x):
    return f"BOB's code ran with {x}"


# ---- the stack and the users ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A manager + endpoint ``custom`` (1 worker, admin token) and tokens for alice, bob and two
    endpoint-role users."""
    cs = start_custom_stack(
        tmp_path_factory.mktemp("dlhub-isolation"),
        endpoint={"policy": {"allowed_users": ["alice", "bob"]}},
        workers=1,
    )
    engine = cs.manager.auth.engine
    cs.tokens = {
        "alice": create_user(engine, "alice"),
        "bob": create_user(engine, "bob"),
        "ep-bob": create_user(engine, "ep-bob", role="endpoint"),
        "ep-carol": create_user(engine, "ep-carol", role="endpoint"),
    }
    # the manager takes in the new users (and closes their sessions) before they connect
    wait_until(lambda: cs.manager.auth.generation == users_generation(engine), 10, what="the new users")
    try:
        yield cs
    finally:
        stop_custom_stack(cs)


def executor(hub, who: str):
    return hub.executor(token=hub.tokens[who])


def unknown_id() -> str:
    return os.urandom(m.TASK_ID_BYTES).hex()


def lost_message(task_id: str) -> str:
    """What a Fetch says about an id: the id itself is the only part that may differ."""
    return f"task {task_id} is unknown to this manager"


class RawEndpoint:
    """A hand-made endpoint link (what an attacker would write): Hello, then arbitrary frames."""

    def __init__(self, hub, name: str, token: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, f"e:{name}:{uuid.uuid4().hex[:8]}".encode())
        secure_dealer(self.sock, hub.manager.endpoint_url, token, hub.manager.curve_public_key)
        self.sock.connect(hub.manager.endpoint_url)
        self.name, self.token = name, token

    def hello(self) -> m.Message:
        versions = {**runtime_versions(), "protocol": m.PROTOCOL_VERSION}
        self.send(m.Hello("endpoint", self.name, self.token, uuid.uuid4().hex[:8], versions, {}))
        return self.recv()

    def send(self, msg: m.Message) -> None:
        self.sock.send(m.pack(msg))

    def recv(self, timeout_s: float = 10.0) -> m.Message:
        assert self.sock.poll(int(timeout_s * 1000)), "the manager did not answer"
        return m.unpack(self.sock.recv())

    def received(self, seconds: float) -> list[m.Message]:
        """Everything the manager sends in the next ``seconds``."""
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000)):
                out.append(m.unpack(self.sock.recv()))
        return out

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


# ---- item 3: a task belongs to its submitter ---------------------------------------------------------


def test_another_users_task_ids_behave_like_unknown_ids_on_zeromq(hub):
    alice, bob = executor(hub, "alice"), executor(hub, "bob")
    fut = alice.submit(alices_secret, 3)
    wait_until(lambda: alice.task_info(fut)["state"] == "running", 60, what="alice's task to run")

    never = unknown_id()
    # Query: the same answer as for an id that never existed (no state, no endpoint, no owner)
    assert bob.task_info(fut.task_id) == {"task_id": fut.task_id, "state": "unknown"}
    assert bob.task_info(never) == {"task_id": never, "state": "unknown"}
    # Fetch of her running task: "unknown" for bob, and the result still goes to alice
    [stolen] = bob.fetch([fut.task_id])
    with pytest.raises(TaskLost) as info:
        stolen.result(RESULT_TIMEOUT_S)
    assert str(info.value) == lost_message(fut.task_id)
    # an admin may look (a copy of the result), and alice still gets hers
    admin = hub.executor()
    [copy] = admin.fetch([fut.task_id])
    assert fut.result(RESULT_TIMEOUT_S) == "alice's result"
    assert copy.result(RESULT_TIMEOUT_S) == "alice's result"
    assert fut.output[0] == "alice's secret output\n"

    # once finished and stored: still unknown to bob (no result, no stdout), known to alice and admin
    [late] = bob.fetch([fut.task_id])
    with pytest.raises(TaskLost, match="is unknown to this manager"):
        late.result(RESULT_TIMEOUT_S)
    assert bob.task_info(fut.task_id) == {"task_id": fut.task_id, "state": "unknown"}
    assert alice.task_info(fut)["state"] == "succeeded"
    assert alice.task_info(fut)["stdout"] == "alice's secret output\n"
    assert admin.task_info(fut.task_id)["stdout"] == "alice's secret output\n"
    [again] = alice.fetch([fut.task_id])
    assert again.result(RESULT_TIMEOUT_S) == "alice's result"


def test_another_users_cancel_is_refused_like_an_unknown_id(hub):
    alice, bob = executor(hub, "alice"), executor(hub, "bob")
    refused: list[bytes] = []
    original = bob._conn.on_cancel_refused

    def record(task_ids: list[bytes]) -> None:
        refused.extend(task_ids)
        original(task_ids)

    bob._conn.on_cancel_refused = record
    running = alice.submit(alices_secret, 3)
    wait_until(lambda: alice.task_info(running)["state"] == "running", 60, what="alice's task to run")
    queued = alice.submit(alices_function, "queued")  # waits for the one worker
    wait_until(lambda: alice.task_info(queued)["state"] != "unknown", 10, what="the queued task")

    never = os.urandom(m.TASK_ID_BYTES)
    bob._conn.send(("cancel", [queued._task_id, never]))
    wait_until(lambda: len(refused) == 2, 10, what="bob's cancel to be refused")
    assert sorted(refused) == sorted([queued._task_id, never])
    assert queued.result(RESULT_TIMEOUT_S) == "alice ran queued"
    assert running.result(RESULT_TIMEOUT_S) == "alice's result"


def test_rest_task_routes_of_another_user_are_404_exactly_like_an_unknown_id(hub):
    alice = executor(hub, "alice")
    fut = alice.submit(alices_function, "rest")
    assert fut.result(RESULT_TIMEOUT_S) == "alice ran rest"
    never = unknown_id()

    def get(who: str, path: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {hub.tokens[who] if who != 'admin' else hub.token}"}
        return httpx.get(f"{hub.manager.api.url}/api/v1/tasks/{path}", headers=headers, timeout=10)

    for suffix in ("", "/result"):
        theirs, unknown = get("bob", fut.task_id + suffix), get("bob", never + suffix)
        assert theirs.status_code == unknown.status_code == 404, theirs.text
        assert theirs.json() == {
            k: (v.replace(never, fut.task_id) if isinstance(v, str) else v) for k, v in unknown.json().items()
        }
        mine = get("alice", fut.task_id + suffix)
        assert mine.status_code != 404 and mine.json()["task_id"] == fut.task_id
        assert get("admin", fut.task_id + suffix).status_code == mine.status_code


def test_put_code_with_a_digest_that_is_not_its_blob_is_refused_and_never_stored(hub, caplog):
    alice, bob = executor(hub, "alice"), executor(hub, "bob")
    alices_digest = code_digest(serialize_function(alices_new_function))  # never sent before
    caplog.set_level(logging.WARNING, logger="dlhub.manager")
    # bob plants his code under the digest of alice's function before her first submit
    bob._conn.send(("code", alices_digest, serialize_function(bobs_function)))
    wait_until(
        lambda: any(alices_digest in r.getMessage() for r in caplog.records),
        10,
        what="the manager to log the refused PutCode",
    )
    assert hub.manager.store.get_code(alices_digest) is None
    assert alice.submit(alices_new_function, 1).result(RESULT_TIMEOUT_S) == "alice's new function ran 1"


# ---- item 3: results only from the endpoint the task went to --------------------------------------------


def test_results_and_states_are_accepted_only_from_the_dispatched_endpoint(hub, caplog):
    alice = executor(hub, "alice")
    fut = alice.submit(alices_secret, 3)
    wait_until(lambda: alice.task_info(fut)["state"] == "running", 60, what="alice's task to run")
    caplog.set_level(logging.WARNING, logger="dlhub.manager")
    rogue = RawEndpoint(hub, "bobs-site", hub.tokens["ep-bob"])
    try:
        assert isinstance(rogue.hello(), m.Welcome)
        forged = m.result_record(fut._task_id, "succeeded", b"\xa6forged")
        rogue.send(m.Results([forged]))
        rogue.send(m.States([[fut._task_id, "queued", time.time()]]))
        rogue.send(m.CancelRefused([fut._task_id], "forged"))
        wait_until(
            lambda: any(
                "bobs-site" in r.getMessage() and fut.task_id in r.getMessage() for r in caplog.records
            ),
            10,
            what="a warning naming the endpoint and the task",
        )
        assert alice.task_info(fut)["state"] == "running"
        assert fut.result(RESULT_TIMEOUT_S) == "alice's result"
    finally:
        rogue.close()


def test_an_endpoint_gets_only_the_code_of_tasks_sent_to_it(hub, caplog):
    """ep-carol's endpoint asks for the digest of alice's function, which ran on ``custom``: the
    manager has the blob but answers that it is missing (and logs the refusal)."""
    alice = executor(hub, "alice")
    assert alice.submit(alices_function, 7).result(RESULT_TIMEOUT_S) == "alice ran 7"
    digest = code_digest(serialize_function(alices_function))
    assert hub.manager.store.get_code(digest) is not None
    caplog.set_level(logging.WARNING, logger="dlhub.manager")
    rogue = RawEndpoint(hub, "carols-site", hub.tokens["ep-carol"])
    try:
        assert isinstance(rogue.hello(), m.Welcome)
        rogue.send(m.CodeRequest([digest]))
        reply = rogue.recv()
        assert isinstance(reply, m.Code) and reply.blobs == {}, reply
        assert any("carols-site" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
    finally:
        rogue.close()
    assert alice.submit(alices_function, 8).result(RESULT_TIMEOUT_S) == "alice ran 8"


# ---- item 4: roles and endpoint names --------------------------------------------------------------


def test_a_user_token_cannot_register_an_endpoint_nor_answer_in_flight_tasks(hub):
    alice = executor(hub, "alice")
    fut = alice.submit(alices_secret, 2)
    wait_until(lambda: alice.task_info(fut)["state"] == "running", 60, what="alice's task to run")
    rogue = RawEndpoint(hub, "custom", hub.tokens["bob"])
    try:
        answer = rogue.hello()
        assert isinstance(answer, m.Refused) and answer.code == "access-denied"
        assert "only endpoint or admin tokens register endpoints" in answer.message
        rogue.send(m.Results([m.result_record(fut._task_id, "succeeded", b"\xa6forged")]))
        got = rogue.received(1.0)
        assert not any(isinstance(msg, m.Tasks) for msg in got)
        assert fut.result(RESULT_TIMEOUT_S) == "alice's result"
        status = executor(hub, "alice").status()
        assert status["endpoints"]["custom"]["connected"]
    finally:
        rogue.close()


def test_an_endpoint_token_cannot_be_used_as_a_client(hub):
    with pytest.raises(AccessDenied, match="endpoint tokens only register endpoints"):
        executor(hub, "ep-bob")


def test_an_endpoint_name_belongs_to_its_first_owner(hub):
    first = RawEndpoint(hub, "carols-site", hub.tokens["ep-carol"])
    assert isinstance(first.hello(), m.Welcome)
    first.close()
    taker = RawEndpoint(hub, "carols-site", hub.tokens["ep-bob"])
    answer = taker.hello()
    taker.close()
    assert isinstance(answer, m.Refused) and answer.code == "access-denied"
    assert "'carols-site'" in answer.message and "ep-carol" in answer.message
    # the admin's own endpoint is not for the taking either
    taker = RawEndpoint(hub, "custom", hub.tokens["ep-bob"])
    answer = taker.hello()
    taker.close()
    assert isinstance(answer, m.Refused) and "admin" in answer.message
    # the owner registers again (a restart), and so may the admin
    for who, token in (("ep-carol", hub.tokens["ep-carol"]), ("admin", hub.token)):
        again = RawEndpoint(hub, "carols-site", token)
        assert isinstance(again.hello(), m.Welcome), who
        again.close()
