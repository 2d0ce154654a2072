"""Inputs by reference (issue 16, item 3) on a real stack (``dlhub up`` on 127.0.0.1) and a real
HTTP server: ``File`` uploaded once by digest and staged once into the endpoint's data cache;
``DataRef`` to a data set file; a URL to a servable whose input is declared ``url`` (fetched once,
revalidated with ``If-Modified-Since``); a private data set is "not found" for another user, who
also gets no grant for a digest they never uploaded; bad input fails clearly and leaves nothing
half-written in the cache."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import httpx
import pytest
from conftest import meta, wait_until

from dlhub.executor import Client, DataRef, Dataset, Executor, File, OutputFile, OutputNotStored, Servable
from dlhub.executor.client import AccessDenied, NotFoundError
from dlhub.manager.auth import create_user
from dlhub.manager.store import make_engine
from dlhub.protocol.refs import StagingError


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def describe_file(path, *rest):
    """What the servable saw: the digest and size of the local file it was given."""
    import hashlib
    import os

    with open(path, "rb") as f:
        digest = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    return {"sha256": digest, "size": os.path.getsize(path), "path": path, "rest": list(rest)}


def twice(x):
    return 2 * x


def write_file(size):
    """A result by reference: a file made on the endpoint, returned as File(path)."""
    import os
    import tempfile

    from dlhub.executor import File

    fd, path = tempfile.mkstemp(suffix=".out")
    os.write(fd, bytes(range(256)) * (size // 256))
    os.close(fd)
    return File(path)


def returns_missing():
    from dlhub.executor import File

    return File("/nonexistent/dir/result.out")


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):  # the requests are recorded, not printed
        self.server.log.append((self.command, self.path, args[1] if len(args) > 1 else ""))


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 serving a folder; ``.log`` has (method, path, status)."""
    root = tmp_path_factory.mktemp("www")

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(root), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.log = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.root, server.url = root, f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def data_dir(stack) -> Path:
    return stack.endpoint_dir / "data"


def entries(data_dir: Path) -> dict:
    try:
        return json.loads((data_dir / "index.json").read_text())["entries"]
    except FileNotFoundError:
        return {}


def no_leftovers(data_dir: Path) -> bool:
    return not list((data_dir / "tmp").iterdir())


@pytest.fixture(scope="module")
def bob(stack, tmp_path_factory):
    """A second user: an Executor and a Client of their own."""
    engine = make_engine(f"sqlite:///{stack.home / 'manager' / 'dlhub.db'}")
    token = create_user(engine, "bob-refs")
    engine.dispose()
    mine = json.loads((stack.home / "config.json").read_text())
    home = tmp_path_factory.mktemp("home-bob-refs")
    (home / "config.json").write_text(json.dumps({**mine, "token": token}))
    ex, client = Executor(endpoint="local", home=str(home)), Client(home=str(home))
    try:
        yield ex, client
    finally:
        ex.shutdown(wait=False)
        client.close()


def test_a_file_is_uploaded_once_and_staged_once(stack, ex, tmp_path, data_dir):
    data = os.urandom(3 * 1024 * 1024 + 5)
    local = tmp_path / "scan_0042.h5"
    local.write_bytes(data)
    first = ex.submit(describe_file, File(local), "plain").result(60)
    assert first["sha256"] == sha(data) and first["size"] == len(data) and first["rest"] == ["plain"]
    assert Path(first["path"]).parent == data_dir / "entries"  # the endpoint's cache, by digest
    key = sha(data).removeprefix("sha256:")
    assert entries(data_dir)[key]["size"] == len(data)

    # a second Executor (a new process would do the same): the manager has the bytes from this
    # user, so nothing is uploaded; the endpoint has them, so nothing is fetched
    other = stack.executor()
    requests = []
    client = other._refs.client()
    real = client._request

    def spy(method, path, **kwargs):
        requests.append((method, path))
        return real(method, path, **kwargs)

    client._request = spy
    again = other.submit(describe_file, path=File(local)).result(60)
    assert again["path"] == first["path"] and again["sha256"] == sha(data)
    assert [r for r in requests if r[0] == "PUT"] == []  # no chunk sent
    assert entries(data_dir)[key]["uses"] == 2  # one fetch, then one cache hit (a refetch resets it)
    assert os.stat(first["path"]).st_mode & 0o222 == 0  # staged files are read-only
    assert no_leftovers(data_dir)


