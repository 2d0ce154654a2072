"""The unmodified globus-compute-sdk Client against a real stack (``dlhub up``: manager with its
Globus Compute API + ``local`` endpoint, 2 workers), issue 13 items 1, 2, 3 and 5."""

from __future__ import annotations

import json
import time
import uuid

import globus_sdk
import pytest
from globus_compute_sdk import Client
from globus_compute_sdk.errors import TaskExecutionFailed, TaskPending
from globus_compute_sdk.sdk.client import _ComputeWebClient

from dlhub.compat.globus_compute import client as compat_client
from dlhub.compat.globus_compute import endpoint_id
from dlhub.protocol.gc_serialize import GC_NAMESPACE

RESULT_TIMEOUT_S = 60


# dill (the SDK's default DillCode) pickles a function of an importable module by reference, and
# the worker cannot import this test module: the functions are defined as a script's or a
# notebook's are (module __main__), which dill sends by value, as users' functions travel
_SOURCE = """
def square(x):
    return x * x


def add(a, b=0):
    return a + b


def fails(x):
    raise ValueError(f"no good: {x}")
"""
_NS: dict = {"__name__": "__main__"}
exec(_SOURCE, _NS)
square, add, fails = _NS["square"], _NS["add"], _NS["fails"]


def source_add(a, b=0):  # sent as its source text (DillCodeSource): by name, not by reference
    return a + b


def gc_url(stack) -> str:
    return json.loads((stack.home / "manager" / "globus_compute.json").read_text())["url"]


def make_client(stack, token: str | None = None, **kwargs) -> Client:
    token = token or (stack.home / "manager" / "admin.token").read_text().strip()
    authorizer = globus_sdk.AccessTokenAuthorizer(token)
    gcc = Client(environment="local", authorizer=authorizer, do_version_check=False, **kwargs)
    gcc._compute_web_client = _ComputeWebClient(base_url=gc_url(stack), authorizer=authorizer)
    return gcc


