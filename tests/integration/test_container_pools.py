"""Containerized pools, for real: an endpoint whose pool runs each worker inside an image with
Charliecloud's ``ch-run``, and one whose pool goes through dlhub's Singularity/Apptainer code
path (spython builds the ``apptainer exec`` line; ``tests/bin/apptainer``, a shim that records
nothing and runs the same container with ch-run, is first on PATH). Functions prove they ran
inside: the marker file ``/dlhub-test-image`` exists only in the image, and the image's Python
is Debian's 3.11.2, not the endpoint's. Worker death and block loss inside containers behave as
without them, and ``dlhub-endpoint check`` compares the image's Python/dill/dlhub with the
endpoint's.

The image is built once per module by ``scripts/build-test-image.sh`` (host copy, ~3 s; into
``$SERVABLE_TEST_IMAGE`` when set). With ``DLHUB_REQUIRE_CONTAINERS=1`` (CI) a missing ch-run
or a failed image build FAILS these tests instead of skipping them.

Functions sent to the endpoint import what they need inside their bodies."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import podman_store, pool_pids, wait_until

from dlhub.executor import Client, Servable, WorkerLost

ROOT = Path(__file__).resolve().parents[2]
TESTS_BIN = ROOT / "tests" / "bin"
REQUIRE = os.environ.get("DLHUB_REQUIRE_CONTAINERS") == "1"
TIMEOUT_S = 60
HOST_PYTHON = ".".join(map(str, sys.version_info[:3]))


def _missing(why: str):
    if REQUIRE:
        pytest.fail(f"{why} (DLHUB_REQUIRE_CONTAINERS=1: containers are required)", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """A Charliecloud directory image with Debian's python3 and the marker /dlhub-test-image."""
    if shutil.which("ch-run") is None:
        _missing("ch-run is not installed: apt-get install -y --no-install-recommends charliecloud-runtime")
    dest = os.environ.get("SERVABLE_TEST_IMAGE") or str(tmp_path_factory.mktemp("image") / "img")
    env = {**os.environ, "INSTALL": "0"}
    env.setdefault("USER", "root" if os.getuid() == 0 else str(os.getuid()))
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-test-image.sh"), dest],
        env=env,
        cwd=tmp_path_factory.getbasetemp(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 or not os.path.exists(os.path.join(dest, "dlhub-test-image")):
        _missing(f"scripts/build-test-image.sh {dest} failed: {(proc.stdout + proc.stderr)[-2000:]}")
    return dest


@pytest.fixture
def shim_path(monkeypatch, tmp_path) -> Path:
    """tests/bin first on PATH, behind a recording ``apptainer`` that logs each command line it
    is given (then runs tests/bin/apptainer): proof that the pool went through that path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apptainer-calls.log"
    (bin_dir / "apptainer").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\nexec {TESTS_BIN}/apptainer "$@"\n'
    )
    (bin_dir / "apptainer").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{TESTS_BIN}:{os.environ['PATH']}")
    monkeypatch.setenv("CHSHIM_STATE", str(tmp_path / "chshim"))
    return log


def endpoint_config(container: dict, workers: int = 2) -> dict:
    return {
        "heartbeat_s": 1.0,
        "heartbeat_threshold_s": 3.0,
        "strategy_period_s": 1.0,
        "provider": {"type": "local", "init_blocks": 1, "min_blocks": 1, "max_blocks": 1},
        "pool": {"workers_per_node": workers, "container": container},
    }


def where_am_i():
    import os
    import sys

    import dlhub.endpoint.worker as w

    return {
        "marker": os.path.exists("/dlhub-test-image"),
        "python": ".".join(map(str, sys.version_info[:3])),
        "executable": sys.executable,
        "worker": w.__file__,
        "worker_id": os.environ.get("DLHUB_WORKER_ID"),
        "host_vars": [v for v in ("VIRTUAL_ENV", "PYTHONHOME") if v in os.environ],
        "pid": os.getpid(),
    }


def read_inside(path):
    """A File argument's staged copy, read inside the image."""
    import hashlib
    import os

    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"path": str(path), "sha256": digest, "marker": os.path.exists("/dlhub-test-image")}


