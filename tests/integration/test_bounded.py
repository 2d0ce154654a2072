"""Bounded and private, on a real `dlhub up` stack: REST bodies refused before they are read
(token first, then size), out-of-range integers answered 422 naming the parameter, LIKE
wildcards literal in filters, uvicorn's header and idle limits; and a malformed Heartbeat or
result from an endpoint neither breaks /metrics, /api/v1/metrics and `dlhub status` nor leaves
a task unfinished."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
import uuid
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
import zmq
from conftest import meta, wait_until

from dlhub.protocol import messages as m
from dlhub.protocol.curve import secure_dealer
from dlhub.protocol.serialize import runtime_versions

MB = 1024 * 1024


@pytest.fixture(scope="module")
def hub(stack_factory):
    """A private stack (its manager's RSS is measured, and a fake endpoint joins it), started
    under umask 000 so that only explicit modes keep its files private."""
    old_umask = os.umask(0)
    try:
        s = stack_factory(workers=1)
    finally:
        os.umask(old_umask)
    config = json.loads((s.home / "config.json").read_text())
    with httpx.Client(base_url=config["rest_url"], timeout=60) as http:
        yield s, http, {"Authorization": f"Bearer {config['token']}"}, config


def _rss(stack) -> int:
    return psutil.Process(stack.manager_info["pid"]).memory_info().rss


def _raw(url: str, head: str, body_chunks=(), timeout: float = 10.0) -> tuple[int, dict | str, float]:
    """Send a request by hand (headers, then body chunks, stopping if the server closes), and
    return (status, JSON body or text, seconds until the answer)."""
    parts = urlsplit(url)
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(head.encode())
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the end: the answer is waiting
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < _expected(data):
                got = sock.recv(65536)
                if not got:
                    break
                data += got
        except ConnectionResetError:
            pass
    elapsed = time.monotonic() - started
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    try:
        return status, json.loads(body), elapsed
    except ValueError:
        return status, body.decode(errors="replace"), elapsed


def _expected(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":", 1)[1])
    return len(data) + 1


def _post_head(path: str, length: int | None, token: str | None, ctype: str = "application/json") -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {ctype}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    return "\r\n".join(lines) + "\r\n\r\n"


RUN = "/api/v1/servables/admin/anything/run"


def test_a_huge_body_without_a_token_is_refused_before_it_is_read(hub):
    """The attack: 96 MB of JSON to POST /run with no token. Now: 401 at once, nothing read."""
    stack, _, _, config = hub
    before = _rss(stack)
    body = b'{"args": [' + b"1," * (48 * MB - 8) + b"1]}"
    status, answer, elapsed = _raw(
        config["rest_url"],
        _post_head(RUN, len(body), None),
        [body[i : i + MB] for i in range(0, len(body), MB)],
    )
    assert status == 401 and answer["code"] == "access-denied", answer
    assert elapsed < 10
    assert _rss(stack) - before < 20 * MB
    # no body sent at all: the answer does not wait for it
    status, answer, elapsed = _raw(config["rest_url"], _post_head(RUN, 96 * MB, "dlh_wrong"), timeout=5)
    assert (status, answer["code"]) == (401, "access-denied") and elapsed < 5


def test_a_small_body_without_a_token_gets_its_401_not_a_connection_reset(hub):
    """The 401 comes before the body is read; closing with a small body unread made the kernel
    reset the connection, so a client still sending saw "connection reset" instead (seen in CI)."""
    stack, _, _, config = hub
    files = [("files", ("mod.py", b"x = 1\n" * 150_000, "text/x-python"))]  # ~900 KB, under the drain
    with httpx.Client(base_url=config["rest_url"], timeout=30) as http:
        for _ in range(20):
            r = http.post("/api/v1/servables", data={"record": "{}"}, files=files)
            assert r.status_code == 401 and r.json()["code"] == "access-denied", r.text


def test_a_body_over_the_limit_is_413_from_its_length(hub):
    stack, _, _, config = hub
    status, answer, elapsed = _raw(config["rest_url"], _post_head(RUN, 96 * MB, config["token"]), timeout=5)
    assert status == 413 and answer["code"] == "payload-too-large", answer
    assert "at most" in answer["message"] and elapsed < 5
    # publish keeps its own, larger limit (the files of a servable)
    head = _post_head("/api/v1/servables", 2048 * MB, config["token"], "multipart/form-data; boundary=x")
    status, answer, _ = _raw(config["rest_url"], head, timeout=5)
    assert status == 413 and "publish" in answer["message"], answer


def test_a_streamed_body_is_cut_at_the_limit(hub):
    """No Content-Length (chunked): counted as it arrives, refused at 32 MiB."""
    stack, _, _, config = hub
    before = _rss(stack)
    chunk = b"%x\r\n%s\r\n" % (MB, b" " * MB)
    chunks = [chunk] * 64 + [b"0\r\n\r\n"]
    status, answer, _ = _raw(config["rest_url"], _post_head(RUN, None, config["token"]), chunks, timeout=30)
    assert status == 413 and answer["code"] == "payload-too-large", answer
    assert _rss(stack) - before < 48 * MB


def test_small_bodies_still_work(hub):
    _, http, admin, _ = hub
    r = http.post(RUN, json={"args": [1], "wait_s": 0}, headers=admin)
    assert r.status_code == 404 and r.json()["code"] == "servable-not-found"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "parameter"),
    [
        ("get", "/api/v1/servables/admin/x", {"params": {"version": 9223372036854775808}}, "version"),
        ("get", "/api/v1/servables/admin/x", {"params": {"version": 0}}, "version"),
        ("delete", "/api/v1/servables/admin/x/9223372036854775808", {}, "version"),
        ("get", "/api/v1/servables", {"params": {"limit": 10**30}}, "limit"),
        ("post", RUN, {"json": {"version": 2**63}}, "version"),
        ("post", RUN, {"json": {"wait_s": -1}}, "wait_s"),
        ("post", RUN, {"json": {"timeout_s": 1e300}}, "timeout_s"),
        ("post", RUN, {"content": b'{"wait_s": Infinity}'}, "wait_s"),
    ],
)
def test_out_of_range_integers_are_422_naming_the_parameter(hub, method, path, kwargs, parameter):
    _, http, admin, _ = hub
    headers = {**admin, "Content-Type": "application/json"} if "content" in kwargs else admin
    r = http.request(method.upper(), path, headers=headers, **kwargs)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid-request" and parameter in r.json()["message"]


def test_like_wildcards_in_filters_match_literally(hub):
    stack, http, admin, _ = hub
    from dlhub.executor import Client, Servable

    name = f"bounded-{uuid.uuid4().hex[:6]}"
    with Client(home=str(stack.home)) as client:
        client.publish(Servable.from_function(_double, **meta(name, domains=["materials_science"])))

    def hits(**params) -> list[str]:
        answer = http.get("/api/v1/servables", params=params, headers=admin).json()
        return [h["name"] for h in answer["results"]]

    assert name in hits(domain="materials_science")
    for pattern in ("%", "_", "materials%", "materials_science%", "m%"):
        assert hits(domain=pattern) == [], pattern
    assert hits(author="%") == [] and hits(related="%") == []


def _double(x):
    return 2 * x


def test_uvicorn_limits_headers_and_idle_connections(hub):
    _, _, _, config = hub
    head = "GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + "a" * (200 * 1024) + "\r\n\r\n"
    status, _, _ = _raw(config["rest_url"], head, timeout=10)
    assert status in (400, 431)
    parts = urlsplit(config["rest_url"])
    with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200" in sock.recv(65536)
        started = time.monotonic()
        while sock.recv(65536):  # an idle keep-alive connection is closed by the server
            pass
        assert time.monotonic() - started < 15


# ---- a malformed endpoint ---------------------------------------------------------------------


@pytest.fixture
def fake_endpoint(hub):
    """A DEALER that registers as an endpoint with the hub's (admin) token."""
    stack, _, _, config = hub
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    name, session = f"odd-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    sock.setsockopt(zmq.IDENTITY, f"e:{name}:{session}".encode())
    address = stack.manager_info["endpoint_url"]
    secure_dealer(sock, address, config["token"], config.get("manager_key"))
    sock.connect(address)
    sock.send(m.pack(m.Hello("endpoint", name, config["token"], session, runtime_versions(), {})))
    assert sock.poll(10_000) and isinstance(m.unpack(sock.recv()), m.Welcome)
    try:
        yield name, sock
    finally:
        sock.close()
        ctx.term()


def _all_views_work(stack, http, admin) -> None:
    assert http.get("/metrics", headers=admin).status_code == 200
    r = http.get("/api/v1/metrics", headers=admin)
    assert r.status_code == 200 and r.json()["endpoints"]
    proc = stack.cli("status")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_a_malformed_heartbeat_breaks_no_view(hub, fake_endpoint):
    stack, http, admin, _ = hub
    name, sock = fake_endpoint
    sock.send(m.pack(m.Heartbeat({"workers": 3, "queued": 1})))
    assert sock.poll(10_000)
    sock.recv()
    for bad in (
        {"workers": "many"},
        {"servables": [1, 2]},
        {"batching": {"batch_size_histogram": {"abc": "x"}}},
        {"queued": {"a": 1}},
        {"on_workers": None, "outstanding": "x"},
    ):
        sock.send(m.pack(m.Heartbeat(bad)))
        assert sock.poll(10_000)
        sock.recv()
        _all_views_work(stack, http, admin)
    assert http.get("/api/v1/metrics", headers=admin).json()["endpoints"][name]["info"]["workers"] == 3
    log = (stack.home / "manager" / "manager.log").read_text()
    assert "malformed heartbeat info" in log and "info.on_workers must be an integer" in log


def test_a_malformed_result_ends_its_task_with_the_reason(hub, fake_endpoint):
    stack, _, _, _ = hub
    name, sock = fake_endpoint
    ex = stack.executor(endpoint=name)
    fut = ex.submit(_double, 2)
    task_id = None
    deadline = time.monotonic() + 30
    while task_id is None and time.monotonic() < deadline:
        if sock.poll(1000):
            msg = m.unpack(sock.recv())
            if isinstance(msg, m.Tasks):
                task_id = msg.tasks[0][m.T_ID]
    assert task_id is not None, "the task never reached the fake endpoint"
    sock.send(m.pack(m.Results([[task_id, "finished-ish", 12, "x", None, None]])))
    with pytest.raises(Exception, match="malformed result") as info:
        fut.result(timeout=30)
    assert "state" in str(info.value)
    wait_until(lambda: "malformed result" in (stack.home / "manager" / "manager.log").read_text(), 10)


# ---- private files ----------------------------------------------------------------------------


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_fresh_home_is_private(hub):
    """Started under umask 000: the home and its folders are 0700, the database (with its WAL
    files), tokens, logs, status and pool files 0600."""
    stack, http, admin, _ = hub
    http.get("/api/v1/servables", headers=admin)  # the database is in use (WAL files exist)
    home = stack.home
    ep = home / "endpoints" / "local"
    for folder in (home, home / "manager", home / "endpoints", ep):
        assert _mode(folder) == 0o700, folder
    files = [
        home / "config.json",
        home / "manager" / "dlhub.db",
        home / "manager" / "admin.token",
        home / "manager" / "manager.log",
        home / "manager" / "manager.json",
        ep / "endpoint.log",
        ep / "status.json",
        ep / "config.yaml",
        ep / "pool-default.json",
        *(home / "manager").glob("dlhub.db-*"),
    ]
    for path in files:
        assert _mode(path) == 0o600, f"{path}: {_mode(path):o}"
    assert any(p.name == "dlhub.db-wal" for p in files)
    # the workers unpack servables under the endpoint's home, not in a shared /tmp folder
    unpacked = ep / "servables" / "unpacked"
    if unpacked.exists():
        assert _mode(unpacked) == 0o700


def test_an_older_home_is_tightened_at_start(hub, tmp_path):
    """A home created before (0755/0644) is made private when `dlhub up` runs, and says so."""
    stack, _, _, _ = hub
    log = stack.home / "manager" / "manager.log"
    stack.home.chmod(0o755)
    log.chmod(0o644)
    proc = stack.cli("up", "--workers", "1", "--detach", "--no-examples")
    assert proc.returncode == 0, proc.stderr
    assert "private to you" in proc.stdout
    assert _mode(stack.home) == 0o700 and _mode(log) == 0o600