def wait_result(gcc: Client, task_id: str, timeout: float = RESULT_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return gcc.get_result(task_id)
        except TaskPending:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def gcc(stack) -> Client:
    return make_client(stack)


def test_register_run_get_result(gcc):
    fid = gcc.register_function(square)
    assert uuid.UUID(fid)
    assert gcc.register_function(square) == fid  # stored once, by digest
    tid = gcc.run(7, endpoint_id=endpoint_id("local"), function_id=fid)
    assert wait_result(gcc, tid) == 49
    task = gcc.get_task(tid)
    assert task["status"] == "success" and task["pending"] is False and task["result"] == 49


def test_source_code_and_json_data_strategies(stack):
    from globus_compute_sdk.serialize import DillCodeSource, JSONData

    strategies = {"code_serialization_strategy": DillCodeSource(), "data_serialization_strategy": JSONData()}
    gcc = make_client(stack, **strategies)
    fid = gcc.register_function(source_add)
    tid = gcc.run(2, b=5, endpoint_id=endpoint_id("local"), function_id=fid)
    assert wait_result(gcc, tid) == 7


def test_kwargs_and_batch(gcc):
    fid = gcc.register_function(add)
    batch = gcc.create_batch()
    for i in range(10):
        batch.add(fid, args=(i,), kwargs={"b": 100})
    answer = gcc.batch_run(endpoint_id("local"), batch)
    ids = answer["tasks"][fid]
    assert len(ids) == 10 and uuid.UUID(answer["task_group_id"])
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while True:
        results = gcc.get_batch_result(ids)
        if all(not r["pending"] for r in results.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [results[t]["result"] for t in ids] == [i + 100 for i in range(10)]


def test_thousand_tasks_through_batch_run(gcc):
    fid = gcc.register_function(square)
    batch = gcc.create_batch()
    for i in range(1000):
        batch.add(fid, args=(i,))
    ids = gcc.batch_run(endpoint_id("local"), batch)["tasks"][fid]
    assert len(set(ids)) == 1000
    deadline = time.monotonic() + 120
    results: dict = {}
    while len(results) < 1000 and time.monotonic() < deadline:
        pending = [t for t in ids if t not in results]
        for start in range(0, len(pending), 500):
            for t, r in gcc.get_batch_result(pending[start : start + 500]).items():
                if not r["pending"]:
                    results[t] = r["result"]
        time.sleep(0.1)
    assert [results.get(t) for t in ids] == [i * i for i in range(1000)]


def test_failing_function_raises_task_execution_failed(gcc):
    fid = gcc.register_function(fails)
    tid = gcc.run(3, endpoint_id=endpoint_id("local"), function_id=fid)
    with pytest.raises(TaskExecutionFailed) as info:
        wait_result(gcc, tid)
    assert "ValueError: no good: 3" in str(info.value)


def test_endpoint_status_and_unknown_endpoint(gcc):
    status = gcc.get_endpoint_status(endpoint_id("local"))
    assert status["status"] == "online"
    fid = gcc.register_function(square)
    with pytest.raises(globus_sdk.GlobusAPIError) as info:
        gcc.run(1, endpoint_id=str(uuid.uuid4()), function_id=fid)
    assert info.value.http_status == 404
    with pytest.raises(globus_sdk.GlobusAPIError) as info:
        gcc.get_endpoint_status(str(uuid.uuid4()))
    assert info.value.http_status == 404


def test_unknown_function_and_task(gcc):
    with pytest.raises(globus_sdk.GlobusAPIError) as info:
        gcc.run(1, endpoint_id=endpoint_id("local"), function_id=str(uuid.uuid4()))
    assert info.value.http_status == 404
    with pytest.raises(globus_sdk.GlobusAPIError) as info:
        gcc.get_task(str(uuid.uuid4()))
    assert info.value.http_status == 404


def test_bad_token_is_401(stack):
    bad = make_client(stack, token="not-a-token")
    with pytest.raises(globus_sdk.GlobusAPIError) as info:
        bad.register_function(square)
    assert info.value.http_status == 401


def test_compat_one_liner(stack, monkeypatch):
    monkeypatch.setenv("DLHUB_HOME", str(stack.home))
    monkeypatch.delenv("DLHUB_TOKEN", raising=False)
    monkeypatch.delenv("DLHUB_GLOBUS_COMPUTE_URL", raising=False)
    gcc = compat_client()
    fid = gcc.register_function(square)
    tid = gcc.run(7, endpoint_id=endpoint_id("local"), function_id=fid)
    assert wait_result(gcc, tid) == 49


def test_amqp_url_without_broker_is_a_clear_503(gcc):
    with pytest.raises(globus_sdk.GlobusAPIError) as info:
        gcc.get_result_amqp_url()
    assert info.value.http_status == 503 and "AMQP not configured" in info.value.text


def test_endpoint_list_shows_the_uuid(stack, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "dlhub.endpoint.cli", "list", "--home", str(stack.home)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("local "))
    assert line.split()[-1] == endpoint_id("local") == str(uuid.uuid5(GC_NAMESPACE, "local"))


def test_the_endpoint_uuid_names_the_endpoint_wherever_a_name_does(stack, client, rest, name):
    """dlhub's Executor, the REST run route, `dlhub status` and the GC Client all take the UUID;
    a published servable is called from the GC Client by its own UUID."""
    import subprocess
    import sys

    from conftest import meta
    from servable_fns import OWNER, double

    from dlhub.compat.globus_compute import servable_id
    from dlhub.executor import Servable

    ep_uuid = endpoint_id("local")
    ex = stack.executor(endpoint=ep_uuid)
    assert ex.submit(pow, 2, 5).result(RESULT_TIMEOUT_S) == 32
    status = stack.cli("status", "--endpoint", ep_uuid)
    assert status.returncode == 0, status.stdout + status.stderr
    assert ep_uuid in status.stdout  # shown in the endpoint's block
    ep_cli = [sys.executable, "-m", "dlhub.endpoint.cli", "status", ep_uuid, "--home", str(stack.home)]
    ep_status = subprocess.run(ep_cli, capture_output=True, text=True, timeout=60, cwd=stack.home)
    assert ep_status.returncode == 0, ep_status.stdout + ep_status.stderr  # running
    as_json = json.loads(stack.cli("status", "--json").stdout)
    assert as_json["endpoints"]["local"]["uuid"] == ep_uuid

    ref = client.publish(Servable.from_function(double, **meta(name, examples=[((3,), 6)])))
    http, headers = rest
    run = http.post(
        f"/api/v1/servables/{OWNER}/{name}/run", json={"args": [21], "endpoint": ep_uuid}, headers=headers
    )
    assert run.status_code == 200 and run.json()["result"] == 42, run.text
    unknown = http.post(
        f"/api/v1/servables/{OWNER}/{name}/run",
        json={"args": [1], "endpoint": str(uuid.uuid4())},
        headers=headers,
    )
    assert unknown.status_code == 404, unknown.text

    shell = stack.cli("run", f"{OWNER}/{name}", "21", "--endpoint", ep_uuid)
    assert shell.returncode == 0 and shell.stdout.strip() == "42", shell.stdout + shell.stderr

    gcc = make_client(stack)
    tid = gcc.run(21, endpoint_id=ep_uuid, function_id=servable_id(ref))
    assert wait_result(gcc, tid) == 42
