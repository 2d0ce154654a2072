"""A large Submit is taken ``SUBMIT_SLICE`` tasks at a time (a manager turn is bounded by work, not
by message size), and nothing overtakes its slices: every task reaches the endpoint once, in the
order it was sent, and a Cancel sent right after the Submit finds the last task. A real manager (in
process, its Router's event log on), a raw client link and a hand-made endpoint link."""

from __future__ import annotations

import os
import time
import uuid

import zmq

from dlhub.manager import Manager, ManagerConfig
from dlhub.manager import events as rev
from dlhub.manager.broker import SUBMIT_SLICE
from dlhub.protocol import messages as m
from dlhub.protocol.curve import secure_dealer
from dlhub.protocol.serialize import runtime_versions

TASKS = 3 * SUBMIT_SLICE + 40


def _say_hello(sock, role: str, name: str, token: str) -> None:
    versions = {**runtime_versions(), "protocol": m.PROTOCOL_VERSION}
    sock.send(m.pack(m.Hello(role, name, token, uuid.uuid4().hex[:8], versions, {})))
    assert sock.poll(10_000), f"no answer to the {role}'s Hello"
    assert isinstance(m.unpack(sock.recv()), m.Welcome)


def _link(ctx, mgr, token: str, role: str, ident: str):
    """A DEALER on the manager's ``role`` link ("endpoint" or "client"), past its Hello."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, f"{ident}:{uuid.uuid4().hex[:8]}".encode())
    url = mgr.endpoint_url if role == "endpoint" else mgr.client_url
    secure_dealer(sock, url, token, mgr.curve_public_key)
    sock.connect(url)
    _say_hello(sock, role, "slices" if role == "endpoint" else "", token)
    return sock


def test_a_large_submit_goes_in_slices_in_order_and_a_cancel_after_it_finds_its_last_task(
    tmp_path, monkeypatch
):
    log_path = tmp_path / "router-events.log"
    monkeypatch.setenv("DLHUB_ROUTER_EVENT_LOG", str(log_path))
    mgr = Manager(ManagerConfig(home=tmp_path / "manager", rest_port=None))
    mgr.start_thread()
    ctx = zmq.Context()
    socks = []
    try:
        token = (tmp_path / "manager" / "admin.token").read_text().strip()
        ep = _link(ctx, mgr, token, "endpoint", "e:slices")
        socks.append(ep)
        client = _link(ctx, mgr, token, "client", "c:slices")
        socks.append(client)

        ids = [os.urandom(m.TASK_ID_BYTES) for _ in range(TASKS)]
        tasks = [m.task_record(t, "sha256:" + "0" * 64, b"\x01\x90") for t in ids]
        client.send(m.pack(m.Submit("slices", tasks)))
        client.send(m.pack(m.Cancel([ids[-1]])))  # right behind it, on the same link

        arrived: list[bytes] = []
        cancelled_after: int | None = None  # how many tasks had arrived when the Cancel came
        deadline = time.monotonic() + 20
        while cancelled_after is None or len(arrived) < TASKS:
            assert time.monotonic() < deadline, f"{len(arrived)} of {TASKS} tasks, cancel: {cancelled_after}"
            if not ep.poll(100):
                continue
            msg = m.unpack(ep.recv())
            if isinstance(msg, m.Tasks):
                arrived.extend(t[m.T_ID] for t in msg.tasks)
            elif isinstance(msg, m.Cancel) and ids[-1] in msg.task_ids:
                cancelled_after = len(arrived)
        assert arrived == ids  # each once, in the order sent
        assert cancelled_after == TASKS  # the Cancel did not overtake the slices
    finally:
        for sock in socks:
            sock.close(0)
        mgr.stop()
        ctx.term()

    submitted = [e for e in rev.read_events(log_path) if isinstance(e, rev.ClientSubmitted)]
    sizes = [len(e.msg.tasks) for e in submitted]
    assert sizes == [SUBMIT_SLICE] * 3 + [40], sizes  # one event of 808 without the slices
    assert [t[m.T_ID] for e in submitted for t in e.msg.tasks] == ids


def test_another_clients_frame_is_not_held_up_by_a_large_submits_slices(tmp_path, monkeypatch):
    """Only the sliced Submit's own client waits behind its slices: a second client's Submit, sent
    right after a large one, is routed between its slices, not after the last one."""
    log_path = tmp_path / "router-events.log"
    monkeypatch.setenv("DLHUB_ROUTER_EVENT_LOG", str(log_path))
    mgr = Manager(ManagerConfig(home=tmp_path / "manager", rest_port=None))
    mgr.start_thread()
    ctx = zmq.Context()
    big = 8 * SUBMIT_SLICE
    socks = []
    try:
        token = (tmp_path / "manager" / "admin.token").read_text().strip()
        for role, ident in (("endpoint", "e:slices"), ("client", "c:a"), ("client", "c:b")):
            socks.append(_link(ctx, mgr, token, role, ident))
        ep, alice, bob = socks

        alice_ids = [os.urandom(m.TASK_ID_BYTES) for _ in range(big)]
        bob_id = os.urandom(m.TASK_ID_BYTES)
        fn = "sha256:" + "0" * 64
        alice.send(m.pack(m.Submit("slices", [m.task_record(t, fn, b"\x01\x90") for t in alice_ids])))
        bob.send(m.pack(m.Submit("slices", [m.task_record(bob_id, fn, b"\x01\x90")])))

        arrived: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(arrived) < big + 1:
            assert time.monotonic() < deadline, f"{len(arrived)} of {big + 1} tasks"
            if ep.poll(100):
                msg = m.unpack(ep.recv())
                if isinstance(msg, m.Tasks):
                    arrived.extend(t[m.T_ID] for t in msg.tasks)
    finally:
        for sock in socks:
            sock.close(0)
        mgr.stop()
        ctx.term()

    assert [t for t in arrived if t != bob_id] == alice_ids  # hers each once, in order
    submitted = [e for e in rev.read_events(log_path) if isinstance(e, rev.ClientSubmitted)]
    bobs_turn = next(i for i, e in enumerate(submitted) if e.msg.tasks[0][m.T_ID] == bob_id)
    slices_after = len(submitted) - 1 - bobs_turn
    assert slices_after >= 1, f"bob's Submit was routed after all {len(submitted) - 1} of alice's slices"
