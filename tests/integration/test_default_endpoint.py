"""A second endpoint does not break calls that name none: after ``dlhub up`` the default endpoint
is ``local`` for publishes (CLI, Client, REST), REST runs, ``Client().run`` and ``Executor()``;
with no default and two endpoints, each front end says how *its* user names one (``--endpoint``,
``endpoint=``, the JSON or form field ``"endpoint"``). Real managers, endpoints and workers."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import httpx
import pytest
import yaml
from conftest import _session_members, dlhub_cli, kill_pids, meta, read_json, stop_stack, wait_until

from dlhub.executor import Client, EndpointRequired, Executor, Servable
from dlhub.executor.config import write_client_config
from dlhub.protocol import DLHubError

RESULT_TIMEOUT_S = 60
CHEM = '''import re


def count_atoms(formula):
    """Number of atoms in a formula like Fe2O3."""
    return sum(int(n or 1) for _, n in re.findall(r"([A-Z][a-z]?)(\\d*)", formula))
'''


def count_atoms(formula):
    import re

    return sum(int(n or 1) for _, n in re.findall(r"([A-Z][a-z]?)(\d*)", formula))


def servable(name: str) -> Servable:
    return Servable.from_function(count_atoms, **meta(name, examples=[(("NaCl",), 2)]))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def publish_form(s: Servable) -> tuple[dict, list]:
    """The multipart form of ``POST /api/v1/servables``, as a curl user would send it."""
    files = [("files", (path, data, "application/octet-stream")) for path, data in s.files.items()]
    return {"record": json.dumps(s.record)}, files


def task_endpoint(http: httpx.Client, headers: dict, task_id: str) -> str:
    def finished():
        r = http.get(f"/api/v1/tasks/{task_id}", headers=headers)
        return r.json() if r.status_code == 200 and r.json()["state"] == "succeeded" else None

    return wait_until(finished, 10, what=f"task {task_id}'s committed state")["endpoint"]


# ---- after `dlhub up`, with a second endpoint started by `dlhub-endpoint start second` ------------


@pytest.fixture(scope="module")
def up_with_second(stack_factory):
    s = stack_factory(workers=1)
    run_dir = s.home / "endpoints" / "second"
    try:
        for args in (("configure", "second", "--workers", "1"), ("start", "second", "--detach")):
            proc = subprocess.run(
                [sys.executable, "-m", "dlhub.endpoint.cli", *args, "--home", str(s.home)],
                capture_output=True,
                text=True,
                timeout=90,
                stdin=subprocess.DEVNULL,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
        wait_until(
            lambda: read_json(run_dir / "status.json").get("workers", 0) >= 1, 60, what="second's worker"
        )
        config = json.loads((s.home / "config.json").read_text())
        headers = {"Authorization": f"Bearer {config['token']}"}
        with httpx.Client(base_url=config["rest_url"], timeout=RESULT_TIMEOUT_S) as http:

            def both_connected():
                eps = http.get("/api/v1/metrics", headers=headers).json()["endpoints"]
                return all(eps.get(n, {}).get("connected") for n in ("local", "second"))

            wait_until(both_connected, 30, what="local and second connected")
            yield s, http, headers
    finally:
        try:
            pid = int((run_dir / "endpoint.pid").read_text())
        except (FileNotFoundError, ValueError):
            pid = None
        members = _session_members(pid) if pid else []  # its pool and workers share its session
        stop_stack(s)  # `dlhub down` stops every endpoint of the home, second too
        kill_pids([p for p in [pid, *members] if p])


def test_dlhub_up_makes_local_the_default_endpoint(up_with_second):
    s, http, headers = up_with_second
    assert json.loads((s.home / "config.json").read_text())["default_endpoint"] == "local"
    assert http.get("/api/v1/whoami", headers=headers).json()["default_endpoint"] == "local"
    status = http.get("/api/v1/metrics", headers=headers).json()
    assert status["manager"]["default_endpoint"] == "local"
    assert {n for n, ep in status["endpoints"].items() if ep["connected"]} == {"local", "second"}
    # a user's own default in config.json survives another `dlhub up` (which rewrites the file)
    path = s.home / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "default_endpoint": "second"}))
    try:
        proc = s.cli("up", "--detach", "--no-examples")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(path.read_text())["default_endpoint"] == "second"
        with Executor(home=str(s.home)) as ex:
            assert ex.endpoint == "second"
    finally:
        path.write_text(json.dumps({**json.loads(path.read_text()), "default_endpoint": "local"}))


def test_calls_that_name_no_endpoint_go_to_the_default_one(up_with_second, tmp_path, monkeypatch):
    s, http, headers = up_with_second
    home = str(s.home)
    monkeypatch.delenv("DLHUB_ENDPOINT", raising=False)
    # `dlhub publish` as the README shows it
    (tmp_path / "chem.py").write_text(CHEM)
    name = unique("count-atoms")
    proc = subprocess.run(
        [sys.executable, "-m", "dlhub.executor.cli", "publish", "chem.py:count_atoms", "--name", name]
        + ["--example", '[["NaCl"], 2]', "--domain", "chemistry", "--home", home],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"admin/{name}:1"
    # a REST publish without the form field: verified on the default endpoint
    other = unique("rest-published")
    data, files = publish_form(servable(other))
    r = http.post("/api/v1/servables", data=data, files=files, headers=headers)
    assert r.status_code == 202 and r.json()["verifying_on"] == "local", r.text
    client = Client(home=home)
    wait_until(lambda: client.describe(f"admin/{other}")["status"] == "ready", 60, what="verification")
    assert client.publish(servable(unique("client-published"))).endswith(":1")
    # the README's REST run: {"args": [...]} and nothing else
    r = http.post(f"/api/v1/servables/admin/{name}/run", json={"args": ["Fe2O3"]}, headers=headers)
    assert r.status_code == 200 and r.json()["result"] == 5, r.text
    assert task_endpoint(http, headers, r.json()["task_id"]) == "local"
    assert client.run(f"admin/{name}", "Fe2O3") == 5
    cli = dlhub_cli("run", f"admin/{name}", "Fe2O3", "--home", home)
    assert cli.returncode == 0 and json.loads(cli.stdout) == 5, cli.stdout + cli.stderr
    # Executor() with no endpoint: config.json's default_endpoint; named ones work as before
    with Executor(home=home) as ex:
        assert ex.endpoint == "local"
        fut = ex.submit(f"admin/{name}", "KCl")
        assert fut.result(RESULT_TIMEOUT_S) == 2
    assert task_endpoint(http, headers, fut.task_id) == "local"
    for ex in (Executor("second", home=home), Executor(endpoint="second", home=home)):
        with ex:
            fut = ex.submit(f"admin/{name}", "H2O")
            assert fut.result(RESULT_TIMEOUT_S) == 3
        assert task_endpoint(http, headers, fut.task_id) == "second"
    # $DLHUB_ENDPOINT picks another one for Executor() and Client()
    monkeypatch.setenv("DLHUB_ENDPOINT", "second")
    with Executor(home=home) as ex:
        fut = ex.submit(f"admin/{name}", "CO2")
        assert ex.endpoint == "second" and fut.result(RESULT_TIMEOUT_S) == 3
    assert Client(home=home).endpoint == "second"


# ---- no default endpoint and two endpoints: every front end says how to name one ----------------


@pytest.fixture
def no_default(custom_stack_factory, monkeypatch):
    monkeypatch.delenv("DLHUB_ENDPOINT", raising=False)
    cs = custom_stack_factory(name="one")  # an in-process manager without --default-endpoint
    assert cs.manager.config.default_endpoint is None
    two_dir = cs.home / "endpoints" / "two"
    two_dir.mkdir(parents=True)
    config = {"name": "two", "manager": {"address": cs.manager.endpoint_url, "token": cs.token}}
    (two_dir / "config.yaml").write_text(yaml.safe_dump({**config, "pool": {"workers_per_node": 1}}))
    two = subprocess.Popen(
        [sys.executable, "-m", "dlhub.endpoint.cli", "start", "two", "--home", str(cs.home)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=cs.home,
    )
    try:
        wait_until(lambda: read_json(two_dir / "status.json").get("workers", 0) >= 1, 60, what="two's worker")
        eps = cs.manager.status()["endpoints"]
        assert eps["one"]["connected"] and eps["two"]["connected"]
        # the client config a user of this manager has, without a default_endpoint
        write_client_config(cs.home, cs.manager.client_url, cs.token, rest_url=cs.manager.api.url)
        with httpx.Client(base_url=cs.manager.api.url, timeout=RESULT_TIMEOUT_S) as http:
            yield cs, http, {"Authorization": f"Bearer {cs.token}"}
    finally:
        members = _session_members(two.pid)
        two.terminate()
        try:
            two.wait(30)
        except subprocess.TimeoutExpired:
            two.kill()
            two.wait(10)
        kill_pids(members + _session_members(two.pid))


def test_without_a_default_each_front_end_says_how_to_name_an_endpoint(no_default, tmp_path):
    cs, http, headers = no_default
    home = str(cs.home)
    client = Client(home=home)
    name = unique("count-atoms")
    ref = client.publish(servable(name), endpoint="one")
    # Python: a typed error (still a ValueError, as before) that says endpoint=
    for call in (lambda: client.run(ref, "Fe2O3"), lambda: client.publish(servable(unique("x")))):
        with pytest.raises(EndpointRequired) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, DLHubError)
        assert info.value.candidates == ["one", "two"]
        assert "endpoint=" in str(info.value) and "field" not in str(info.value)
    with pytest.raises(EndpointRequired, match="endpoint=") as info:
        Executor(home=home)
    assert info.value.candidates == ["one", "two"]
    # REST: JSON errors naming the JSON field / the form field "endpoint", with the candidates
    r = http.post(f"/api/v1/servables/{ref.split(':')[0]}/run", json={"args": ["Fe2O3"]}, headers=headers)
    body = r.json()
    assert (r.status_code, body["code"]) == (409, "endpoint-required"), r.text
    assert 'JSON field "endpoint"' in body["message"] and body["endpoints"] == ["one", "two"]
    data, files = publish_form(servable(unique("rest")))
    r = http.post("/api/v1/servables", data=data, files=files, headers=headers)
    assert (r.status_code, r.json()["code"]) == (409, "endpoint-required"), r.text
    assert 'form field "endpoint"' in r.json()["message"]
    # the shell: --endpoint, never a form field or a Python keyword
    (tmp_path / "chem.py").write_text(CHEM)
    published = subprocess.run(
        [sys.executable, "-m", "dlhub.executor.cli", "publish", "chem.py:count_atoms", "--name", unique("c")]
        + ["--example", '[["NaCl"], 2]', "--home", home],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    ran = dlhub_cli("run", ref, "Fe2O3", "--home", home)
    for proc in (published, ran):
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "name one with --endpoint" in proc.stderr and "one, two" in proc.stderr
        assert "endpoint=" not in proc.stderr and "field" not in proc.stderr
    # naming one works everywhere
    assert client.run(ref, "Fe2O3", endpoint="two") == 5
    ran = dlhub_cli("run", ref, "Fe2O3", "--endpoint", "two", "--home", home)
    assert ran.returncode == 0 and json.loads(ran.stdout) == 5, ran.stderr
    r = http.post(
        f"/api/v1/servables/{ref.split(':')[0]}/run",
        json={"args": ["KCl"], "endpoint": "two"},
        headers=headers,
    )
    assert r.status_code == 200 and r.json()["result"] == 2, r.text