def die_hard(record: str | None = None):
    import os

    if record:
        with open(record, "w") as f:
            f.write(os.environ["DLHUB_WORKER_ID"])
    os._exit(7)


def sleep_then_where(started: str, seconds: float):
    import os
    import sys
    import time

    open(started, "a").close()
    time.sleep(seconds)
    return {"marker": os.path.exists("/dlhub-test-image"), "python": ".".join(map(str, sys.version_info[:3]))}


def assert_inside(info: dict) -> None:
    assert info["marker"], info  # the file exists only in the image
    assert info["python"] == "3.11.2" != HOST_PYTHON, info  # Debian's python in the image
    assert info["executable"] == "/usr/bin/python3", info
    assert info["worker"] == "/opt/dlhub/endpoint/worker.py", info  # the bundle bound at /opt
    assert info["host_vars"] == [], info


def worker_pids(pool_id_prefix: str) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or ()
        if "dlhub.endpoint.worker" in cmdline and any(a.startswith(pool_id_prefix) for a in cmdline):
            out.append(p.pid)
    return out


def test_charliecloud_pool_runs_functions_inside_the_image(custom_stack_factory, image, tmp_path):
    cs = custom_stack_factory(
        endpoint=endpoint_config({"type": "charliecloud", "image": image}), name="chpool", workers=2
    )
    ex = cs.executor()
    infos = [f.result(TIMEOUT_S) for f in [ex.submit(where_am_i) for _ in range(6)]]
    for info in infos:
        assert_inside(info)
    # the worker is the process the pool started (ch-run execs the image's python)
    proc = psutil.Process(infos[0]["pid"])
    assert proc.exe() == "/usr/bin/python3.11" and "dlhub.endpoint.worker" in proc.cmdline()
    assert ex.submit(pow, 2, 10).result(TIMEOUT_S) == 1024

    # a published servable whose files are unpacked into the servable cache (bound at /opt/cache)
    (tmp_path / "inside_mod.py").write_text(
        "import os, sys\n\n"
        "def where(x):\n"
        "    return {'x': x, 'marker': os.path.exists('/dlhub-test-image'), 'file': __file__,\n"
        "            'python': '.'.join(map(str, sys.version_info[:3]))}\n"
    )
    name = f"inside-{uuid.uuid4().hex[:6]}"
    with Client(cs.manager.api.url, cs.token, home=str(cs.home)) as client:
        ref = client.publish(
            Servable.from_module(
                "inside_mod:where",
                files=[tmp_path / "inside_mod.py"],
                name=name,
                title="runs inside",
                authors=["Doe, Jane"],
                domains=["testing"],
            )
        )
    out = ex.submit(ref, 5).result(TIMEOUT_S)
    assert out["x"] == 5 and out["marker"] and out["python"] == "3.11.2", out
    assert out["file"].startswith("/opt/cache/") and out["file"].endswith("inside_mod.py"), out
    assert list((cs.endpoint_dir / "servables" / "unpacked").rglob("inside_mod.py"))  # the host side

    # a File argument: staged into the endpoint's data cache, which is bound in at /opt/data
    import hashlib

    from dlhub.executor import File

    scan = tmp_path / "scan.bin"
    scan.write_bytes(os.urandom(300_000))
    with cs.executor(rest_url=cs.manager.api.url) as by_ref:
        got = by_ref.submit(read_inside, File(scan)).result(TIMEOUT_S)
    assert got["marker"] and got["path"].startswith("/opt/data/"), got
    assert got["sha256"] == hashlib.sha256(scan.read_bytes()).hexdigest()

    # a worker killed inside its container: WorkerLost, the pool starts another one (in the image)
    check_worker_restarted_in_image(cs, ex, tmp_path)


