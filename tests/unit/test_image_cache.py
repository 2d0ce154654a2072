"""The endpoint's image cache (endpoint/images.py) on real files: a fetch happens once per
reference (threads and processes at once included), a warm cache does no fetch, LRU eviction
under a budget spares pinned entries, a crash mid-fetch leaves nothing that a later get trusts,
and the runtimes' pull command lines, recorded by fake runtime executables on PATH."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from conftest import podman_store

from dlhub.endpoint.config import ConfigError, parse_config
from dlhub.endpoint.containers import ContainerError
from dlhub.endpoint.images import ImageCache, cache_for, entry_key

# Records its argv and pid, then acts like the runtime: `pull --name DEST URI` writes DEST after
# $FAKE_PULL_S seconds (the partial file first); podman `image inspect` answers an id or a size.
FAKE = """#!{py}
import json, os, sys, time
args = sys.argv[1:]
if args[:1] == ["--version"]:
    print("apptainer version 1.3.4"); sys.exit(0)
with open({rec!r}, "a") as f:
    f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0])] + args, "pid": os.getpid()}}) + "\\n")
if os.environ.get("FAKE_FAIL"):
    print("FATAL: while pulling: unauthorized", file=sys.stderr); sys.exit(255)
args = [a for a in args if a not in ("--quiet", "--debug")]
if args[:1] == ["pull"] and "--name" in args:
    dest = args[args.index("--name") + 1]
    with open(dest + ".part", "wb") as f:
        f.write(b"SIF" * 1000)
    time.sleep(float(os.environ.get("FAKE_PULL_S", "0")))
    os.rename(dest + ".part", dest)
elif args[:1] == ["pull"]:
    time.sleep(float(os.environ.get("FAKE_PULL_S", "0")))
elif args[:2] == ["image", "inspect"]:
    print("12345678" if "{{{{.Size}}}}" in args else "sha256:" + "ab" * 32)
elif args[:1] == ["import"]:
    print("sha256:" + "cd" * 32)
"""
RUNTIMES = ("singularity", "apptainer", "podman", "docker")
URI = "docker://python:3.11-slim"


@pytest.fixture
def fake_runtimes(tmp_path, monkeypatch):
    """Recording runtimes first on PATH; returns a function giving the recorded calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rec = tmp_path / "calls.jsonl"
    for name in RUNTIMES:
        p = bin_dir / name
        p.write_text(FAKE.format(py=sys.executable, rec=str(rec)))
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def calls():
        return [json.loads(line) for line in rec.read_text().splitlines()] if rec.exists() else []

    return calls


def make_rootfs(tmp_path: Path, name: str = "rootfs", payload: int = 50_000) -> tuple[Path, Path]:
    """A small image tree (a marker, a symlink, ``payload`` bytes) and its .tar.gz."""
    root = tmp_path / name
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc" / "image-marker").write_text(name)
    (root / "usr" / "bin" / "data").write_bytes(os.urandom(payload))
    (root / "bin").symlink_to("usr/bin")
    tgz = tmp_path / f"{name}.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root, arcname=".")
    return root, tgz


def test_local_path_is_used_as_is_never_copied_or_listed(tmp_path):
    root, _ = make_rootfs(tmp_path)
    cache = ImageCache(tmp_path / "images", 10**6)
    assert cache.get(str(root), "charliecloud") == root
    assert cache.image_for(str(root), "charliecloud") == str(root)
    assert cache.entries() == [] and list((cache.root / "entries").iterdir()) == []
    with pytest.raises(ContainerError, match="no such file"):
        cache.get(str(tmp_path / "missing.sif"), "apptainer")


