"""Publishing survives a SIGKILLed manager: a version left ``pending`` by a killed manager is
``failed`` after the restart (and never routes, not even when the old verification finishes),
an upload cut off by the kill leaves no version and no blob, and publishing again just works.

The manager runs as ``dlhub-manager serve`` (a real process, killed with SIGKILL and started again
on the same ports and home); the endpoint is a separate process that stays up throughout.
Verification is held with a release file instead of a sleep, so the kill always lands while the
version is pending."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil
import pytest
import yaml
from conftest import _session_members, kill_pids, read_json, wait_until

from dlhub.executor import Client, Executor, Servable
from dlhub.protocol import ServableNotFound, UnknownEndpoint

START_TIMEOUT_S = 60
META = {"title": "Held doubler", "authors": ["Doe, Jane"]}


def held_double(x, marker: str, release: str, limit_s: float = 30.0):
    """Note that it started, wait (bounded) for ``release`` to exist, return ``2 * x``."""
    import os
    import time

    with open(marker, "a") as f:
        f.write(f"{x}\n")
    deadline = time.monotonic() + limit_s
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)
    return 2 * x


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Deployment:
    """A ``dlhub-manager serve`` process and one endpoint process under ``home``."""

    home: Path
    manager: subprocess.Popen | None = None
    endpoint: subprocess.Popen | None = None
    ports: list[str] | None = None  # client, endpoint, REST: fixed after the first start
    token: str = ""
    endpoint_name: str = "pub"

    @property
    def manager_home(self) -> Path:
        return self.home / "manager"

    @property
    def info(self) -> dict:
        return read_json(self.manager_home / "manager.json")

    def client(self) -> Client:
        return Client(self.info["rest_url"], self.token, home=str(self.home), timeout_s=60)

    def executor(self) -> Executor:
        return Executor(self.endpoint_name, self.info["client_url"], self.token, home=str(self.home))

    def start_manager(self) -> None:
        ports = self.ports or ["0", "0", "0"]
        log = open(self.home / "manager.out", "ab")  # noqa: SIM115 - the child keeps it open
        try:
            self.manager = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dlhub.manager.cli",
                    "serve",
                    "--home",
                    str(self.manager_home),
                    "--client-port",
                    ports[0],
                    "--endpoint-port",
                    ports[1],
                    "--rest-port",
                    ports[2],
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        proc = self.manager
        wait_until(
            lambda: self.info.get("pid") == proc.pid or proc.poll() is not None,
            START_TIMEOUT_S,
            what="the manager to write manager.json",
        )
        assert proc.poll() is None, f"the manager exited: {(self.home / 'manager.out').read_text()[-3000:]}"
        info = self.info
        ports_now = [str(urlparse(info[k]).port) for k in ("client_url", "endpoint_url", "rest_url")]
        if self.ports is None:
            self.ports = ports_now
        assert ports_now == self.ports, "the restarted manager is not on the same ports"
        self.token = (self.manager_home / "admin.token").read_text().strip()

    def kill_manager(self) -> None:
        proc = self.manager
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: not _alive(proc.pid), 10, what="the manager to die")

    def start_endpoint(self) -> None:
        run_dir = self.home / "endpoints" / self.endpoint_name
        run_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "name": self.endpoint_name,
            "manager": {"address": self.info["endpoint_url"], "token": self.token},
            "pool": {"workers_per_node": 1},
        }
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "DLHUB_SERVABLE_CACHE": str(self.home / "servable-cache")}
        self.endpoint = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dlhub.endpoint.cli",
                "start",
                self.endpoint_name,
                "--home",
                str(self.home),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # pools and workers share its session: easy to clean up
            cwd=self.home,
            env=env,
        )
        proc = self.endpoint
        wait_until(
            lambda: read_json(run_dir / "status.json").get("workers", 0) >= 1 or proc.poll() is not None,
            START_TIMEOUT_S,
            what="the endpoint's worker",
        )
        if proc.poll() is not None:
            log = run_dir / "endpoint.log"
            raise RuntimeError(f"endpoint exited: {log.read_text()[-3000:] if log.exists() else ''}")

    def stop(self) -> None:
        pids = []
        if self.endpoint is not None:
            pids += [self.endpoint.pid, *_session_members(self.endpoint.pid)]
        if self.manager is not None:
            pids += [self.manager.pid, *_session_members(self.manager.pid)]
        kill_pids(sorted(set(pids)))
        for proc in (self.endpoint, self.manager):
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    dep = Deployment(tmp_path_factory.mktemp("publish-durability"))
    try:
        dep.start_manager()
        dep.start_endpoint()
        yield dep
    finally:
        dep.stop()


def _endpoint_connected(dep: Deployment) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not connected now" while it is on its way
        try:
            ex = dep.executor()
        except UnknownEndpoint:
            return False
    try:
        return bool(ex.status()["endpoints"][dep.endpoint_name]["connected"])
    finally:
        ex.shutdown(wait=False)


def _restart(dep: Deployment) -> None:
    """Start the manager again on the same ports; the endpoint, still up, registers again."""
    dep.start_manager()
    wait_until(lambda: _endpoint_connected(dep), START_TIMEOUT_S, 0.2, what="the endpoint to register again")


def _verify_task_states(dep: Deployment, digest: str) -> list[str]:
    con = sqlite3.connect(dep.manager_home / "dlhub.db", timeout=5)
    try:
        rows = con.execute("SELECT state FROM tasks WHERE function = ?", ("verify:" + digest,)).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def _digest(dep: Deployment, name: str, version: int) -> str:
    con = sqlite3.connect(dep.manager_home / "dlhub.db", timeout=5)
    try:
        (digest,) = con.execute(
            "SELECT digest FROM servable_versions WHERE owner = 'admin' AND name = ? AND version = ?",
            (name, version),
        ).fetchone()
    finally:
        con.close()
    return digest


def test_a_version_pending_when_the_manager_is_killed_is_failed_and_republishing_works(deployment, tmp_path):
    dep = deployment
    marker, release = tmp_path / "started", tmp_path / "release"
    servable = Servable.from_function(
        held_double, name="held-double", examples=[((4, str(marker), str(release)), 8)], **META
    )
    with dep.client() as client:
        ref = client.publish(servable, endpoint=dep.endpoint_name, wait=False)
        assert ref == "admin/held-double:1"
        # the example is running on the endpoint and cannot finish: the version is pending
        wait_until(
            lambda: marker.exists() and marker.read_text() == "4\n", START_TIMEOUT_S, what="verification"
        )
        assert client.describe(ref)["status"] == "pending"
    digest = _digest(dep, "held-double", 1)

    try:
        dep.kill_manager()
        _restart(dep)

        with dep.client() as client:
            info = client.describe(ref)
            assert info["status"] == "failed"
            assert info["error"] == "publishing was interrupted (the manager stopped)"
            # the verification still held at the endpoint now finishes; its report reaches the new
            # manager, which has no callback for it: the version stays failed
            release.touch()
            wait_until(
                lambda: _verify_task_states(dep, digest) == ["succeeded"],
                START_TIMEOUT_S,
                what="the old verification task to finish",
            )
            assert client.describe(ref)["status"] == "failed"
            assert [(v["version"], v["status"]) for v in client.versions("admin/held-double")] == [
                (1, "failed")
            ]

            with pytest.raises(ServableNotFound, match="admin/held-double:1 is failed"):
                client.run(ref, 1, str(marker), str(release), wait_s=30)
            with pytest.raises(
                ServableNotFound, match=r"admin/held-double has no ready version \(versions are failed\)"
            ):
                client.run("admin/held-double", 1, str(marker), str(release), wait_s=30)
            with dep.executor() as ex, pytest.raises(ServableNotFound, match="is failed"):
                ex.submit(ref, 1, str(marker), str(release)).result(30)

            # the same servable again: the next number, verified, ready, and it runs
            ref2 = client.publish(servable, endpoint=dep.endpoint_name, timeout_s=START_TIMEOUT_S)
            assert ref2 == "admin/held-double:2"
            info2 = client.describe("admin/held-double")
            assert (info2["record"]["version"], info2["status"], info2["error"]) == (2, "ready", None)
            assert [(v["version"], v["status"]) for v in info2["versions"]] == [(1, "failed"), (2, "ready")]
            assert client.run("admin/held-double", 21, str(marker), str(release), wait_s=30) == 42
            with dep.executor() as ex:
                assert ex.submit(ref2, 5, str(marker), str(release)).result(30) == 10
    finally:
        release.touch()  # never leave the endpoint's worker waiting


def test_a_manager_killed_mid_upload_leaves_no_version_and_no_blob(deployment, tmp_path):
    dep = deployment
    big = os.urandom(24 * 2**20)
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(big)
    (src / "bigmodel_mod.py").write_text(
        textwrap.dedent(
            """
            import hashlib
            from pathlib import Path

            def checksum(prefix):
                data = (Path(__file__).parent / "weights.bin").read_bytes()
                return prefix + hashlib.sha256(data).hexdigest()
            """
        )
    )
    expected = "w:" + hashlib.sha256(big).hexdigest()
    servable = Servable.from_module(
        "bigmodel_mod:checksum",
        files=[src / "bigmodel_mod.py", src / "weights.bin"],
        name="big-model",
        examples=[(("w:",), expected)],
        **META,
    )
    # the multipart body Client.publish would send, streamed by hand so the kill lands mid-body
    request = httpx.Request(
        "POST",
        f"{dep.info['rest_url']}/api/v1/servables",
        data={"record": json.dumps(servable.record), "endpoint": dep.endpoint_name},
        files=[("files", (path, data, "application/octet-stream")) for path, data in servable.files.items()],
    )
    body = request.read()
    assert len(body) > len(big)
    chunk, cut = 256 * 1024, (3 * len(body)) // 4
    sent = {"bytes": 0, "killed": False}

    def stream() -> Iterator[bytes]:
        for start in range(0, len(body), chunk):
            if start >= cut and not sent["killed"]:
                # three quarters are written (well beyond any socket buffer): the manager is
                # reading the upload; kill it before the rest arrives
                dep.kill_manager()
                sent["killed"] = True
            sent["bytes"] = start
            yield body[start : start + chunk]

    headers = {
        "Authorization": f"Bearer {dep.token}",
        "Content-Type": request.headers["Content-Type"],
        "Content-Length": str(len(body)),
    }
    with httpx.Client(timeout=30) as http, pytest.raises(httpx.TransportError):
        http.post(request.url, content=stream(), headers=headers)
    assert sent["killed"] and sent["bytes"] < len(body)

    _restart(dep)
    with dep.client() as client:
        with pytest.raises(LookupError, match="there is no servable admin/big-model"):
            client.versions("admin/big-model")
        assert client.search("big", only_latest=False) == []
    blobs = dep.manager_home / "blobs"
    for data in servable.files.values():
        hexd = hashlib.sha256(data).hexdigest()
        assert not (blobs / hexd[:2] / hexd[2:]).exists(), "a blob of the cut-off upload was stored"

    # the whole upload again: version 1 (the cut-off one never took a number), verified and run
    with dep.client() as client:
        assert (
            client.publish(servable, endpoint=dep.endpoint_name, timeout_s=START_TIMEOUT_S)
            == "admin/big-model:1"
        )
        assert client.run("admin/big-model", "x:", wait_s=30) == "x:" + expected[2:]
