"""Authenticated connections (issue 10, items 1-2): every ZeroMQ connection to the manager is
authenticated during the handshake (ZAP + CURVE keys derived from tokens), and the manager takes
each frame's user from its connection, never from a routing identity.

A real ``dlhub up`` stack (manager and endpoint processes) on 127.0.0.1; the attackers are raw
ZeroMQ sockets in this process.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest
import zmq
from conftest import start_stack, stop_stack, wait_until

from dlhub.protocol import AccessDenied, ManagerUnreachable
from dlhub.protocol import messages as m
from dlhub.protocol.curve import secure_dealer, secure_link_client
from dlhub.protocol.serialize import code_digest, serialize, serialize_function


def _add(x, y):
    return x + y


def _create_user(home, name: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dlhub.manager.cli", "create-user", name, "--home", str(home / "manager")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def hub(stack_factory):
    stack = stack_factory(workers=1)
    return stack, _create_user(stack.home, "alice"), _create_user(stack.home, "bob")


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _dealer(ctx, url: str, identity: bytes | None = None, token: str | None = None, key: str | None = None):
    """A raw DEALER; with ``token`` it authenticates (CURVE when ``key``), else it is a NULL peer."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if identity is not None:
        sock.identity = identity
    if token is not None:
        secure_dealer(sock, url, token, key)
    sock.connect(url)
    return sock


def _hello(token: str, session: str = "s") -> bytes:
    return m.pack(m.Hello("client", "", token, session, {"protocol": m.PROTOCOL_VERSION}, {}))


def _send(sock, frame: bytes) -> None:
    """Send without blocking: a peer whose handshake failed may have nowhere to queue it."""
    try:
        sock.send(frame, zmq.NOBLOCK, copy=False)
    except zmq.Again:
        pass


def _recv(sock, timeout_s: float = 5.0) -> m.Message | None:
    return m.unpack(sock.recv()) if sock.poll(int(timeout_s * 1000)) else None


def _submit_frames(endpoint: str = "local") -> tuple[bytes, list[bytes]]:
    blob = serialize_function(_add)
    digest = code_digest(blob)
    task_id = os.urandom(m.TASK_ID_BYTES)
    rec = [task_id, digest, serialize([[1, 2], {}]), None, "auto", None, None]
    return task_id, [m.pack(m.PutCode(digest, blob)), m.pack(m.Submit(endpoint, [rec]))]