def test_tarball_fetched_once_warm_cache_does_no_fetch(tmp_path):
    _, tgz = make_rootfs(tmp_path)
    ref = f"file://{tgz}"
    cache = ImageCache(tmp_path / "images", 10**7)
    entry_dir = cache.get(ref, "charliecloud")
    image = Path(cache.image_for(ref, "charliecloud"))
    assert image.parent == entry_dir and entry_dir.name == entry_key(ref, "charliecloud")
    assert (image / "etc" / "image-marker").read_text() == "rootfs"
    assert (image / "bin").is_symlink()
    assert cache.fetches == 1
    (first,) = cache.entries()
    assert first.ref == ref and first.runtime == "charliecloud" and first.size > 50_000
    assert stat.S_IMODE(cache.index_path.stat().st_mode) == 0o600
    mtime = (image / "etc" / "image-marker").stat().st_mtime_ns
    time.sleep(0.01)
    assert cache.get(ref, "charliecloud") == entry_dir
    assert cache.fetches == 1
    # a second endpoint start: a new cache object on the same folder fetches nothing
    again = ImageCache(tmp_path / "images", 10**7)
    assert again.get(ref, "charliecloud") == entry_dir and again.fetches == 0
    (e,) = again.entries()
    assert e.uses == 3 and e.last_used > first.last_used and e.created == first.created
    assert (image / "etc" / "image-marker").stat().st_mtime_ns == mtime  # not re-unpacked
    # the same ref for another runtime is another entry
    assert again.get(ref, "apptainer") != entry_dir and again.fetches == 1


def test_dir_reference_is_copied_with_its_symlinks(tmp_path):
    root, _ = make_rootfs(tmp_path)
    cache = ImageCache(tmp_path / "images", 10**7)
    image = Path(cache.image_for(f"dir://{root}", "charliecloud"))
    assert image != root and (image / "etc" / "image-marker").read_text() == "rootfs"
    assert os.readlink(image / "bin") == "usr/bin"
    (root / "etc" / "image-marker").write_text("changed at the source")
    assert (image / "etc" / "image-marker").read_text() == "rootfs"


def _three_refs(tmp_path):
    return [f"file://{make_rootfs(tmp_path, f'img{i}')[1]}" for i in range(3)]


def test_lru_eviction_under_a_small_budget(tmp_path):
    a, b, c = _three_refs(tmp_path)
    probe = ImageCache(tmp_path / "probe", 10**9)
    probe.get(a, "charliecloud")
    size = probe.entries()[0].size
    cache = ImageCache(tmp_path / "images", int(size * 2.5))  # two fit, not three
    cache.get(a, "charliecloud")
    cache.get(b, "charliecloud")
    cache.get(a, "charliecloud")  # a is now more recently used than b
    cache.get(c, "charliecloud")
    assert [e.ref for e in cache.entries()] == [c, a]
    assert not (cache.root / "entries" / entry_key(b, "charliecloud")).exists()
    assert cache.total_bytes() <= cache.budget_bytes
    cache.get(b, "charliecloud")  # evicted: fetched again, and a (now LRU) goes
    assert cache.fetches == 4 and [e.ref for e in cache.entries()] == [b, c]


def test_pinned_entry_is_not_evicted_until_its_process_ends(tmp_path):
    a, b, c = _three_refs(tmp_path)
    probe = ImageCache(tmp_path / "probe", 10**9)
    probe.get(a, "charliecloud")
    cache = ImageCache(tmp_path / "images", int(probe.entries()[0].size * 2.5))
    pool = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cache.get(a, "charliecloud")
        cache.pin(a, "charliecloud", pid=pool.pid)  # a running pool uses a (the LRU entry)
        cache.get(b, "charliecloud")
        cache.get(c, "charliecloud")
        assert {e.ref for e in cache.entries()} == {a, c}  # b went instead of a
        assert cache.pinned(entry_key(a, "charliecloud"))
        assert cache.prune(everything=True) and [e.ref for e in cache.entries()] == [a]
    finally:
        pool.kill()
        pool.wait()
    assert not cache.pinned(entry_key(a, "charliecloud"))  # its process ended: a stale pin
    assert [e.ref for e in cache.prune(everything=True)] == [a] and cache.entries() == []


def test_lease_pins_while_held(tmp_path):
    a, b, c = _three_refs(tmp_path)
    cache = ImageCache(tmp_path / "images", 10**9)
    with cache.lease(a, "charliecloud") as image:
        assert Path(image, "etc", "image-marker").read_text() == "img0"
        assert cache.prune(everything=True) == []
    assert [e.ref for e in cache.prune(everything=True)] == [a]


def test_pinned_entries_over_budget_keep_the_new_image(tmp_path, caplog):
    a, b, _ = _three_refs(tmp_path)
    probe = ImageCache(tmp_path / "probe", 10**9)
    probe.get(a, "charliecloud")
    cache = ImageCache(tmp_path / "images", int(probe.entries()[0].size * 1.5))
    cache.pin(a, "charliecloud")
    cache.get(a, "charliecloud")
    cache.get(b, "charliecloud")
    assert {e.ref for e in cache.entries()} == {a, b}
    assert "over its budget" in caplog.text


