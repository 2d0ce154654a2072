"""Revocation and token re-issue on a RUNNING manager: `dlhub-manager user revoke|token` write to
the database, and within about a second the manager closes the user's ZeroMQ sessions (new
submits fail with AccessDenied, nothing hangs) and REST answers 401 — no restart. The admin is
unaffected."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import wait_until

from dlhub.executor import AccessDenied

TIMEOUT_S = 30
EFFECT_S = 1.0  # the promise: revocation takes effect within a second
SLACK_S = 0.5  # a loaded test machine


def square(x):
    return x * x


def manager_cli(home, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dlhub.manager.cli", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=home,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def rest_status(url: str, token: str) -> int:
    return httpx.get(
        f"{url}/api/v1/servables", headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).status_code


@pytest.fixture
def hub(custom_stack_factory):
    # the endpoint (the admin's) lets alice submit: its policy, not the default of owner only
    cs = custom_stack_factory(name="rev-ep", endpoint={"policy": {"allowed_users": ["alice", "bob"]}})
    url = cs.manager.api.url
    wait_until(lambda: _up(url), 10, what="the REST server")
    return cs, cs.home / "manager", url


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_revoking_alice_mid_run_stops_her_within_a_second(hub):
    cs, home, url = hub
    token = manager_cli(home, "user", "add", "alice")
    alice, admin = cs.executor(token=token), cs.executor()
    assert alice.submit(square, 3).result(TIMEOUT_S) == 9
    assert rest_status(url, token) == 200

    outcomes: list[tuple[float, str]] = []  # (when the submit began, how it ended)
    stop = threading.Event()

    def submit_in_a_loop() -> None:
        while not stop.is_set():
            began = time.monotonic()
            try:
                alice.submit(square, 2).result(TIMEOUT_S)
                outcomes.append((began, "ok"))
            except AccessDenied:
                outcomes.append((began, "denied"))
                time.sleep(0.01)
            except Exception as exc:  # a hang (TimeoutError) or anything else fails the test below
                outcomes.append((began, repr(exc)))

    looper = threading.Thread(target=submit_in_a_loop, daemon=True)
    looper.start()
    try:
        wait_until(lambda: len(outcomes) >= 5, TIMEOUT_S, what="alice's loop to run")
        assert "revoked 'alice'" in manager_cli(home, "user", "revoke", "alice")
        revoked_at = time.monotonic()
        time.sleep(EFFECT_S + SLACK_S)
        assert rest_status(url, token) == 401  # REST: refused at once
        wait_until(
            lambda: any(began > revoked_at + EFFECT_S + SLACK_S for began, _ in outcomes),
            TIMEOUT_S,
            what="a submit of alice after the revocation to end",
        )
    finally:
        stop.set()
        looper.join(TIMEOUT_S)
    late = [how for began, how in outcomes if began > revoked_at + EFFECT_S + SLACK_S]
    assert late and set(late) == {"denied"}, late
    assert {how for _, how in outcomes} <= {"ok", "denied"}, outcomes  # nothing hung or failed otherwise
    first_denied = min(began for began, how in outcomes if how == "denied")
    assert first_denied - revoked_at < EFFECT_S + SLACK_S

    with pytest.raises(AccessDenied):  # a new session with the revoked token is refused outright
        cs.executor(token=token)
    assert admin.submit(square, 5).result(TIMEOUT_S) == 25  # the admin is unaffected
    assert rest_status(url, cs.token) == 200
    assert "alice" in manager_cli(home, "user", "list")


def test_a_new_token_replaces_the_old_one_at_once(hub):
    cs, home, url = hub
    old = manager_cli(home, "user", "add", "alice")
    alice = cs.executor(token=old)
    assert alice.submit(square, 4).result(TIMEOUT_S) == 16

    new = manager_cli(home, "user", "token", "alice")
    replaced_at = time.monotonic()
    assert new != old
    time.sleep(EFFECT_S + SLACK_S)
    assert rest_status(url, old) == 401 and rest_status(url, new) == 200
    t0 = time.monotonic()
    with pytest.raises(AccessDenied, match="revoked or replaced"):  # the old session is closed
        alice.submit(square, 5).result(TIMEOUT_S)
    assert time.monotonic() - t0 < 5  # refused, not timed out
    assert time.monotonic() - replaced_at < TIMEOUT_S
    fresh = cs.executor(token=new)
    assert fresh.submit(square, 6).result(TIMEOUT_S) == 36
    assert cs.executor().submit(square, 7).result(TIMEOUT_S) == 49  # the admin is unaffected


def test_revoking_an_endpoint_token_closes_its_connection_within_a_second(hub):
    """An endpoint registered with ep-bot's token: at the revoke it is told `access-denied`, its TCP
    connection is closed (the socket monitor sees it end), its reconnect is refused at the
    handshake (nothing answers a new Hello), and the manager shows it disconnected."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    from dlhub.protocol import messages as m
    from dlhub.protocol.curve import secure_dealer

    cs, home, _ = hub
    token = manager_cli(home, "user", "add", "ep-bot", "--role", "endpoint")
    mgr = cs.manager
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        secure_dealer(sock, mgr.endpoint_url, token, mgr.curve_public_key)
        sock.connect(mgr.endpoint_url)

        def ask(msg: m.Message) -> m.Message:
            sock.send(m.pack(msg))
            assert sock.poll(10_000), f"no answer to {type(msg).__name__}"
            return m.unpack(sock.recv())

        hello = m.Hello("endpoint", "bot-ep", token, "s1", {"protocol": m.PROTOCOL_VERSION}, {})
        assert isinstance(ask(hello), m.Welcome)
        assert mgr.status()["endpoints"]["bot-ep"]["connected"]
        assert isinstance(ask(m.Heartbeat({})), m.Heartbeat)

        revoke = subprocess.Popen(
            [sys.executable, "-m", "dlhub.manager.cli", "user", "revoke", "ep-bot", "--home", str(home)],
            stdout=subprocess.DEVNULL,
            cwd=home,
        )
        # the manager sends `access-denied`, then closes the connection 0.3 s later; libzmq may
        # drop a refusal still unread when the connection ends (a real endpoint reads at once):
        # what must happen is the close, and anything that did arrive must be the refusal
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        got, closed, deadline = [], False, time.monotonic() + 30
        while not closed and time.monotonic() < deadline:
            events = dict(poller.poll(1000))
            if sock in events:
                got.append(m.unpack(sock.recv()))
            if monitor in events:
                closed = recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        assert revoke.wait(60) == 0
        assert closed, "the manager did not close the connection"
        assert all(isinstance(r, m.Refused) and r.code == "access-denied" for r in got), got
        sock.send(m.pack(hello), zmq.NOBLOCK)  # queued for a reconnect that ZAP refuses
        assert not sock.poll(2_000), "a revoked endpoint token got an answer"
        assert not mgr.status()["endpoints"]["bot-ep"]["connected"]
        assert "rev-ep" in mgr.status()["endpoints"]  # the admin's endpoint is untouched
        wait_until(lambda: mgr.status()["endpoints"]["rev-ep"]["connected"], TIMEOUT_S, what="rev-ep")
    finally:
        monitor.close(0)
        sock.close(0)
        ctx.term()