def test_a_data_set_file_by_reference_and_privacy(stack, client, ex, bob, tmp_path, name):
    data = os.urandom(200_000)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "scan.bin").write_bytes(data)
    ref = client.publish_dataset(
        Dataset(name, title="Scans by reference", authors=["Doe, Jane"], files=tmp_path / "d",
                visibility="private")
    )  # fmt: skip
    got = ex.submit(describe_file, DataRef(f"{ref}/scan.bin")).result(60)
    assert got["sha256"] == sha(data)
    unversioned = ref.rsplit(":", 1)[0]
    assert ex.submit(describe_file, DataRef(f"{unversioned}/scan.bin")).result(60)["path"] == got["path"]
    with pytest.raises(NotFoundError, match=f"{ref} has no file 'nope.bin'"):
        ex.submit(describe_file, DataRef(f"{ref}/nope.bin"))

    bob_ex, bob_client = bob
    owner = ref.split("/")[0]
    with pytest.raises(NotFoundError, match=f"^there is no data set {ref}$"):
        bob_ex.submit(describe_file, DataRef(f"{ref}/scan.bin"))
    # nor a grant for the digest itself: bob never sent those bytes
    denied = bob_client._http.post("/refs", json={"sha256": sha(data)})
    assert denied.status_code == 404 and "no stored file" in denied.json()["message"]
    begun = bob_client._http.post("/uploads", json={"size": len(data), "sha256": sha(data)}).json()
    assert begun["complete"] is False  # knowing a digest is not having the bytes
    # nor can bob list those bytes in a data set of his own to read them through it
    files = {"scan.bin": {"sha256": sha(data), "size": len(data)}}
    record = {"name": f"{name}-b", "title": "T", "authors": [{"name": "B"}], "files": files}
    listed = bob_client._http.post("/datasets", json={"record": record})
    assert listed.status_code == 400 and "was not uploaded" in listed.json()["message"]
    # a blob URL without a valid grant is not found either
    mine = client._http.post("/refs", json={"sha256": sha(data)}).json()
    assert httpx.get(mine["url"], params={"grant": mine["grant"]}).content == data
    forged = mine["grant"].replace(owner, "bob-refs", 1)
    assert httpx.get(mine["url"], params={"grant": forged}).status_code == 404
    client.share(f"{owner}/{name}", users=["bob-refs"])  # now bob may read it (the endpoint
    # 'local' only runs its owner's tasks, so bob's grant is checked over REST)
    shared = bob_client._http.post("/refs", json={"ref": f"{ref}/scan.bin"}).json()
    assert shared["sha256"] == sha(data)
    assert httpx.get(shared["url"], params={"grant": shared["grant"]}).content == data


def test_a_url_to_a_servable_declared_to_take_one(stack, client, ex, web, name, data_dir):
    data = os.urandom(100_000)
    (web.root / "scan.h5").write_bytes(data)
    model = client.publish(Servable.from_function(describe_file, **meta(name), inputs=[{"type": "url"}]))
    url = f"{web.url}/scan.h5"
    first = ex.with_options(cache=False).submit(model, url).result(60)
    assert first["sha256"] == sha(data) and Path(first["path"]).parent == data_dir / "entries"
    second = ex.with_options(cache=False).submit(model, url).result(60)
    assert second["path"] == first["path"]
    # fetched once; the second call only asked whether it changed (If-Modified-Since -> 304)
    assert [status for method, path, status in web.log if path == "/scan.h5"] == ["200", "304"]

    with pytest.raises(StagingError, match=rf"{web.url}/missing.h5: not found \(HTTP 404"):
        ex.submit(model, f"{web.url}/missing.h5").result(60)
    assert no_leftovers(data_dir)
    # a URL to an input declared otherwise: the error names the input, its type and the URL
    number = client.publish(Servable.from_function(twice, **meta(f"{name}-n"), inputs=[{"type": "number"}]))
    with pytest.raises(StagingError, match=rf"input 0 of {number}:?\d* is declared number, not file or url"):
        ex.submit(number, url).result(60)
    assert ex.submit(number, 21).result(60) == 42


