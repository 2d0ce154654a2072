"""The endpoint keeps the manager's turns and its own short: results go to the manager at most
``RESULTS_PER_MESSAGE`` a message (first sends and resends after a Welcome alike, each part with
the uncacheable flags), and the manager link is read for at most a budget a turn, the rest on
the next turns, each frame once. Real ZeroMQ sockets on both sides of the link."""

from __future__ import annotations

import os
import time

import pytest
import zmq

from dlhub.endpoint import daemon
from dlhub.endpoint import events as ev
from dlhub.endpoint.config import parse_config
from dlhub.endpoint.daemon import Endpoint
from dlhub.protocol import messages as m


@pytest.fixture
def endpoint_and_manager_end(tmp_path):
    """An Endpoint (not started) whose manager link is a real DEALER connected to a ROUTER here."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    config = parse_config({"name": "ep", "manager": {"address": f"tcp://127.0.0.1:{port}", "token": "t"}})
    ep = Endpoint(config, tmp_path)
    ep.manager_sock = dealer
    try:
        yield ep, router
    finally:
        dealer.close(0)
        router.close(0)
        ctx.term()


def _received(router, count: int) -> list[m.Results]:
    out = []
    for _ in range(count):
        assert router.poll(5000), f"only {len(out)} of {count} messages"
        _identity, frame = router.recv_multipart()
        out.append(m.unpack(frame))
    assert not router.poll(200), "more messages than expected"
    return out


def _results(n: int) -> list:
    return [m.result_record(os.urandom(m.TASK_ID_BYTES), "succeeded", b"\x01\x90") for _ in range(n)]


def test_results_go_to_the_manager_in_bounded_messages_with_their_flags(endpoint_and_manager_end):
    ep, router = endpoint_and_manager_end
    per = daemon.RESULTS_PER_MESSAGE
    results = _results(2 * per + 7)
    flagged = results[-1][m.R_ID].hex()
    ep._carry_out([ev.SendResults(results, {"uncacheable": [flagged]})])
    sent = _received(router, 3)  # one message of 2 * per + 7 before the bound
    assert [len(msg.results) for msg in sent] == [per, per, 7]
    assert [r for msg in sent for r in msg.results] == results
    assert all(m.uncacheable_ids(msg.info) == {results[-1][m.R_ID]} for msg in sent)
    assert set(ep.unacked) == {r[m.R_ID] for r in results}  # kept until acknowledged

    # after a Welcome (the manager restarted): everything unacknowledged again, bounded the same way
    ep._on_manager(m.Welcome({}))
    again = _received(router, 3)
    assert sorted(r[m.R_ID] for msg in again for r in msg.results) == sorted(ep.unacked)
    assert max(len(msg.results) for msg in again) == per


def test_the_manager_link_is_read_for_a_budget_a_turn_and_every_frame_once(endpoint_and_manager_end):
    ep, router = endpoint_and_manager_end
    results = _results(70)
    ep._carry_out([ev.SendResults(results)])
    assert router.poll(5000)
    identity = router.recv_multipart()[0]

    def acks_arrive(results: list) -> None:
        """One Accepted a message (as a slow manager might send them), all at the endpoint."""
        for res in results:
            router.send_multipart([identity, m.pack(m.Accepted([res[m.R_ID]]))])
        time.sleep(0.3)

    acks_arrive(results[:60])
    for turn in range(60):  # a budget spent at once: one frame a turn, each read once
        ep._drain(ep.manager_sock, None, 0.0)
        assert len(ep.unacked) == 70 - (turn + 1)
    ep._drain(ep.manager_sock, None, 0.0)
    assert len(ep.unacked) == 10  # nothing more was waiting
    acks_arrive(results[60:])
    ep._drain(ep.manager_sock, None)  # no budget: everything waiting, in one turn
    assert not ep.unacked