def _task_owner(stack, task_id: bytes) -> str | None:
    with sqlite3.connect(stack.home / "manager" / "dlhub.db", timeout=10) as db:
        row = db.execute("SELECT owner FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
    return row[0] if row else None


def _manager_key(stack) -> str:
    return stack.manager_info["curve_public_key"]


def test_hijacked_identity_is_refused(hub, ctx):
    """The attack: after alice's Hello, a DEALER with no token reusing her routing identity
    submitted as alice. Now nothing it sends reaches the manager; a peer with a key the manager
    does not know, and bob (authenticated) on alice's identity, fare no better."""
    stack, alice, bob = hub
    url, key = stack.manager_info["client_url"], _manager_key(stack)
    identity = b"c:alice-" + os.urandom(8).hex().encode()
    owner = _dealer(ctx, url, identity, alice, key)
    owner.send(_hello(alice))
    assert isinstance(_recv(owner), m.Welcome)

    # the control: alice's own connection submits, and the task is recorded as hers
    mine, frames = _submit_frames()
    for frame in frames:
        owner.send(frame)
    wait_until(lambda: _task_owner(stack, mine) == "alice", 10, what="alice's own task to be recorded")

    attackers = {
        "no token (NULL)": _dealer(ctx, url, identity),
        "unknown CURVE key": _unknown_key_dealer(ctx, url, identity, key),
        "bob's token": _dealer(ctx, url, identity, bob, key),
    }
    stolen = {}
    for name, sock in attackers.items():
        task_id, frames = _submit_frames()
        for frame in frames:
            _send(sock, frame)
        stolen[name] = (task_id, sock)
    time.sleep(1.5)  # group commit is ~5 ms: anything accepted would be in the database by now
    for name, (task_id, sock) in stolen.items():
        assert _task_owner(stack, task_id) is None, f"{name}: its task was recorded"
        reply = _recv(sock, 0.2)
        assert reply is None or isinstance(reply, m.Refused), f"{name} got {reply!r}"
    owner.send(m.pack(m.Heartbeat({})))  # alice's session is still hers
    replies = iter(lambda: _recv(owner), None)  # her own results may come first
    assert any(isinstance(reply, m.Heartbeat) for reply in replies)


def _unknown_key_dealer(ctx, url: str, identity: bytes, server_key: str):
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = identity
    public, secret = zmq.curve_keypair()
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key.encode(), public, secret
    sock.connect(url)
    return sock


@pytest.mark.parametrize("port", ["client_url", "endpoint_url"])
def test_unauthenticated_peer_gets_no_frame_in(hub, ctx, port):
    """Before: a token-less Hello was read and answered (Refused). Now the handshake fails, so no
    frame reaches the loop and nothing comes back, on both manager ports."""
    stack, _, _ = hub
    url, key = stack.manager_info[port], _manager_key(stack)
    for sock in (_dealer(ctx, url), _unknown_key_dealer(ctx, url, b"x", key)):
        _send(sock, _hello(""))
        _send(sock, m.pack(m.StatusRequest(1)))
        assert _recv(sock, 1.0) is None


def test_hello_with_another_users_token_is_refused(hub, ctx):
    """Hello's token is a second check: on alice's connection, bob's token is refused."""
    stack, alice, bob = hub
    sock = _dealer(ctx, stack.manager_info["client_url"], None, alice, _manager_key(stack))
    sock.send(_hello(bob))
    reply = _recv(sock)
    assert isinstance(reply, m.Refused) and reply.code == "access-denied", reply


def test_wrong_token_and_wrong_key_fail_fast_and_clearly(hub):
    """The Executor reports a refused handshake at once, not after its connect timeout."""
    from dlhub.executor import Executor

    stack, alice, _ = hub
    url = stack.manager_info["client_url"]
    started = time.monotonic()
    with pytest.raises(AccessDenied, match="token refused"):
        Executor("local", url, "dlh_not-a-token", home=str(stack.home), connect_timeout_s=20)
    wrong_key = zmq.curve_keypair()[0].decode()
    with pytest.raises(AccessDenied, match="manager key .* is probably not this manager's"):
        Executor("local", url, alice, home=str(stack.home), manager_key=wrong_key, connect_timeout_s=20)
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match="is not a CURVE public key"):
        Executor("local", url, alice, home=str(stack.home), manager_key="short")
    admin = (stack.home / "manager" / "admin.token").read_text().strip()  # may use `local`
    with Executor("local", url, admin, home=str(stack.home)) as ex:  # the right key: found locally
        assert ex.submit(_add, 2, 3).result(60) == 5


def test_curve_is_on_a_token_without_the_key_cannot_connect(hub):
    """The right token over an unencrypted (PLAIN) link is refused: the manager speaks only CURVE."""
    from dlhub.executor.connection import Connection

    stack, alice, _ = hub
    assert len(_manager_key(stack)) == 40
    config = (stack.home / "config.json").read_text()
    assert _manager_key(stack) in config  # `dlhub up` pinned it for clients
    assert "key:" in (stack.endpoint_dir / "config.yaml").read_text()  # and for its endpoint
    with pytest.raises(AccessDenied, match="does not accept unencrypted links"):
        Connection(stack.manager_info["client_url"], alice, on_results=lambda r: None, connect_timeout_s=10)
    # an address off this host needs a pinned key: no unencrypted fallback
    with pytest.raises(ValueError, match="no CURVE key is known"):
        Connection("tcp://192.0.2.1:5580", alice, on_results=lambda r: None)
    assert (stack.home / "manager" / "curve.key").stat().st_mode & 0o777 == 0o600