def test_bad_input_is_a_clear_error(ex, tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="no-such.h5'\\): no such file"):
        ex.submit(describe_file, File(tmp_path / "no-such.h5"))
    with pytest.raises(ValueError, match="not a data set file reference"):
        DataRef("just-a-name")
    assert no_leftovers(data_dir)


def test_an_output_by_reference_is_kept_at_the_endpoint_and_chains(ex, data_dir):
    out = ex.submit(write_file, 256 * 1000).result(60)
    data = bytes(range(256)) * 1000
    assert isinstance(out, OutputFile) and out.sha256 == sha(data) and out.size == len(data)
    key = out.sha256.removeprefix("sha256:")
    assert entries(data_dir)[key]["uses"] == 1  # kept in the endpoint's data cache
    # passed to the next call: found there by digest, the bytes never went through the client
    got = ex.submit(describe_file, out).result(60)
    assert got["sha256"] == out.sha256 and Path(got["path"]) == data_dir / "entries" / key
    assert entries(data_dir)[key]["uses"] == 2
    gone = OutputFile(  # an output left at the endpoint only (not stored at the manager)
        {
            **out.marker,
            "sha256": sha(b"never made"),
            "name": "lost.out",
            "ref": "output lost.out",
            "at": "endpoint",
        }
    )
    with pytest.raises(StagingError, match="output lost.out: not in this endpoint's data cache"):
        ex.submit(describe_file, gone).result(60)
    assert no_leftovers(data_dir)


# ---- outputs by reference (issue 16 item 4): stored at the manager, downloaded ---------------


def uploads_of(stack, digest: str) -> list:
    """Unfinished uploads at the manager declared as ``digest``."""
    found = []
    for part in (stack.home / "manager" / "blobs" / "uploads").glob("*.json"):
        if json.loads(part.read_text())["sha256"] == digest:
            found.append(part)
    return found


def test_an_output_is_stored_at_the_manager_and_downloads(stack, ex, tmp_path, data_dir, monkeypatch):
    out = ex.submit(write_file, 256 * 4000).result(60)
    data = bytes(range(256)) * 4000
    assert isinstance(out, OutputFile) and out.at == "manager" and out.sha256 == sha(data)
    blob = stack.home / "manager" / "blobs"
    assert any(p.name.endswith(out.sha256.removeprefix("sha256:")) for p in blob.rglob("*")), "not stored"
    monkeypatch.chdir(tmp_path)
    got = out.download()  # default: the output's name in the current directory
    assert got == tmp_path / out.name and got.read_bytes() == data
    there = out.download(tmp_path / "sub" / "copy.bin")  # a path given (its folder made)
    assert there == tmp_path / "sub" / "copy.bin" and there.read_bytes() == data
    (tmp_path / "into").mkdir()
    assert out.download(tmp_path / "into") == tmp_path / "into" / out.name  # a folder given
    assert not list(tmp_path.rglob(".*.part"))
    # nothing half-written at the manager (uploads are discarded or renamed into the store)
    assert not uploads_of(stack, out.sha256)


def test_a_stored_output_chains_without_moving_through_the_client(ex, data_dir):
    out = ex.submit(write_file, 256 * 2000).result(60)
    key = out.sha256.removeprefix("sha256:")
    uses = entries(data_dir)[key]["uses"]
    requests = []
    client = ex._refs.client()
    real = client._request

    def spy(method, path, **kwargs):
        requests.append((method, path))
        return real(method, path, **kwargs)

    client._request = spy
    try:
        got = ex.submit(describe_file, out).result(60)
    finally:
        client._request = real
    assert got["sha256"] == out.sha256 and Path(got["path"]) == data_dir / "entries" / key
    assert entries(data_dir)[key]["uses"] == uses + 1  # found at the endpoint, not fetched again
    assert all(method == "POST" for method, _ in requests)  # at most a grant asked: no bytes
    assert no_leftovers(data_dir)


