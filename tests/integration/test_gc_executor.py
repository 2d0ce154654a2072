"""The unmodified ``globus_compute_sdk.Executor`` against ``dlhub up --amqp`` and the real RabbitMQ
that scripts/rabbitmq-localhost.sh runs (issue 13, item 4): submit, many submits, a raising
function, reload_tasks, results published only once committed, and a manager killed and restarted
while tasks run (nothing lost, no future resolved twice). Fails, not skips, when the broker is
down and DLHUB_REQUIRE_AMQP=1 (CI)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import threading
import time
import uuid
from collections import Counter

import pytest

pytest.importorskip("pika")
pytest.importorskip("globus_compute_sdk")

from conftest import Stack, dlhub_cli, read_json, stop_stack, wait_until  # noqa: E402
from globus_compute_sdk import Executor  # noqa: E402
from globus_compute_sdk.errors import TaskExecutionFailed  # noqa: E402

from dlhub.compat.globus_compute import client, endpoint_id  # noqa: E402

PORT = int(os.environ.get("RMQ_PORT", "5672"))
MGMT_PORT = int(os.environ.get("RMQ_MGMT_PORT", "15672"))
REQUIRE = os.environ.get("DLHUB_REQUIRE_AMQP") == "1"
RESULT_TIMEOUT_S = 60

# defined as a script's functions are (module __main__): dill sends them by value
_SOURCE = """
import time


def square(x):
    return x * x


def slow_square(x, delay=1.0):
    time.sleep(delay)
    return x * x


def fails(x):
    raise ValueError(f"no good: {x}")
"""
_NS: dict = {"__name__": "__main__"}
exec(_SOURCE, _NS)
square, slow_square, fails = _NS["square"], _NS["slow_square"], _NS["fails"]


def _broker_up() -> bool:
    for port in (PORT, MGMT_PORT):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def amqp_stack(tmp_path_factory):
    if not _broker_up():
        message = f"RabbitMQ is not reachable on 127.0.0.1:{PORT}/{MGMT_PORT}"
        message += "; run scripts/rabbitmq-localhost.sh"
        if REQUIRE:
            pytest.fail(f"{message} (DLHUB_REQUIRE_AMQP=1: the broker is required)", pytrace=False)
        pytest.skip(message)
    home = tmp_path_factory.mktemp("dlhub-amqp")
    stack = Stack(home)
    proc = dlhub_cli("up", "--home", str(home), "--workers", "2", "--detach", "--no-examples", "--amqp")
    if proc.returncode != 0:
        stop_stack(stack)
        pytest.fail(f"dlhub up --amqp failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    assert "AMQP broker: 127.0.0.1" in proc.stdout
    assert read_json(home / "manager" / "globus_compute.json").get("amqp") is True
    wait_until(lambda: read_json(stack.endpoint_dir / "status.json").get("workers", 0) >= 2, 60)
    yield stack
    stop_stack(stack)
    assert not (home / "manager" / "globus_compute.json").exists()  # `dlhub down` removed it
    assert (home / "manager" / "amqp.clean").exists()  # a clean stop: every result was confirmed


def executor(stack: Stack, **kwargs) -> Executor:
    return Executor(endpoint_id=endpoint_id("local"), client=client(home=stack.home), **kwargs)


def test_submit_many_and_a_raising_function(amqp_stack):
    with executor(amqp_stack) as ex:
        assert ex.submit(square, 7).result(timeout=RESULT_TIMEOUT_S) == 49
        futures = [ex.submit(square, i) for i in range(50)]
        assert [f.result(timeout=RESULT_TIMEOUT_S) for f in futures] == [i * i for i in range(50)]
        with pytest.raises(TaskExecutionFailed) as info:
            ex.submit(fails, 3).result(timeout=RESULT_TIMEOUT_S)
        assert "ValueError: no good: 3" in str(info.value)
        with pytest.raises(NotImplementedError):  # the SDK's own Executor.map always raises this
            ex.map(square, range(3))


def test_each_result_is_published_only_after_it_is_committed(amqp_stack):
    """When the Executor's future resolves (its AMQP message arrived), the task's row in the
    manager's database, read by another connection, is already terminal."""
    states: list[str] = []
    lock = threading.Lock()

    def read_state(fut) -> None:
        row = db.execute("SELECT state FROM tasks WHERE task_id = ?", (uuid.UUID(fut.task_id).bytes,))
        with lock:
            states.append((row.fetchone() or ["missing"])[0])

    db = sqlite3.connect(
        f"file:{amqp_stack.home / 'manager' / 'dlhub.db'}?mode=ro", uri=True, check_same_thread=False
    )
    with executor(amqp_stack) as ex:
        futures = [ex.submit(square, i) for i in range(30)]
        for f in futures:
            f.add_done_callback(read_state)
        assert [f.result(timeout=RESULT_TIMEOUT_S) for f in futures] == [i * i for i in range(30)]
    wait_until(lambda: len(states) == 30, 10)
    assert Counter(states) == {"succeeded": 30}


def test_reload_tasks_reattaches_to_a_task_group(amqp_stack):
    gcc = client(home=amqp_stack.home)
    group = str(uuid.uuid4())
    with Executor(endpoint_id=endpoint_id("local"), client=gcc, task_group_id=group) as ex:
        futures = [ex.submit(square, i) for i in range(5)]
        assert [f.result(timeout=RESULT_TIMEOUT_S) for f in futures] == [i * i for i in range(5)]
        ids = {f.task_id for f in futures}
    with Executor(endpoint_id=endpoint_id("local"), client=client(home=amqp_stack.home)) as again:
        reloaded = list(again.reload_tasks(group))
        assert {f.task_id for f in reloaded} == ids
        assert sorted(f.result(timeout=RESULT_TIMEOUT_S) for f in reloaded) == [i * i for i in range(5)]


def test_a_manager_killed_and_restarted_while_tasks_run(amqp_stack, caplog):
    """SIGKILL the manager while 8 one-second tasks run or wait on 2 workers, `dlhub up --amqp`
    again: every future resolves with its own result, each exactly once."""
    caplog.set_level("INFO", logger="globus_compute_sdk")
    home = amqp_stack.home
    resolved: Counter = Counter()
    with executor(amqp_stack) as ex:
        futures = [ex.submit(slow_square, i, 1.0) for i in range(8)]
        for f in futures:
            f.add_done_callback(lambda f: resolved.update([f.task_id]))
        wait_until(lambda: all(f.task_id for f in futures), 30, what="task ids from the submit")
        old = read_json(home / "manager" / "manager.json")["pid"]
        wait_until(lambda: resolved, 30, what="a first result")  # some done, the rest running/queued
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: not _alive(old), 10)
        proc = dlhub_cli("up", "--home", str(home), "--workers", "2", "--detach", "--no-examples", "--amqp")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "endpoint 'local' already running" in proc.stdout
        assert [f.result(timeout=RESULT_TIMEOUT_S) for f in futures] == [i * i for i in range(8)]
        time.sleep(1.0)  # a repeated message (published again after the crash) would arrive by now
    assert sorted(resolved.values()) == [1] * 8
    # the SDK logs this when a result comes for a future already resolved
    assert "Unable to set future state" not in caplog.text
    log = (home / "manager" / "manager.log").read_text()
    assert "GC/AMQP: " in log  # the restarted manager took the GC tasks back (watched or published again)
    assert read_json(home / "manager" / "manager.json")["pid"] != old


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
