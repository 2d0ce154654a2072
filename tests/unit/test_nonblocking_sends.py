"""The endpoint's and the worker's sends never block (issue 10 leftover, issue 11).

A DEALER refused at the CURVE handshake (a ZAP denial: the peer restarted with new keys) has no
connection left, and a plain send then blocks forever. Here a real ROUTER with the endpoint's
link security denies a client whose key it does not know; the endpoint's send to its manager and
a worker's flush of results must return at once, say why, and keep the results.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import zmq

from dlhub.endpoint.config import parse_config
from dlhub.endpoint.daemon import Endpoint
from dlhub.endpoint.worker import Worker
from dlhub.protocol import messages as m
from dlhub.protocol.curve import (
    new_link_keys,
    secure_link_client,
    secure_link_server,
    start_link_authenticator,
)


@pytest.fixture
def refused_dealer():
    """A DEALER whose handshake the server's ZAP handler denied: no connection is left."""
    ctx = zmq.Context()
    server_keys, stranger = new_link_keys(), new_link_keys()
    auth = start_link_authenticator(ctx, server_keys["client_public"])
    server = ctx.socket(zmq.ROUTER)
    secure_link_server(server, server_keys)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.setsockopt(zmq.SNDHWM, 0)
    secure_link_client(client, {"curve": {**stranger, "server_public": server_keys["server_public"]}})
    client.connect(f"tcp://127.0.0.1:{port}")
    deadline = time.monotonic() + 10
    while True:  # the precondition: once denied, even a no-wait send finds no pipe
        try:
            client.send(b"probe", zmq.NOBLOCK)
        except zmq.Again:
            break
        assert time.monotonic() < deadline, "the handshake was never refused"
        time.sleep(0.1)
    try:
        yield client
    finally:
        client.close(0)
        server.close(0)
        auth.stop()
        ctx.destroy(0)


def returns_within(fn, seconds: float = 3.0) -> bool:
    done = threading.Event()

    def run():
        fn()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


def test_the_endpoint_drops_a_message_to_a_manager_that_refused_it_and_says_so(
    refused_dealer, tmp_path, caplog
):
    config = parse_config({"name": "ep", "manager": {"address": "tcp://127.0.0.1:1", "token": "t"}})
    ep = Endpoint(config, tmp_path)
    ep.manager_sock = refused_dealer
    with caplog.at_level(logging.WARNING, logger="dlhub.endpoint"):
        assert returns_within(lambda: ep._to_manager(m.Heartbeat({}))), "the send blocked the loop"
        assert returns_within(lambda: ep._to_manager(m.Heartbeat({})))
    warnings = [r.getMessage() for r in caplog.records if "no connection to the manager" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per outage, not once per message
    assert "Heartbeat" in warnings[0]


def test_a_worker_keeps_its_results_when_the_endpoint_refused_it(refused_dealer, capfd):
    worker = Worker({"endpoint_url": "tcp://127.0.0.1:1"}, "p.0", "p")
    worker.sock = refused_dealer
    result = m.result_record(b"\x00" * m.TASK_ID_BYTES, "succeeded", b"\x01\x00")
    worker.unsent = [result]
    assert returns_within(worker._flush), "the worker's send blocked"
    assert worker.unsent == [result]  # kept for the next flush
    assert "no connection to the endpoint" in capfd.readouterr().err