def test_image_larger_than_the_budget_is_refused_and_leaves_nothing(tmp_path):
    _, tgz = make_rootfs(tmp_path, payload=200_000)
    cache = ImageCache(tmp_path / "images", 100_000)
    with pytest.raises(ContainerError, match=r"over the whole image cache budget.*image_cache.budget_gb"):
        cache.get(f"file://{tgz}", "charliecloud")
    assert cache.entries() == []
    assert list((cache.root / "tmp").iterdir()) == [] and list((cache.root / "entries").iterdir()) == []


def test_apptainer_pull_is_the_command_spython_pull_runs(fake_runtimes, tmp_path, monkeypatch):
    cache = ImageCache(tmp_path / "images", 10**7)
    image = cache.image_for(URI, "apptainer")
    (call,) = fake_runtimes()
    assert call["argv"][:3] == ["apptainer", "pull", "--name"] and call["argv"][-1] == URI
    assert Path(image).name == "image.sif" and Path(image).read_bytes() == b"SIF" * 1000
    assert Path(image).parent == cache.root / "entries" / entry_key(URI, "apptainer")
    # the same line spython's own Client.pull runs for singularity (argv[0] aside)
    from spython.main import get_client

    monkeypatch.chdir(tmp_path)
    get_client().pull(URI, name="x.sif")
    spythons = fake_runtimes()[-1]["argv"]
    assert spythons[0] == "singularity" and spythons[1:] == ["pull", "--name", "x.sif", URI]
    cache.get(URI, "singularity")
    assert fake_runtimes()[-1]["argv"][0] == "singularity"


def test_podman_pull_records_the_image_id_and_eviction_removes_it(fake_runtimes, tmp_path):
    cache = ImageCache(tmp_path / "images", 20_000_000)
    assert cache.image_for(URI, "podman") == "sha256:" + "ab" * 32
    argvs = [c["argv"] for c in fake_runtimes()]
    assert argvs[0] == ["podman", "pull", URI]
    assert argvs[1] == ["podman", "image", "inspect", "--format", "{{.Id}}", URI]
    (e,) = cache.entries()
    assert e.size == 12345678 and e.digest == "sha256:" + "ab" * 32  # the store's size, not a file's
    cache.get("docker://debian:12", "docker")  # 12.3 MB more: over the 20 MB budget
    argvs = [c["argv"] for c in fake_runtimes()]
    assert ["docker", "pull", "debian:12"] in argvs  # docker takes no docker:// prefix
    assert argvs[-1] == ["podman", "rmi", "sha256:" + "ab" * 32]
    assert [x.ref for x in cache.entries()] == ["docker://debian:12"]


def test_podman_imports_a_tarball(fake_runtimes, tmp_path):
    _, tgz = make_rootfs(tmp_path)
    cache = ImageCache(tmp_path / "images", 10**9)
    assert cache.image_for(f"file://{tgz}", "podman") == "sha256:" + "cd" * 32
    assert fake_runtimes()[0]["argv"] == ["podman", "import", str(tgz)]