def workers_of(pool: int) -> dict[str, psutil.Process]:
    """The pool's worker processes by worker id (the runtime execs the image's python)."""
    out = {}
    for p in psutil.Process(pool).children():
        try:
            cmd = p.cmdline()
        except psutil.Error:  # gone (or a zombie) between children() and cmdline()
            continue
        if "dlhub.endpoint.worker" in cmd:
            out[cmd[cmd.index("--worker-id") + 1]] = p
    return out


def workers_when(pool: int, ok) -> dict[str, psutil.Process] | None:
    """The pool's workers when one look at them satisfies ``ok``, else None: one look, because a
    replacement is briefly not a worker on its command line while the runtime execs it, and two
    looks could each see a different set."""
    workers = workers_of(pool)
    return workers if ok(workers) else None


def check_worker_restarted_in_image(cs, ex, tmp_path: Path) -> None:
    (pool,) = wait_until(lambda: pool_pids(cs.endpoint_dir), TIMEOUT_S, what="the pool process")
    before = wait_until(lambda: workers_when(pool, lambda w: len(w) == 2), TIMEOUT_S, what="2 workers")
    record = tmp_path / "dead-worker"
    with pytest.raises(WorkerLost):
        ex.submit(die_hard, str(record)).result(TIMEOUT_S)
    dead = record.read_text()
    assert dead in before
    after = wait_until(
        lambda: workers_when(pool, lambda w: len(w) == 2 and dead not in w),
        TIMEOUT_S,
        what="the pool to replace the dead worker",
    )
    (new,) = set(after) - set(before)
    assert new.rsplit(".", 2)[1] == dead.rsplit(".", 2)[1]  # the same slot, a new generation
    # the replacement runs in the image too: once the runtime has exec'd it (ch-run, and the shim
    # before it, are the same pid until then), it is the image's python in another mount namespace
    proc = after[new]
    wait_until(lambda: proc.cmdline()[:3] == ["python3", "-m", "dlhub.endpoint.worker"], 10, what="exec")
    assert proc.exe() == "/usr/bin/python3.11"
    assert os.readlink(f"/proc/{proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    wait_until(lambda: cs.status().get("workers") == 2, TIMEOUT_S, what="two workers registered")
    for info in [f.result(TIMEOUT_S) for f in [ex.submit(where_am_i) for _ in range(6)]]:
        assert_inside(info)


def test_block_lost_inside_containers_behaves_as_without(custom_stack_factory, image, tmp_path):
    cs = custom_stack_factory(
        endpoint={**endpoint_config({"type": "charliecloud", "image": image}), "max_retries": 2},
        name="chblock",
        workers=2,
    )
    ex = cs.executor()
    assert_inside(ex.submit(where_am_i).result(TIMEOUT_S))
    (old_pool,) = wait_until(lambda: pool_pids(cs.endpoint_dir), TIMEOUT_S, what="the pool process")
    started = tmp_path / "started"
    fut = ex.submit(sleep_then_where, str(started), 3.0)
    wait_until(started.exists, TIMEOUT_S, what="the task to start in a container")
    old_workers = [p for p in psutil.Process(old_pool).children() if "dlhub.endpoint.worker" in p.cmdline()]
    assert len(old_workers) == 2
    os.killpg(os.getpgid(old_pool), signal.SIGKILL)  # the block is lost: pool and workers at once
    # the task is retried on the replacement block, in a container again
    assert fut.result(TIMEOUT_S) == {"marker": True, "python": "3.11.2"}
    new = wait_until(
        lambda: [p for p in pool_pids(cs.endpoint_dir) if p != old_pool], TIMEOUT_S, what="a new pool"
    )
    assert new
    wait_until(lambda: not any(p.is_running() for p in old_workers), 10, what="the old workers to be gone")
    assert_inside(ex.submit(where_am_i).result(TIMEOUT_S))


def test_apptainer_pool_goes_through_spython_and_starts_real_containers(
    custom_stack_factory, image, shim_path, tmp_path
):
    cs = custom_stack_factory(
        endpoint=endpoint_config({"type": "apptainer", "image": image, "options": ["--cleanenv"]}),
        name="apptainer",
        workers=2,
    )
    ex = cs.executor()
    for info in [f.result(TIMEOUT_S) for f in [ex.submit(where_am_i) for _ in range(4)]]:
        assert_inside(info)
    calls = shim_path.read_text().splitlines()
    assert len(calls) >= 2, calls
    # the line spython's _init_command/execute order builds, with argv[0] = apptainer
    line = calls[0]
    assert line.startswith(f"exec --bind {cs.endpoint_dir}/container:/opt --bind "), line
    assert "--env DLHUB_WORKER_ID=" in line and "--env PYTHONPATH=/opt:/dlhub/requirements:/opt/site" in line
    assert f"--cleanenv {image} python3 -m dlhub.endpoint.worker --config /dev/stdin" in line, line
    # worker death through the same path
    check_worker_restarted_in_image(cs, ex, tmp_path)
    assert len(shim_path.read_text().splitlines()) >= 3  # the replacement came through apptainer too


def _other_minor_python() -> str | None:
    """A Python whose minor version differs from the endpoint's (pyenv keeps several here)."""
    mine = sys.version_info[:2]
    roots = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*")))
    for root in roots:
        name = os.path.basename(root)
        parts = name.split(".")
        if len(parts) >= 2 and parts[1].isdigit() and (3, int(parts[1])) != mine and int(parts[1]) >= 8:
            if os.path.exists(os.path.join(root, "bin", f"python3.{parts[1]}")):
                return root
    return None


def _write_endpoint(home: Path, name: str, manager: dict, container: dict) -> None:
    d = home / "endpoints" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(
        yaml.safe_dump(
            {"name": name, "manager": manager, "pool": {"workers_per_node": 1, "container": container}}
        )
    )


def _check(home: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlhub.endpoint.cli", "check", name, "--home", str(home), "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=home,
        stdin=subprocess.DEVNULL,
    )


def test_endpoint_check_compares_the_image_with_the_endpoint(custom_stack_factory, image):
    cs = custom_stack_factory(
        endpoint=endpoint_config({"type": "charliecloud", "image": image}, workers=1),
        name="chcheck",
        workers=1,
    )
    ok = _check(cs.home, "chcheck")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"ok   pool default: container charliecloud {image}" in ok.stdout, ok.stdout
    assert "Python 3.11.2, dill " in ok.stdout, ok.stdout

    manager = yaml.safe_load((cs.endpoint_dir / "config.yaml").read_text())["manager"]
    # an image without dlhub (it says dlhub is installed there; it is not)
    _write_endpoint(
        cs.home, "nodlhub", manager, {"type": "charliecloud", "image": image, "dlhub": "installed"}
    )
    bad = _check(cs.home, "nodlhub")
    assert bad.returncode != 0
    assert f"FAIL pool default: container charliecloud {image}" in bad.stdout, bad.stdout
    assert "dlhub not importable in the image: ModuleNotFoundError: No module named 'dlhub'" in bad.stdout
    assert "dill not importable in the image" in bad.stdout

    # an image whose Python has another minor version: a real Python 3.x bound into the image
    other = _other_minor_python()
    if other is None:
        pytest.skip("no Python of another minor version under ~/.pyenv/versions for the mismatch case")
    minor = os.path.basename(other).split(".")[1]
    _write_endpoint(
        cs.home,
        "otherpy",
        manager,
        {
            "type": "charliecloud",
            "image": image,
            "python": f"/srv/bin/python3.{minor}",
            "binds": [f"{other}:/srv"],
            "options": ["--set-env=LD_LIBRARY_PATH=/srv/lib", "--set-env=PYTHONHOME=/srv"],
        },
    )
    bad = _check(cs.home, "otherpy")
    assert bad.returncode != 0
    mine = ".".join(map(str, sys.version_info[:3]))
    assert f"Python {os.path.basename(other)} in the image but {mine} at the endpoint" in bad.stdout, (
        bad.stdout
    )


def test_missing_runtime_fails_the_block_with_a_clear_reason(custom_stack_factory, image):
    """A pool whose runtime is not installed never registers; the block's error names the runtime
    and the executable (status.json block_errors and the log), and the other pool still works."""
    cs = custom_stack_factory(
        endpoint={
            **endpoint_config({"type": "charliecloud", "image": image}, workers=1),
            "pools": {
                "nopodman": {
                    "provider": {"type": "local", "init_blocks": 1, "min_blocks": 0, "max_blocks": 1},
                    "pool": {
                        "workers_per_node": 1,
                        "container": {"type": "podman", "image": "localhost/x", "binary": "dlhub-no-podman"},
                    },
                }
            },
        },
        name="nopodman",
        workers=1,
    )
    want = "container runtime 'podman': executable 'dlhub-no-podman' not found on PATH"
    log = cs.endpoint_dir / "endpoint.log"
    wait_until(lambda: want in log.read_text(), TIMEOUT_S, what="the block error in the log")
    assert want in json.dumps(cs.status().get("block_errors")), cs.status().get("block_errors")
    assert cs.executor().submit(pow, 2, 3).result(TIMEOUT_S) == 8


def test_pool_json_carries_the_container(custom_stack_factory, image):
    cs = custom_stack_factory(
        endpoint=endpoint_config(
            {"type": "charliecloud", "image": image, "binds": ["/tmp:/scratch"]}, workers=1
        ),
        name="chjson",
        workers=1,
    )
    cfg = json.loads((cs.endpoint_dir / "pool-default.json").read_text())
    assert cfg["container"]["type"] == "charliecloud" and cfg["container"]["binds"] == ["/tmp:/scratch"]
    assert cfg["container"]["bundle"] == str(cs.endpoint_dir / "container")
    assert (cs.endpoint_dir / "container" / "dlhub" / "endpoint" / "worker.py").is_file()
    assert cs.executor().submit(pow, 3, 3).result(TIMEOUT_S) == 27


# ---- podman, for real (the recipe's configuration: a private store, runc, lowered ulimits) -------


@pytest.fixture(scope="module")
def podman_image(image, tmp_path_factory) -> dict[str, str]:
    """The test image imported into a private podman store; the environment that selects it."""
    missing = [b for b in ("podman", "runc", "catatonit") if shutil.which(b) is None]
    if missing:
        _missing(f"{', '.join(missing)} not installed: apt-get install -y podman runc catatonit")
    env = podman_store(tmp_path_factory.mktemp("podman"))
    tar = subprocess.Popen(["tar", "-C", image, "-c", "."], stdout=subprocess.PIPE)
    proc = subprocess.run(
        ["podman", "import", "-q", "-", "localhost/dlhub-test-image"],
        stdin=tar.stdout,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    tar.wait()
    if proc.returncode != 0:
        _missing(f"podman import failed: {proc.stderr[-2000:]}")
    yield env
    # remove what is left and the store itself (podman keeps <graphroot>/overlay mounted)
    subprocess.run(
        ["podman", "system", "reset", "-f"], env={**os.environ, **env}, capture_output=True, timeout=60
    )


def podman_containers(env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        ["podman", "ps", "-a", "--format", "{{.Names}}"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return [n for n in out.stdout.split() if n.startswith("dlhub-")]


def test_podman_pool_for_real_and_no_container_outlives_it(podman_image, monkeypatch, tmp_path_factory):
    from conftest import start_custom_stack, stop_custom_stack

    for k, v in podman_image.items():
        monkeypatch.setenv(k, v)
    cs = start_custom_stack(
        tmp_path_factory.mktemp("dlhub-podman"),
        endpoint=endpoint_config({"type": "podman", "image": "localhost/dlhub-test-image"}),
        name="podman",
        workers=2,
    )
    try:
        ex = cs.executor()
        for info in [f.result(TIMEOUT_S) for f in [ex.submit(where_am_i) for _ in range(4)]]:
            assert_inside(info)
        names = podman_containers(podman_image)
        assert len(names) == 2, names  # one container per worker, named after it
        with pytest.raises(WorkerLost):
            ex.submit(die_hard).result(TIMEOUT_S)  # (the host's /tmp is not in a podman container)
        wait_until(lambda: cs.status().get("workers") == 2, TIMEOUT_S, what="the replacement worker")
        assert_inside(ex.submit(where_am_i).result(TIMEOUT_S))
        wait_until(
            lambda: len(podman_containers(podman_image)) == 2, 30, what="the dead worker's container gone"
        )
        # a File argument inside podman (which shares no host folder unless bound): the data cache
        import hashlib

        from dlhub.executor import File

        scan = tmp_path_factory.mktemp("scan") / "scan.bin"
        scan.write_bytes(os.urandom(200_000))
        with cs.executor(rest_url=cs.manager.api.url) as by_ref:
            got = by_ref.submit(read_inside, File(scan)).result(TIMEOUT_S)
        assert got["marker"] and got["path"].startswith("/opt/data/"), got
        assert got["sha256"] == hashlib.sha256(scan.read_bytes()).hexdigest()
    finally:
        stop_custom_stack(cs)
    # the pool forwards its stop to the containers (--init) and removes them (rm -f)
    wait_until(lambda: podman_containers(podman_image) == [], 30, what="no dlhub container left")


def test_a_pool_image_given_as_a_uri_is_fetched_once_into_the_endpoint_image_cache(
    custom_stack_factory, image, tmp_path
):
    """``container.image: file://rootfs.tar.gz``: the pool fetches it through the endpoint's
    image cache (unpacked once into endpoints/NAME/images/) and pins it while it runs; the block
    that replaces a killed pool finds it warm (no second unpack) and its workers run inside."""
    from dlhub.endpoint.images import ImageCache

    tgz = tmp_path / "image.tar.gz"
    subprocess.run(["tar", "-C", image, "-czf", str(tgz), "."], check=True, timeout=300)
    config = endpoint_config({"type": "charliecloud", "image": f"file://{tgz}"}, workers=1)
    config["provider"] = {"type": "local", "init_blocks": 1, "min_blocks": 1, "max_blocks": 1}
    cs = custom_stack_factory(endpoint=config, name="chcache", workers=1)
    ex = cs.executor()
    assert_inside(ex.submit(where_am_i).result(TIMEOUT_S))
    cache = ImageCache(cs.endpoint_dir / "images", 10**12)
    (entry,) = cache.entries()
    assert entry.ref == f"file://{tgz}" and entry.runtime == "charliecloud", entry
    assert Path(entry.image).is_relative_to(cs.endpoint_dir / "images"), entry.image
    assert cache.pinned(entry.key), "the running pool does not pin its image"
    pool_json = json.loads((cs.endpoint_dir / "pool-default.json").read_text())
    assert pool_json["container"]["image"] == f"file://{tgz}"  # the pool resolves it, not the endpoint

    (old,) = wait_until(lambda: pool_pids(cs.endpoint_dir), TIMEOUT_S, what="the pool process")
    os.killpg(os.getpgid(old), signal.SIGKILL)  # the whole block: pool and its containerized workers
    wait_until(
        lambda: [p for p in pool_pids(cs.endpoint_dir) if p != old] and cs.status().get("workers", 0) >= 1,
        TIMEOUT_S,
        what="a replacement block with a worker",
    )
    assert_inside(ex.submit(where_am_i).result(TIMEOUT_S))
    (again,) = cache.entries()
    assert again.created == entry.created and again.image == entry.image, (entry, again)  # not refetched
    assert again.uses > entry.uses and again.last_used > entry.last_used, (entry, again)
    checked = _check(cs.home, "chcache")  # check fetches through the same cache: warm, and passes
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"ok   pool default: container charliecloud file://{tgz}" in checked.stdout, checked.stdout
    assert cache.entries()[0].created == entry.created
