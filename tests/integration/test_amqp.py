"""manager/amqp.py against the real RabbitMQ that scripts/rabbitmq-localhost.sh runs (issue 13,
item 4): results reach the task group's queue as the SDK's Executor reads them, and one user's
credentials cannot read another user's queue. Fails, not skips, when the broker is down and
DLHUB_REQUIRE_AMQP=1 (CI)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pika = pytest.importorskip("pika")
messagepack = pytest.importorskip("globus_compute_common.messagepack")

from dlhub.manager.amqp import BrokerSettings, ResultPublisher  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rabbitmq-localhost.sh"
PORT = int(os.environ.get("RMQ_PORT", "5672"))
MGMT_PORT = int(os.environ.get("RMQ_MGMT_PORT", "15672"))
REQUIRE = os.environ.get("DLHUB_REQUIRE_AMQP") == "1"


def _up() -> bool:
    for port in (PORT, MGMT_PORT):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def broker() -> BrokerSettings:
    why = ""
    if not _up() and os.geteuid() == 0:
        run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600)
        why = (run.stdout + run.stderr)[-2000:]
    if not _up():
        message = f"RabbitMQ is not reachable on 127.0.0.1:{PORT}/{MGMT_PORT}; run {SCRIPT} (as root). {why}"
        if REQUIRE:
            pytest.fail(f"{message} (DLHUB_REQUIRE_AMQP=1: the broker is required)", pytrace=False)
        pytest.skip(message)
    return BrokerSettings(
        port=PORT,
        management_url=f"http://127.0.0.1:{MGMT_PORT}",
        admin_user=os.environ.get("RMQ_ADMIN_USER", "dlhub-admin"),
        admin_password=os.environ.get("RMQ_ADMIN_PASSWORD", "dlhub-admin"),
        secret=b"test-secret-" + uuid.uuid4().hex.encode(),
    )


@pytest.fixture
def publisher(broker):
    pub = ResultPublisher(broker)
    yield pub
    pub.close()


def result(task_id: uuid.UUID, value=None, error: str | None = None):
    from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails
    from globus_compute_sdk.serialize import ComputeSerializer

    if error is not None:
        return Result(
            task_id=task_id, data=error, error_details=ResultErrorDetails(code="1", user_message=error)
        )
    return Result(task_id=task_id, data=ComputeSerializer().serialize(value))


def consume(connection_url: str, queue_name: str, count: int, timeout: float = 20.0):
    """What the SDK's result watcher does: URLParameters(connection_url), basic_consume on
    <queue_prefix><task_group_id> without declaring it, unpack each body, ack."""
    conn = pika.BlockingConnection(pika.URLParameters(connection_url))
    try:
        channel = conn.channel()
        got = []
        deadline = time.monotonic() + timeout
        for method, props, body in channel.consume(queue_name, inactivity_timeout=0.5):
            if method is not None:
                got.append((props, messagepack.unpack(body)))
                channel.basic_ack(method.delivery_tag)
            if len(got) >= count or time.monotonic() > deadline:
                break
        channel.cancel()
        return got
    finally:
        conn.close()


def test_results_reach_the_task_group_queue_as_the_sdk_decodes_them(publisher):
    from globus_compute_common.messagepack.message_types import Result
    from globus_compute_sdk.serialize import ComputeSerializer

    user, group = f"alice-{uuid.uuid4().hex[:6]}", uuid.uuid4()
    info = publisher.connection_info(user)
    assert set(info) == {"connection_url", "queue_prefix"} and info["connection_url"].startswith("amqp://")
    name = publisher.declare_queue(user, group)
    assert name == f"{info['queue_prefix']}{group}"
    ok, bad = uuid.uuid4(), uuid.uuid4()
    t0 = time.perf_counter()
    publisher.publish(user, group, result(ok, {"square": 49}))
    publisher.publish(user, group, result(bad, error="ZeroDivisionError: division by zero"))
    assert time.perf_counter() - t0 < 0.5  # queued, not sent, by the caller
    assert publisher.flush(20)
    got = consume(info["connection_url"], name, 2)
    by_id = {res.task_id: (props, res) for props, res in got}
    assert set(by_id) == {ok, bad} and all(isinstance(res, Result) for _, (_, res) in by_id.items())
    props, res = by_id[ok]
    assert not res.is_error and ComputeSerializer().deserialize(res.data) == {"square": 49}
    assert props.timestamp and abs(props.timestamp - time.time()) < 60 and props.delivery_mode == 2
    assert not (props.headers or {}).get("high_assurance")
    assert by_id[bad][1].is_error and "ZeroDivisionError" in by_id[bad][1].data


def test_another_users_credentials_cannot_read_the_queue(publisher):
    alice, bob, group = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}", uuid.uuid4()
    name = publisher.declare_queue(alice, group)
    publisher.publish(alice, group, result(uuid.uuid4(), 1))
    assert publisher.flush(20)
    bob_url = publisher.connection_info(bob)["connection_url"]
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        consume(bob_url, name, 1, timeout=5)
    assert refused.value.reply_code == 403  # ACCESS_REFUSED
    # bob cannot publish into it either, nor create queues outside his prefix
    conn = pika.BlockingConnection(pika.URLParameters(bob_url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            conn.channel().queue_declare(queue=f"{publisher.queue_prefix(alice)}{uuid.uuid4()}")
        assert refused.value.reply_code == 403
    finally:
        conn.close()
    # alice still gets her message
    assert len(consume(publisher.connection_info(alice)["connection_url"], name, 1)) == 1


def test_credentials_survive_a_manager_restart(broker):
    """The password is derived from the manager's secret: a new publisher (a restarted manager)
    hands out the same working URL, and results queued before are still there."""
    user, group = f"carol-{uuid.uuid4().hex[:6]}", uuid.uuid4()
    first = ResultPublisher(broker)
    name = first.declare_queue(user, group)
    task = uuid.uuid4()
    first.publish(user, group, result(task, "before restart"))
    first.close()
    second = ResultPublisher(broker)
    try:
        info = second.connection_info(user)
        assert info == first.connection_info(user)
        got = consume(info["connection_url"], name, 1)
        assert [res.task_id for _, res in got] == [task]
    finally:
        second.close()


@pytest.mark.parametrize("idle_s", [0.0, 1.5], ids=["at-once", "noticed-while-idle"])
def test_a_result_published_over_a_lost_connection_is_sent_again(publisher, broker, idle_s, caplog):
    """At least once: the broker drops the publisher's connection (as on a broker restart or a
    network cut); the next result fails on the dead connection, is kept, and is sent over a new one."""
    import base64
    import json
    import urllib.request

    caplog.set_level("INFO", logger="dlhub.manager.amqp")
    user, group = f"dave-{uuid.uuid4().hex[:6]}", uuid.uuid4()
    name = publisher.declare_queue(user, group)
    first, second = uuid.uuid4(), uuid.uuid4()
    publisher.publish(user, group, result(first, 1))
    assert publisher.flush(20)

    def api(method: str, path: str):
        req = urllib.request.Request(f"{broker.management_url}/api/{path}", method=method)
        auth = base64.b64encode(f"{broker.admin_user}:{broker.admin_password}".encode()).decode()
        req.add_header("Authorization", f"Basic {auth}")
        req.add_header("X-Reason", "test: cut the publisher's connection")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    mine = []
    for _ in range(50):  # the management API lists connections after a short delay
        mine = [c["name"] for c in api("GET", "connections") if c.get("user") == broker.admin_user]
        if mine:
            break
        time.sleep(0.2)
    assert mine, "the publisher's connection is not listed"
    for conn_name in mine:
        api("DELETE", f"connections/{urllib.request.quote(conn_name, safe='')}")
    time.sleep(idle_s)  # 1.5 s: the publisher's idle heartbeat sees the connection closed first
    publisher.publish(user, group, result(second, 2))
    assert publisher.flush(30)
    got = consume(publisher.connection_info(user)["connection_url"], name, 2)
    assert sorted(str(res.task_id) for _, res in got) == sorted([str(first), str(second)])
    assert any(
        w in r.message for r in caplog.records for w in ("retrying", "reconnecting", "connection lost")
    ), caplog.text


def test_unused_task_group_queues_expire_by_a_broker_policy(publisher, broker):
    """Queues of Executors that never come back are deleted by the broker (policy, not a queue
    argument, so the SDK's passive use and the publisher's declares need not repeat it)."""
    import base64
    import json
    import re
    import urllib.request

    name = publisher.declare_queue(f"erin-{uuid.uuid4().hex[:6]}", uuid.uuid4())
    auth = base64.b64encode(f"{broker.admin_user}:{broker.admin_password}".encode()).decode()
    req = urllib.request.Request(f"{broker.management_url}/api/policies/%2F/{publisher.POLICY}")
    req.add_header("Authorization", f"Basic {auth}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        policy = json.loads(resp.read())
    assert policy["definition"] == {"expires": 7 * 86400 * 1000} and policy["apply-to"] == "queues"
    assert re.match(policy["pattern"], name)