def test_another_user_cannot_read_a_stored_output(ex, bob, tmp_path):
    out = ex.submit(write_file, 256 * 100).result(60)
    bob_ex, bob_client = bob
    denied = bob_client._http.post("/refs", json={"sha256": out.sha256})
    assert denied.status_code == 404
    with pytest.raises(NotFoundError, match="no stored file"):
        OutputFile(out.marker, bob_ex._refs).download(tmp_path / "stolen")
    with pytest.raises(NotFoundError, match="no stored file"):
        bob_ex.submit(describe_file, out)
    assert not (tmp_path / "stolen").exists()


def test_an_output_left_at_the_endpoint_by_policy(stack, ex, tmp_path, data_dir):
    out = ex.with_options(outputs="endpoint").submit(write_file, 256 * 300).result(60)
    assert out.at == "endpoint" and "asked for it" in out.why
    with pytest.raises(OutputNotStored, match=rf"output {out.name} .* left at the endpoint.*asked for it"):
        out.download(tmp_path / "x")
    got = ex.submit(describe_file, out).result(60)  # still passed on by digest
    assert got["sha256"] == out.sha256
    # an Executor that knows no REST URL cannot have it stored: left there, and it says why
    plain = stack.executor()
    plain._refs.rest_url = None
    left = plain.submit(write_file, 256 * 301).result(60)
    assert left.at == "endpoint"
    with pytest.raises(OutputNotStored, match="rest_url"):
        left.download(tmp_path / "y")
    with pytest.raises(ValueError, match="outputs must be"):
        ex.with_options(outputs="nowhere")
    assert not (tmp_path / "x").exists() and no_leftovers(data_dir)


def test_bad_outputs_are_clear_errors(stack, ex, data_dir):
    with pytest.raises(StagingError, match=r"output result.out: the call returned File\('/nonexistent"):
        ex.submit(returns_missing).result(60)
    # an upload the manager refuses (a forged grant): the task fails naming the file
    forged = stack.executor()
    url, grant = forged._refs.output_option("manager")
    import time

    forged._refs._output = (time.monotonic(), [url, grant[:-4] + "0000"])
    with pytest.raises(StagingError, match=r"output .*\.out: the manager refused to store it \(HTTP 403"):
        forged.submit(write_file, 256 * 10).result(60)
    assert no_leftovers(data_dir)


def test_the_manager_checks_what_an_output_upload_declares(stack, client):
    grant = client._call("POST", "/outputs/grant")
    data = os.urandom(100_000)
    wrong = sha(b"something else")
    begun = httpx.post(grant["url"], params={"grant": grant["grant"], "sha256": wrong, "size": len(data)})
    assert begun.status_code == 200, begun.text
    put = httpx.put(
        f"{grant['url']}/{begun.json()['upload_id']}", params={"grant": grant["grant"]}, content=data
    )
    assert put.status_code == 422 and "digest" in put.json()["message"]
    # more bytes than declared, and no valid grant: refused; nothing kept
    begun = httpx.post(grant["url"], params={"grant": grant["grant"], "sha256": sha(data), "size": 10})
    put = httpx.put(
        f"{grant['url']}/{begun.json()['upload_id']}", params={"grant": grant["grant"]}, content=data
    )
    assert put.status_code == 422 and "more bytes than the declared size" in put.json()["message"]
    bad = httpx.post(grant["url"], params={"grant": "1.x.y", "sha256": sha(data), "size": len(data)})
    assert bad.status_code == 403 and "upload grant is wrong or expired" in bad.json()["message"]
    blobs = stack.home / "manager" / "blobs"
    assert not uploads_of(stack, wrong) and not uploads_of(stack, sha(data))
    assert not any(
        p.name.endswith(sha(data).removeprefix("sha256:")) for p in blobs.rglob("*") if p.is_file()
    )
    with pytest.raises(AccessDenied):  # a grant is asked with a valid token only
        Client(client.url, "not-a-token").__enter__()._call("POST", "/outputs/grant")


