"""The endpoint's data cache (``endpoint/staging.py``) against a real HTTP server on 127.0.0.1:
two processes staging one digest fetch it once; a wrong digest or a 404 fails naming the
reference and leaves nothing behind; the budget evicts least recently used files, never a pinned
one; inputs declared ``ndarray`` get the loaded array."""

from __future__ import annotations

import hashlib
import http.server
import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dlhub.endpoint.staging import DataCache, stage_arguments, unpin
from dlhub.protocol.refs import MARKER, StagingError
from dlhub.protocol.servable import ServableRecord


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Slow(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        time.sleep(0.3)  # long enough for a second process to be waiting on the entry lock
        super().do_GET()

    def log_message(self, fmt, *args):
        self.server.log.append((self.path, args[1] if len(args) > 1 else ""))


@pytest.fixture
def web(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: _Slow(*a, directory=str(root), **k)
    )
    server.log = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.root, server.url = root, f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def marker(web, name: str, data: bytes, digest: str | None = None) -> dict:
    (web.root / name).write_bytes(data)
    return {
        MARKER: 1,
        "sha256": digest or sha(data),
        "size": len(data),
        "url": f"{web.url}/{name}",
        "ref": name,
    }


def _stage_in_child(root: str, source: dict, out) -> None:
    pins: list = []
    out.put(str(DataCache(root).stage(source, pins)))
    unpin(pins)


def test_two_processes_staging_one_digest_fetch_it_once(web, tmp_path):
    data = b"x" * 300_000
    source = marker(web, "a.bin", data)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_stage_in_child, args=(str(tmp_path / "c"), source, out)) for _ in range(2)]
    for p in procs:
        p.start()
    paths = {out.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(30)
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == data
    assert [p for p, _ in web.log] == ["/a.bin"]  # one fetch for both
    assert not list((tmp_path / "c" / "tmp").iterdir())


def test_a_wrong_digest_or_a_404_fails_naming_it_and_keeps_nothing(web, tmp_path):
    cache = DataCache(tmp_path / "c")
    bad = marker(web, "b.bin", b"real bytes", digest=sha(b"other bytes"))
    said = (
        f"b.bin: the bytes received have digest {sha(b'real bytes')}, not the expected {sha(b'other bytes')}"
    )
    with pytest.raises(StagingError, match=said + "; nothing was kept"):
        cache.stage(bad, [])
    missing = {**marker(web, "c.bin", b"c"), "url": f"{web.url}/gone.bin", "ref": "alice/x:1/gone.bin"}
    with pytest.raises(StagingError, match=r"alice/x:1/gone.bin: not found \(HTTP 404 from http://127"):
        cache.stage(missing, [])
    assert not list((tmp_path / "c" / "tmp").iterdir()) and not list((tmp_path / "c" / "entries").iterdir())
    assert cache.entries() == []
    huge = {**marker(web, "d.bin", b"d"), "size": 10**15}
    with pytest.raises(StagingError, match="over this endpoint's whole data cache budget"):
        cache.stage(huge, [])


def test_an_unreachable_url_fails_naming_it_and_keeps_nothing(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = DataCache(tmp_path / "c")
    source = {
        MARKER: 1,
        "sha256": sha(b"x"),
        "size": 1,
        "url": f"http://127.0.0.1:{port}/x.h5",
        "ref": "scan.h5",
    }
    with pytest.raises(StagingError, match=rf"scan.h5: cannot fetch http://127.0.0.1:{port}/x.h5: .*refused"):
        cache.stage(source, [])
    assert not list((tmp_path / "c" / "tmp").iterdir()) and cache.entries() == []


def test_the_budget_evicts_the_least_recently_used_unpinned_file(web, tmp_path):
    cache = DataCache(tmp_path / "c", budget_bytes=250_000)
    a, b, c = (marker(web, f"{n}.bin", bytes([i]) * 100_000) for i, n in enumerate("abc"))
    held: list = []
    pa = cache.stage(a, held)  # pinned: a task is using it
    done: list = []
    pb = cache.stage(b, done)
    unpin(done)  # its task ended
    pc = cache.stage(c, done)
    unpin(done)
    assert pa.exists() and pc.exists() and not pb.exists()  # b went, a was pinned
    unpin(held)
    assert cache.stage(b, done).exists() and not pa.exists()  # now a (least recently used) goes


def test_inputs_become_paths_or_the_declared_object(web, tmp_path):
    import io

    buf = io.BytesIO()
    np.save(buf, np.arange(6.0))
    arr = marker(web, "x.npy", buf.getvalue())
    plain = marker(web, "y.txt", b"hello")

    class Fn:
        record = ServableRecord(
            name="s", title="t", authors=[{"name": "A"}], kind="function", entry_point="f.code",
            files={"f.code": sha(b"f")}, inputs=[{"type": "ndarray"}, {"type": "file"}, {"type": "number"}],
        )  # fmt: skip

    cache = DataCache(tmp_path / "c")
    args, kwargs, pins = stage_arguments(cache, [arr, plain, 3], {"k": plain}, Fn())
    assert np.array_equal(args[0], np.arange(6.0)) and Path(args[1]).read_bytes() == b"hello"
    assert args[2] == 3 and kwargs["k"] == args[1] and len(pins) == 3
    with pytest.raises(StagingError, match="input 2 of s is declared number: a file reference"):
        stage_arguments(cache, [arr, plain, plain], {}, Fn())
    with pytest.raises(StagingError, match="input 2 of s is declared number, not file or url"):
        stage_arguments(cache, [arr, plain, f"{web.url}/y.txt"], {}, Fn())
