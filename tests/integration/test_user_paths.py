"""What new users ran into: their own modules, files in the current directory, restarts, wrong
ports, a manager that goes away, an endpoint that is stopped."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import dlhub_cli, meta, read_json, stop_stack, wait_until

from dlhub.executor import Executor, ManagerUnreachable

HELPERS = """
import math

class Point:
    def __init__(self, x):
        self.x = x

def floor3(x):
    return math.floor(x * 3)

def make(x):
    return Point(x)

def double_x(p):
    return p.x * 2
"""


def test_functions_and_classes_from_the_users_own_module_run_remotely(stack, tmp_path, monkeypatch):
    (tmp_path / "my_helpers_mod.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(tmp_path))  # importable here, not on the workers
    helpers = importlib.import_module("my_helpers_mod")
    try:
        ex = stack.executor()
        assert ex.submit(helpers.floor3, 2.5).result(30) == 7  # uses the module's `import math`
        point = ex.submit(helpers.make, 3).result(30)
        assert isinstance(point, helpers.Point) and point.x == 3
        assert ex.submit(helpers.double_x, helpers.Point(4)).result(30) == 8
    finally:
        sys.modules.pop("my_helpers_mod", None)


def test_dlhub_up_never_imports_files_from_the_current_directory(tmp_path_factory):
    home = tmp_path_factory.mktemp("cwd-home")
    cwd = tmp_path_factory.mktemp("cwd-files")
    (cwd / "glob.py").write_text("raise SystemExit('the user glob.py was imported')\n")
    (cwd / "zmq.py").write_text("raise SystemExit('the user zmq.py was imported')\n")
    dlhub = Path(sys.executable).parent / "dlhub"  # the console script, as a user runs it
    proc = subprocess.run(
        [str(dlhub), "up", "--home", str(home), "--detach"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
    )
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert dlhub_cli("status", "--home", str(home)).returncode == 0
    finally:
        dlhub_cli("down", "--home", str(home))


def twice(x):
    return 2 * x


def test_dlhub_status_at_80_columns_names_every_endpoint_and_servable_in_full(stack_factory, name):
    from dlhub.executor import Client, Servable

    s = stack_factory()

    def ep_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dlhub.endpoint.cli", *args, "--home", str(s.home)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    # a second endpoint of the same manager, as `dlhub-endpoint configure` writes it
    assert ep_cli("configure", "second-endpoint", "--workers", "1").returncode == 0
    started = ep_cli("start", "second-endpoint", "--detach")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        with Client(home=str(s.home)) as client:
            ref = client.publish(Servable.from_function(twice, **meta(name, examples=[((2,), 4)])))
        assert len(ref) > 40  # longer than the old table let it be at 80 columns
        for endpoint in ("local", "second-endpoint"):
            assert s.executor(endpoint=endpoint).submit(ref, 21).result(60) == 42

        def both_report() -> bool:
            info = json.loads(s.cli("status", "--json").stdout)["endpoints"]
            return all(ref in (info[e]["info"].get("servables") or {}) for e in ("local", "second-endpoint"))

        wait_until(both_report, 30, what="both endpoints to report the servable")
        out = dlhub_cli("status", "--home", str(s.home), env={**os.environ, "COLUMNS": "80"}).stdout
        assert "…" not in out, out  # nothing cut
        for endpoint in ("local", "second-endpoint"):
            assert re.search(rf"^endpoint {endpoint}\s*$", out, re.M), out  # each block titled
            section = out.split(f"servables on endpoint {endpoint}", 1)[1]
            assert re.search(rf"^ *{re.escape(ref)}\b", section, re.M), out  # the full name
        assert re.search(r"^tasks +0 waiting at the manager, 0 sent to the endpoint", out, re.M), out
        assert re.search(r"^at endpoint +0 queued for a worker, 0 on workers \(running", out, re.M), out
        assert all(len(line.rstrip()) <= 80 for line in out.splitlines() if ref not in line), out
        # the endpoint's own status says why its manager address is not the one in config.json
        manager = read_json(s.home / "manager" / "manager.json")
        human = ep_cli("status", "second-endpoint").stdout
        assert f"manager:      {manager['endpoint_url']}\n" in human, human
        assert (
            f"the manager's port for endpoints; clients use its client port {manager['client_url']}" in human
        )
    finally:
        ep_cli("stop", "second-endpoint", "--now")


def test_a_restarted_manager_comes_back_on_its_ports_and_clients_carry_on(stack_factory):
    s = stack_factory()
    before = read_json(s.home / "manager" / "manager.json")
    ex = s.executor()
    assert ex.submit(pow, 2, 5).result(30) == 32
    assert s.cli("down").returncode == 0
    assert s.cli("up", "--detach").returncode == 0
    after = read_json(s.home / "manager" / "manager.json")
    assert (after["client_url"], after["endpoint_url"]) == (before["client_url"], before["endpoint_url"])
    assert ex.submit(pow, 3, 3).result(60) == 27  # the old client resynced by itself


def test_an_endpoint_on_the_client_port_is_refused_with_the_right_url(custom_stack_factory):
    cs = custom_stack_factory(name="right")
    wrong = cs.home / "endpoints" / "wrong"
    wrong.mkdir(parents=True)
    (wrong / "config.yaml").write_text(
        json.dumps({"name": "wrong", "manager": {"address": cs.manager.client_url, "token": cs.token}})
    )
    start = subprocess.run(
        [sys.executable, "-m", "dlhub.endpoint.cli", "start", "wrong", "--home", str(cs.home)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert start.returncode != 0
    assert "client port" in start.stderr and cs.manager.endpoint_url in start.stderr
    check = subprocess.run(
        [sys.executable, "-m", "dlhub.endpoint.cli", "check", "wrong", "--home", str(cs.home)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 1 and "FAIL manager" in check.stdout and "client port" in check.stdout


def test_futures_fail_when_the_manager_stays_silent(custom_stack_factory):
    cs = custom_stack_factory(name="silent")
    ex = cs.executor(manager_timeout_s=2)
    assert ex.submit(pow, 2, 2).result(30) == 4
    fut = ex.submit(time.sleep, 30)
    cs.manager.stop()  # the manager goes away for good
    t0 = time.monotonic()
    with pytest.raises(ManagerUnreachable, match="no answer from the manager"):
        fut.result(20)
    assert time.monotonic() - t0 < 15


def test_a_dead_or_malformed_manager_address_fails_at_once():
    t0 = time.monotonic()
    with pytest.raises(ManagerUnreachable, match="no dlhub manager listens"):
        Executor(endpoint="local", manager="tcp://127.0.0.1:1", token="x", connect_timeout_s=10)
    assert time.monotonic() - t0 < 5  # not the 10 s handshake timeout
    with pytest.raises(ValueError, match="must look like tcp://host:port"):
        Executor(endpoint="local", manager="localhost:1234", token="x")


def test_a_stopped_endpoint_is_disconnected_at_once_and_executors_warn(custom_stack_factory):
    cs = custom_stack_factory(name="stopping")
    subprocess.run(
        [sys.executable, "-m", "dlhub.endpoint.cli", "stop", "stopping", "--now", "--home", str(cs.home)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    wait_until(lambda: not cs.manager.router.endpoints["stopping"].connected, 5, what="the goodbye")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = cs.executor()
    assert any("is not connected to the manager now" in str(w.message) for w in caught)
    ex.shutdown(wait=False)


del stop_stack  # imported for symmetry with other modules; teardown is the fixtures' job