def test_an_endpoint_configured_to_keep_outputs_never_uploads(tmp_path):
    from dlhub.endpoint.config import DataCacheConfig
    from dlhub.endpoint.staging import DataCache, store_output

    assert DataCacheConfig(outputs="endpoint").outputs == "endpoint"
    assert DataCacheConfig().outputs == "manager"
    with pytest.raises(ValueError):
        DataCacheConfig(outputs="elsewhere")
    made = tmp_path / "made.out"
    made.write_bytes(b"x" * 1000)
    cache = DataCache(tmp_path / "c", outputs="endpoint")
    # a grant that would fail if used (nothing listens there): the policy keeps it local
    marker = store_output(cache, made, ["http://127.0.0.1:9/api/v1/outputs", "1.u.m"])
    assert marker["at"] == "endpoint" and "data_cache.outputs is endpoint" in marker["why"]
    assert (tmp_path / "c" / "entries" / sha(b"x" * 1000).removeprefix("sha256:")).exists()
    with pytest.raises(StagingError, match=r"output made.out: cannot store it at the manager"):
        store_output(DataCache(tmp_path / "d"), made, ["http://127.0.0.1:9/api/v1/outputs", "1.u.m"])


def test_a_servable_returning_a_file_is_stored_and_chains(client, ex, name, tmp_path, data_dir):
    model = client.publish(Servable.from_function(write_file, **meta(name)))
    out = ex.with_options(cache=False).submit(model, 256 * 50).result(60)
    assert isinstance(out, OutputFile) and out.at == "manager"
    assert out.download(tmp_path / "from-servable.bin").read_bytes() == bytes(range(256)) * 50
    assert ex.submit(describe_file, out).result(60)["sha256"] == out.sha256


def test_a_result_naming_a_stored_output_is_not_cached_for_another_caller(custom_stack_factory, tmp_path):
    """A deterministic servable returning a File: its result names an output stored for its
    caller, which nobody else can download, so the manager neither caches it nor hands it to an
    identical call (the worker flags it, the endpoint passes the flag on): bob's identical call
    runs and stores an output of his own, which he downloads. Plain results still cache."""
    from dlhub.manager.auth import users_generation

    cs = custom_stack_factory(endpoint={"policy": {"allowed_users": ["alice-out", "bob-out"]}})
    engine = cs.manager.auth.engine
    tokens = {who: create_user(engine, who) for who in ("alice-out", "bob-out")}
    wait_until(lambda: cs.manager.auth.generation == users_generation(engine), 10, what="the new users")
    rest = cs.manager.api.url
    admin = Client(rest, cs.token)
    model = admin.publish(Servable.from_function(write_file, **meta("out-cache", deterministic=True)))
    plain = admin.publish(Servable.from_function(twice, **meta("plain-cache", deterministic=True)))
    alice, bob = (cs.executor(token=tokens[who], rest_url=rest) for who in ("alice-out", "bob-out"))
    hits = lambda: cs.manager.status()["result_cache"]["hits"]  # noqa: E731
    before = hits()
    mine = alice.submit(model, 256 * 40).result(60)
    assert isinstance(mine, OutputFile) and mine.at == "manager"
    theirs = bob.submit(model, 256 * 40).result(60)
    again = alice.submit(model, 256 * 40).result(60)
    assert hits() == before, "a result naming a stored output came from the result cache"
    assert theirs.download(tmp_path / "bob.bin").read_bytes() == bytes(range(256)) * 40
    assert again.download(tmp_path / "alice.bin").read_bytes() == bytes(range(256)) * 40
    assert alice.submit(plain, 21).result(60) == 42 and bob.submit(plain, 21).result(60) == 42
    assert hits() == before + 1  # bob's plain value came from the cache
