"""The manager's turn is bounded by work (issue 10, item 7): ``Manager._drain`` reads frames for
at most its budget, and what it leaves is read next turn, in order, nothing lost. Real ZeroMQ
sockets on 127.0.0.1 with PLAIN authentication (the broker reads each frame's ``User-Id``)."""

from __future__ import annotations

import time

import pytest
import zmq
from zmq.auth.thread import ThreadAuthenticator

from dlhub.manager.broker import Manager
from dlhub.manager.client_backlog import ClientBacklog
from dlhub.protocol import messages as m

FRAMES = 300


@pytest.fixture
def link():
    """A ROUTER (the manager's side) and a DEALER that has sent FRAMES heartbeats to it."""
    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_plain(domain="*", passwords={"alice": "secret"})
    router = ctx.socket(zmq.ROUTER)
    router.plain_server = True
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.plain_username, dealer.plain_password = b"alice", b"secret"
    dealer.linger = 0
    dealer.connect(f"tcp://127.0.0.1:{port}")
    for i in range(FRAMES):
        dealer.send(m.pack(m.Heartbeat({"n": i})))
    assert router.poll(10_000), "the heartbeats did not arrive"
    yield router
    dealer.close()
    router.close()
    auth.stop()
    ctx.term()


class Broker:
    """What ``_drain`` needs of a Manager besides the handler and admission check it is given:
    its client socket and the slices of Submits waiting (none: this link is not the client one)."""

    _drain = Manager._drain
    client_sock = None
    _backlog = ClientBacklog()


def test_a_turn_reads_for_its_budget_and_leaves_the_rest_in_order(link):
    seen: list[int] = []

    def slow_handler(identity, msg):  # ~1 ms a frame: a flood of heavy submissions
        seen.append(msg.info["n"])
        time.sleep(0.001)

    broker = Broker()
    broker._drain(link, slow_handler, lambda sock, identity, user, msg: user == "alice", 0.02)
    first = len(seen)
    assert 1 <= first < FRAMES / 3  # ~20 frames in 20 ms, not all 300
    assert link.get(zmq.EVENTS) & zmq.POLLIN  # the rest still waits: the next turn's poll sees it
    turns = 1
    while len(seen) < FRAMES and turns < 1000:
        broker._drain(link, slow_handler, lambda *args: True, 0.02)
        turns += 1
    assert seen == list(range(FRAMES))  # every frame, once, in the order sent
    assert turns >= 3


def test_a_full_client_backlog_holds_back_only_the_client_link(link):
    """Past its limit the client backlog (Submit slices, frames behind them) stops the reading of
    client frames, but results (the endpoint link) are read meanwhile."""
    seen: list[int] = []
    broker = Broker()
    broker._backlog = ClientBacklog(limit=1)
    broker._backlog.put_rest(b"identity", "session", m.Submit("ep", []))
    broker.client_sock = link  # this link as the client link: nothing is read while it is full
    broker._drain(link, lambda identity, msg: seen.append(msg.info["n"]), lambda *args: True, 0.02)
    assert seen == [] and link.get(zmq.EVENTS) & zmq.POLLIN
    broker.client_sock = object()  # this link as another one: read as usual
    broker._drain(link, lambda identity, msg: seen.append(msg.info["n"]), lambda *args: True, 0.02)
    assert seen[:3] == [0, 1, 2]