def test_large_frame_from_unauthenticated_peer_is_never_read(hub, ctx):
    """Before: 200 MB frames were read in full before any token check (+RSS). Now the peer never
    completes the handshake, so the manager's memory stays flat."""
    stack, _, _ = hub
    manager = psutil.Process(stack.manager_info["pid"])
    url, key = stack.manager_info["client_url"], _manager_key(stack)
    before = manager.memory_info().rss
    big = b"\x01" + bytes(200 * 2**20)
    socks = [_dealer(ctx, url, b"big-null"), _unknown_key_dealer(ctx, url, b"big-curve", key)]
    for sock in socks:
        _send(sock, big)
    del big
    peak, deadline = before, time.monotonic() + 3  # the peak: a frame read and freed shows here
    while time.monotonic() < deadline:
        peak = max(peak, manager.memory_info().rss)
        time.sleep(0.01)
    grown = peak - before
    assert grown < 50 * 2**20, f"the manager grew by {grown / 2**20:.0f} MB"


def test_non_loopback_bind_without_curve_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dlhub.manager.cli", "serve", "--home", str(tmp_path), "--host", "0.0.0.0"]
        + ["--insecure-loopback", "--no-rest"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "without CURVE is refused" in proc.stderr and "--insecure-loopback" in proc.stderr


def test_insecure_loopback_still_checks_tokens(tmp_path):
    """PLAIN mode (loopback only, when asked): no encryption, but the token is still checked
    during the handshake, and a CURVE client is told the manager does not speak it."""
    from dlhub.executor.connection import Connection
    from dlhub.manager import Manager, ManagerConfig

    mgr = Manager(ManagerConfig(home=tmp_path / "manager", rest_port=None, insecure_loopback=True))
    mgr.start_thread()
    try:
        token = (tmp_path / "manager" / "admin.token").read_text().strip()
        conn = Connection(mgr.client_url, token, on_results=lambda r: None)
        assert conn.welcome["user"] == "admin"
        conn.close()
        with pytest.raises(AccessDenied, match="token refused"):
            Connection(mgr.client_url, "dlh_wrong", on_results=lambda r: None)
        # which of the two the client sees first depends on timing; both name the CURVE mismatch
        mismatch = "does not\\s+speak CURVE|closed the connection during the CURVE handshake"
        with pytest.raises(AccessDenied, match=mismatch):
            Connection(
                mgr.client_url, token, on_results=lambda r: None, server_key=zmq.curve_keypair()[0].decode()
            )
    finally:
        mgr.stop()


def test_tokens_from_before_curve(tmp_path):
    """A database from before keys were stored: the admin's key is backfilled from admin.token;
    another user is refused at the handshake until `create-user` re-issues the token."""
    from dlhub.executor.connection import Connection
    from dlhub.manager import Manager, ManagerConfig
    from dlhub.manager.auth import create_user
    from dlhub.manager.store import make_engine

    home = tmp_path / "manager"
    engine = make_engine(f"sqlite:///{home / 'dlhub.db'}")
    config = ManagerConfig(home=home, rest_port=None)
    first = Manager(config)
    first.start_thread()  # creates the admin
    first.stop()
    old = create_user(engine, "carol")
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE users SET curve_key = NULL")
    mgr = Manager(config)
    mgr.start_thread()
    try:
        assert mgr.users_without_keys == ["carol"]
        admin = (home / "admin.token").read_text().strip()
        key = mgr.curve_public_key
        Connection(mgr.client_url, admin, on_results=lambda r: None, server_key=key).close()
        with pytest.raises(AccessDenied, match="token refused"):
            Connection(mgr.client_url, old, on_results=lambda r: None, server_key=key)
        new = create_user(engine, "carol")
        conn = Connection(mgr.client_url, new, on_results=lambda r: None, server_key=key)
        assert conn.welcome["user"] == "carol"
        conn.close()
    finally:
        mgr.stop()


def test_unreachable_message_unchanged_when_nothing_listens():
    from dlhub.executor.connection import Connection

    with pytest.raises(ManagerUnreachable, match="no dlhub manager listens"):
        Connection(
            "tcp://127.0.0.1:1", "t", on_results=lambda r: None, server_key=zmq.curve_keypair()[0].decode()
        )


def test_worker_links_are_curve_too(hub, ctx):
    """The endpoint's worker socket is a CURVE server with per-session keys from pool.json (0600):
    a peer without them gets no frame in, even with the right pool token; with them, frames are
    read (a wrong pool token is answered)."""
    stack, _, _ = hub
    pool_json = stack.endpoint_dir / "pool-default.json"
    assert pool_json.stat().st_mode & 0o777 == 0o600
    cfg = json.loads(pool_json.read_text())
    assert set(cfg["curve"]) == {"server_public", "client_public", "client_secret"}  # no server secret
    url = cfg["endpoint_url"]

    def worker_hello(token: str) -> bytes:
        return m.pack(m.Hello("worker", "w-test", token, "w-test", {"protocol": m.PROTOCOL_VERSION}, {}))

    plain = _dealer(ctx, url, b"w:intruder")
    _send(plain, worker_hello(cfg["token"]))
    assert _recv(plain, 1.0) is None
    keyed = ctx.socket(zmq.DEALER)
    keyed.linger = 0
    secure_link_client(keyed, cfg)
    keyed.connect(url)
    keyed.send(worker_hello("not-the-pool-token"))
    reply = _recv(keyed)
    assert isinstance(reply, m.Refused) and reply.code == "access-denied", reply


def _echo(x):
    return x


def test_insecure_loopback_stack_links_its_workers_with_a_password(tmp_path, ctx):
    """`dlhub up --insecure-loopback`: nothing on this host is encrypted, the workers' links
    neither (``worker_link: plain``), but they are still authenticated: pool.json holds a
    per-session PLAIN password (no CURVE keys), a peer with another password gets no frame in,
    one with it still needs the pool token; tasks run, large payloads too."""
    import numpy as np
    import yaml

    stack = start_stack(tmp_path / "home", workers=1, up_args=("--insecure-loopback",))
    try:
        config = yaml.safe_load((stack.endpoint_dir / "config.yaml").read_text())
        assert config["worker_link"] == "plain" and "key" not in config["manager"]
        cfg = json.loads((stack.endpoint_dir / "pool-default.json").read_text())
        assert "curve" not in cfg and len(cfg["plain"]["password"]) == 40
        ex = stack.executor()
        assert ex.submit(pow, 2, 5).result(60) == 32
        arr = np.arange(2**20, dtype=np.float64)  # 8 MB: its own frame on every hop
        assert np.array_equal(ex.submit(_echo, arr).result(60), arr)

        versions = {"protocol": m.PROTOCOL_VERSION}
        hello = m.pack(m.Hello("worker", "w-test", cfg["token"], "w-test", versions, {}))
        wrong = ctx.socket(zmq.DEALER)
        wrong.linger = 0
        wrong.plain_username, wrong.plain_password = b"pool", b"not-the-password"
        wrong.connect(cfg["endpoint_url"])
        _send(wrong, hello)
        assert _recv(wrong, 1.0) is None
        keyed = ctx.socket(zmq.DEALER)
        keyed.linger = 0
        secure_link_client(keyed, cfg)
        keyed.connect(cfg["endpoint_url"])
        keyed.send(m.pack(m.Hello("worker", "w-test", "not-the-pool-token", "w-test", {}, {})))
        reply = _recv(keyed)
        assert isinstance(reply, m.Refused) and reply.code == "access-denied", reply
    finally:
        stop_stack(stack)


def test_rest_over_tls(tmp_path):
    """`serve --tls-cert/--tls-key`: the REST API answers HTTPS (a self-signed certificate here)."""
    import ssl
    import urllib.request

    from dlhub.manager import Manager, ManagerConfig

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        ManagerConfig(home=tmp_path / "manager", tls_cert=str(cert))
    mgr = Manager(ManagerConfig(home=tmp_path / "manager", tls_cert=str(cert), tls_key=str(key)))
    mgr.start_thread()
    try:
        assert mgr.api.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        body = wait_until(
            lambda: urllib.request.urlopen(f"{mgr.api.url}/api/v1/health", context=context, timeout=5).read(),
            20,
        )
        assert b"ok" in body
    finally:
        mgr.stop()