def _links_to(port: int) -> set[tuple[str, int]]:
    """Local addresses of this process's established TCP connections to ``port``."""
    import psutil

    return {
        tuple(c.laddr)
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr[1] == port and c.status == psutil.CONN_ESTABLISHED
    }


def test_revoke_closes_alice_s_connection_and_bob_behind_the_same_address_loses_nothing(hub):
    """`user revoke alice` closes alice's TCP connection to the manager (not only her session).
    bob submits in a loop from the same address meanwhile: his connection is closed too (the
    manager cannot tell connections from one address apart), he says Hello again and every one of
    his calls completes: none lost, none failed."""
    cs, home, _ = hub
    port = int(cs.manager.client_url.rsplit(":", 1)[1])
    alice_token = manager_cli(home, "user", "add", "alice")
    bob_token = manager_cli(home, "user", "add", "bob")
    manager_cli(home, "user", "list")
    bob = cs.executor(token=bob_token)
    before = _links_to(port)
    alice = cs.executor(token=alice_token)
    assert alice.submit(square, 3).result(TIMEOUT_S) == 9
    alice_links = _links_to(port) - before
    assert len(alice_links) == 1, alice_links

    done: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def bob_in_a_loop() -> None:
        i = 0
        while not stop.is_set():
            try:
                futs = [bob.submit(square, i + k) for k in range(5)]
                for k, fut in enumerate(futs):
                    assert fut.result(TIMEOUT_S) == (i + k) ** 2
                    done.append(i + k)
            except Exception as exc:
                failures.append(repr(exc))
            i += 5

    looper = threading.Thread(target=bob_in_a_loop, daemon=True)
    looper.start()
    try:
        wait_until(lambda: len(done) >= 20, TIMEOUT_S, what="bob's loop to run")
        manager_cli(home, "user", "revoke", "alice")
        revoked_at = time.monotonic()
        wait_until(lambda: not (alice_links & _links_to(port)), 10, what="alice's connection to close")
        assert time.monotonic() - revoked_at < EFFECT_S + SLACK_S + 1.0
        with pytest.raises(AccessDenied):  # her executor knows: no submit goes into the void
            alice.submit(square, 4).result(5)
        count = len(done)
        wait_until(lambda: len(done) >= count + 20, TIMEOUT_S, what="bob's calls after the revoke")
    finally:
        stop.set()
        looper.join(TIMEOUT_S)
    assert not failures, failures[:3]
    assert done == list(range(len(done)))  # every call of bob's, in order, none lost