def test_threads_getting_the_same_ref_fetch_once(fake_runtimes, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PULL_S", "0.5")
    cache = ImageCache(tmp_path / "images", 10**7)
    results, errors = [], []

    def get():
        try:
            results.append(cache.image_for(URI, "apptainer"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 4 and len(set(results)) == 1
    assert len(fake_runtimes()) == 1 and cache.fetches == 1
    assert Path(results[0]).read_bytes() == b"SIF" * 1000


GET = (
    "import sys; from dlhub.endpoint.images import ImageCache; "
    "print(ImageCache(sys.argv[1], 10**7).image_for(sys.argv[2], 'apptainer'))"
)


def test_processes_getting_the_same_ref_fetch_once(fake_runtimes, tmp_path):
    env = {**os.environ, "FAKE_PULL_S": "1.0"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GET, str(tmp_path / "images"), URI],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and Path(outs[0]).read_bytes() == b"SIF" * 1000
    assert len(fake_runtimes()) == 1


def test_crash_mid_fetch_leaves_nothing_trusted_and_is_cleaned(fake_runtimes, tmp_path):
    images = tmp_path / "images"
    env = {**os.environ, "FAKE_PULL_S": "60"}
    proc = subprocess.Popen([sys.executable, "-c", GET, str(images), URI], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not fake_runtimes() and time.monotonic() < deadline:
            time.sleep(0.05)
        (call,) = fake_runtimes()
        time.sleep(0.2)
    finally:
        proc.kill()  # the endpoint dies mid-pull
        proc.wait()
        try:
            os.kill(call["pid"], signal.SIGKILL)  # and so does its puller (a node going away)
        except (ProcessLookupError, UnboundLocalError):
            pass
    left = list((images / "tmp").iterdir())
    assert len(left) == 1 and (left[0] / "image.sif.part").exists()
    cache = ImageCache(images, 10**7)
    assert cache.entries() == []  # the index never saw it
    image = cache.image_for(URI, "apptainer")
    assert Path(image).read_bytes() == b"SIF" * 1000 and len(fake_runtimes()) == 2
    assert list((images / "tmp").iterdir()) == []  # the crash's temp dir was removed


def test_prune_removes_leftovers_of_a_crash(tmp_path):
    cache = ImageCache(tmp_path / "images", 10**7)
    key = entry_key(URI, "apptainer")
    (cache.root / "tmp" / f"{key}.999999.abcd").mkdir()
    (cache.root / "entries" / key).mkdir()  # renamed, then the crash before the index write
    assert cache.prune() == []
    assert list((cache.root / "tmp").iterdir()) == [] and list((cache.root / "entries").iterdir()) == []


def test_prune_older_than_days(tmp_path):
    a, b, _ = _three_refs(tmp_path)
    cache = ImageCache(tmp_path / "images", 10**9)
    cache.get(a, "charliecloud")
    cache.get(b, "charliecloud")
    index = json.loads(cache.index_path.read_text())
    index["entries"][entry_key(a, "charliecloud")]["last_used"] -= 3 * 86400
    cache.index_path.write_text(json.dumps(index))
    assert cache.prune(older_than_days=7) == []
    assert [e.ref for e in cache.prune(older_than_days=2)] == [a]
    assert [e.ref for e in cache.entries()] == [b]
    assert cache.prune() == []  # within budget: nothing to remove


def test_failed_pull_is_a_clear_error_and_leaves_nothing(fake_runtimes, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "1")
    cache = ImageCache(tmp_path / "images", 10**7)
    with pytest.raises(ContainerError, match=r"apptainer pull .*failed \(exit 255\).*unauthorized"):
        cache.get(URI, "apptainer")
    assert cache.entries() == [] and list((cache.root / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    "ref, runtime, message",
    [
        (URI, "charliecloud", "charliecloud-builders"),
        ("ftp://host/x.sif", "apptainer", "unknown scheme ftp://"),
        ("docker://", "apptainer", "nothing after docker://"),
        ("", "apptainer", "empty image reference"),
        (URI, "lxc", "runtime 'lxc' is not one of"),
        (URI, "none", "runtime 'none' is not one of"),
        ("file://relative/x.tar", "charliecloud", "needs an absolute path"),
        ("file:///no/such/x.tar.gz", "charliecloud", "does not exist"),
        ("oras://ghcr.io/x:1", "docker", "docker cannot pull oras://"),
    ],
)
def test_bad_refs_are_clear_errors(tmp_path, ref, runtime, message):
    with pytest.raises(ContainerError, match=message.replace("(", r"\(")):
        ImageCache(tmp_path / "images", 10**7).get(ref, runtime)


def test_missing_runtime_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ContainerError, match="'apptainer' not found on PATH"):
        ImageCache(tmp_path / "images", 10**7).get(URI, "apptainer")


def test_budget_config(tmp_path):
    manager = {"address": "tcp://hub:5581", "token": "t"}
    assert parse_config({"name": "ep", "manager": manager}).image_cache.budget_gb == 20.0
    config = parse_config({"name": "ep", "manager": manager, "image_cache": {"budget_gb": 0.5}})
    cache = cache_for(tmp_path / "ep", config)
    assert cache.budget_bytes == 500_000_000 and cache.root == tmp_path / "ep" / "images"
    for bad, message in [
        ({"budget_gb": 0}, "image_cache.budget_gb: Input should be greater than 0"),
        ({"budget_gb": "lots"}, "image_cache.budget_gb"),
        ({"budgetgb": 3}, "image_cache.budgetgb: unknown key; did you mean image_cache.budget_gb?"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
            parse_config({"name": "ep", "manager": manager, "image_cache": bad})
    with pytest.raises(ContainerError, match="budget must be positive"):
        ImageCache(tmp_path / "x", 0)


# podman for real, with the recipe's configuration (a private store); import needs no runc
def test_real_podman_import_and_eviction(tmp_path, monkeypatch):
    import shutil

    if shutil.which("podman") is None:
        if os.environ.get("DLHUB_REQUIRE_CONTAINERS"):
            pytest.fail("podman is not installed (apt-get install -y podman)")
        pytest.skip("podman is not installed")
    for var, value in podman_store(tmp_path / "podman").items():
        monkeypatch.setenv(var, value)

    def exists(image: str) -> bool:
        return subprocess.run(["podman", "image", "exists", image], timeout=60).returncode == 0

    try:
        _, tgz = make_rootfs(tmp_path)
        cache = ImageCache(tmp_path / "images", 10**9)
        image = cache.image_for(f"file://{tgz}", "podman")
        assert image.startswith("sha256:") and exists(image)
        (e,) = cache.entries()
        assert e.digest == image and e.size > 50_000  # the store's size of the image
        assert ImageCache(tmp_path / "images", 10**9).image_for(f"file://{tgz}", "podman") == image
        assert [x.ref for x in cache.prune(everything=True)] == [f"file://{tgz}"]
        assert not exists(image)  # pruning removed it from podman's store
    finally:
        subprocess.run(["podman", "system", "reset", "-f"], capture_output=True, timeout=60)


def test_a_pin_from_another_host_is_kept_until_unpinned(tmp_path):
    a, _, _ = _three_refs(tmp_path)
    cache = ImageCache(tmp_path / "images", 10**9)
    cache.get(a, "charliecloud")
    folder = cache.root / "pins" / entry_key(a, "charliecloud")
    folder.mkdir()
    foreign = folder / "1@some-other-node.abcd"  # pid 1 there says nothing here
    foreign.touch()
    assert cache.prune(everything=True) == [] and foreign.exists()
    cache.unpin(foreign)
    assert [e.ref for e in cache.prune(everything=True)] == [a]


def test_a_corrupt_index_is_rebuilt_by_fetching_again(tmp_path, caplog):
    a, _, _ = _three_refs(tmp_path)
    cache = ImageCache(tmp_path / "images", 10**9)
    first = cache.image_for(a, "charliecloud")
    cache.index_path.write_text('{"entries": {"x"')  # torn by something else than our writer
    assert cache.entries() == [] and "unreadable" in caplog.text
    assert cache.image_for(a, "charliecloud") == first and cache.fetches == 2
    assert Path(first, "etc", "image-marker").read_text() == "img0"
    assert [e.ref for e in cache.entries()] == [a]


def test_a_bad_or_hostile_tarball_is_a_clear_error_and_writes_nothing_outside(tmp_path):
    import io

    host = tmp_path / "host"
    host.mkdir()
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"not a tarball")
    escape = tmp_path / "escape.tar"  # a link out of the image, then a file through it
    with tarfile.open(escape, "w") as tar:
        link = tarfile.TarInfo("etc")
        link.type, link.linkname = tarfile.SYMTYPE, str(host)
        tar.addfile(link)
        info = tarfile.TarInfo("etc/pwned")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    dotdot = tmp_path / "dotdot.tar"
    with tarfile.open(dotdot, "w") as tar:
        info = tarfile.TarInfo("../../outside")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    cache = ImageCache(tmp_path / "images", 10**7)
    for tb in (bad, escape, dotdot):
        with pytest.raises(ContainerError, match=f"cannot unpack {tb}"):
            cache.get(f"file://{tb}", "charliecloud")
    assert list(host.iterdir()) == [] and not (tmp_path / "outside").exists()
    assert cache.entries() == [] and list((cache.root / "tmp").iterdir()) == []


def test_absolute_symlinks_of_a_root_filesystem_are_kept(tmp_path):
    root, _ = make_rootfs(tmp_path)
    (root / "etc" / "awk").symlink_to("/usr/bin/mawk")  # like /etc/alternatives
    tgz = tmp_path / "abs.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root, arcname=".")
    image = Path(ImageCache(tmp_path / "images", 10**7).image_for(f"file://{tgz}", "charliecloud"))
    assert os.readlink(image / "etc" / "awk") == "/usr/bin/mawk"
