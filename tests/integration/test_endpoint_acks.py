"""An endpoint's results are acknowledged after their commit in batches (``ENDPOINT_ACK_DELAY_S``):
every result of a serial caller is acknowledged, once, in fewer ``Accepted`` messages than
results. A real manager (in process), a real client
connection, and a hand-made endpoint link that answers each task at once."""

from __future__ import annotations

import os
import threading
import time
import uuid

import zmq

from dlhub.executor.connection import Connection
from dlhub.manager import Manager, ManagerConfig
from dlhub.manager.acks import ENDPOINT_ACK_DELAY_S
from dlhub.protocol import messages as m
from dlhub.protocol.curve import secure_dealer
from dlhub.protocol.serialize import runtime_versions

CALLS = 40


def test_serial_results_are_all_acknowledged_in_fewer_messages(tmp_path):
    mgr = Manager(ManagerConfig(home=tmp_path / "manager", rest_port=None))
    mgr.start_thread()
    ctx = zmq.Context()
    ep = ctx.socket(zmq.DEALER)
    conn = None
    try:
        token = (tmp_path / "manager" / "admin.token").read_text().strip()
        ep.setsockopt(zmq.LINGER, 0)
        ep.setsockopt(zmq.IDENTITY, f"e:acks:{uuid.uuid4().hex[:8]}".encode())
        secure_dealer(ep, mgr.endpoint_url, token, mgr.curve_public_key)
        ep.connect(mgr.endpoint_url)
        versions = {**runtime_versions(), "protocol": m.PROTOCOL_VERSION}
        ep.send(m.pack(m.Hello("endpoint", "acks", token, uuid.uuid4().hex[:8], versions, {})))
        assert ep.poll(10_000) and isinstance(m.unpack(ep.recv()), m.Welcome)

        arrived = threading.Event()
        conn = Connection(
            mgr.client_url, token, on_results=lambda results: arrived.set(), server_key=mgr.curve_public_key
        )
        acked: list[bytes] = []
        accepted_messages = 0
        answered: list[bytes] = []

        def serve(until) -> None:
            """Answer Tasks at once; count what is acknowledged, until ``until()``."""
            nonlocal accepted_messages
            deadline = time.monotonic() + 10
            while not until():
                assert time.monotonic() < deadline, "not done after 10 s"
                if not ep.poll(5):  # short: the client's result comes on its own link
                    continue
                msg = m.unpack(ep.recv())
                if isinstance(msg, m.Tasks):
                    results = [m.result_record(t[m.T_ID], "succeeded", b"\x01\x90") for t in msg.tasks]
                    answered.extend(t[m.T_ID] for t in msg.tasks)
                    ep.send(m.pack(m.Results(results)))
                elif isinstance(msg, m.Accepted):
                    accepted_messages += 1
                    acked.extend(msg.task_ids)

        for _ in range(CALLS):  # serial: the next call after the previous result
            arrived.clear()
            task = m.task_record(os.urandom(m.TASK_ID_BYTES), "sha256:" + "0" * 64, b"\x01\x90")
            conn.submit("acks", task, lambda: True)
            serve(arrived.is_set)
        start = time.monotonic()
        serve(lambda: set(acked) >= set(answered))
        assert len(answered) == CALLS and set(acked) == set(answered)
        assert len(acked) == CALLS  # each once
        assert time.monotonic() - start < 5 + ENDPOINT_ACK_DELAY_S
        assert accepted_messages < CALLS // 2, f"{accepted_messages} Accepted for {CALLS} results"
    finally:
        if conn is not None:
            conn.close()
        ep.close(0)
        ctx.term()
        mgr.stop()
