"""Durability: SIGKILL the manager with tasks outstanding, restart it on the same ports, and every
future still resolves exactly once with the right result (clients resend what was not
acknowledged and fetch results; the endpoint registers again and re-sends its results)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections import Counter
from urllib.parse import urlparse

import psutil
import pytest
from conftest import kill_pids, read_json, wait_until

RESULT_TIMEOUT_S = 60


def gated_double(value, release: str, log: str, limit_s: float = 60.0):
    """Record that it ran, wait for ``release`` (bounded), return ``2 * value``."""
    import os
    import time

    with open(log, "a") as f:
        f.write(f"{value}\n")
    deadline = time.monotonic() + limit_s
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)
    return 2 * value


def quick_double(value, log: str):
    with open(log, "a") as f:
        f.write(f"{value}\n")
    return 2 * value


def port_of(url: str) -> int:
    return urlparse(url).port


def serve_manager(home, client_port: int, endpoint_port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dlhub.manager.cli",
            "serve",
            "--home",
            str(home / "manager"),
            "--client-port",
            str(client_port),
            "--endpoint-port",
            str(endpoint_port),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def count_resolutions(futures) -> Counter:
    counts: Counter = Counter()
    lock = threading.Lock()

    def seen(f):
        with lock:
            counts[f.task_id] += 1

    for f in futures:
        f.add_done_callback(seen)
    return counts


def test_manager_killed_and_restarted_every_future_resolves_once(stack_factory, tmp_path):
    stack = stack_factory()
    home = stack.home
    info = stack.manager_info
    old_pid = info["pid"]
    client_port, endpoint_port = port_of(info["client_url"]), port_of(info["endpoint_url"])
    ex = stack.executor(connect_timeout_s=10)
    release = tmp_path / "release"
    log = tmp_path / "ran.log"
    log.touch()

    # finished before the crash
    early = [ex.submit(quick_double, v, str(log)) for v in range(5)]
    assert [f.result(RESULT_TIMEOUT_S) for f in early] == [0, 2, 4, 6, 8]
    # outstanding at the crash: two running, the rest queued at the endpoint
    held = [ex.submit(gated_double, v, str(release), str(log)) for v in range(100, 108)]
    wait_until(lambda: len(log.read_text().split()) >= 7, RESULT_TIMEOUT_S, what="two tasks running")
    wait_until(
        lambda: ex.task_info(held[-1])["state"] in ("dispatched", "running"),
        10,
        what="the last task to reach the endpoint",
    )

    new_manager = None
    try:
        os.kill(old_pid, signal.SIGKILL)
        wait_until(lambda: not _alive(old_pid), 10, what="the manager to die")
        # submitted while the manager is down
        during = [ex.submit(quick_double, v, str(log)) for v in range(200, 203)]
        everything = early + held + during
        counts = count_resolutions(everything)

        new_manager = serve_manager(home, client_port, endpoint_port)
        wait_until(
            lambda: (
                read_json(home / "manager" / "manager.json").get("pid") == new_manager.pid
                or new_manager.poll() is not None
            ),
            30,
            what="the new manager",
        )
        assert new_manager.poll() is None, "the restarted manager exited"
        new_info = read_json(home / "manager" / "manager.json")
        assert (port_of(new_info["client_url"]), port_of(new_info["endpoint_url"])) == (
            client_port,
            endpoint_port,
        )

        release.touch()
        done, not_done = cf.wait(held + during, RESULT_TIMEOUT_S)
        assert not not_done, f"{len(not_done)} futures never resolved"
        assert [f.result() for f in held] == [2 * v for v in range(100, 108)]
        assert [f.result() for f in during] == [400, 402, 404]
        # each future resolved exactly once
        assert all(counts[f.task_id] == 1 for f in everything), counts
        # and each task ran exactly once (task ids de-duplicate resends)
        ran = Counter(int(v) for v in log.read_text().split())
        assert ran == Counter(list(range(5)) + list(range(100, 108)) + list(range(200, 203)))
        # the new manager's database holds one finished row per task
        wait_until(
            lambda: _states(home, everything) == {f.task_id: "succeeded" for f in everything},
            15,
            what="every task committed as succeeded",
        )
        # the endpoint registered again: new work flows
        assert ex.submit(quick_double, 7, str(log)).result(RESULT_TIMEOUT_S) == 14
    finally:
        release.touch()
        if new_manager is not None:
            kill_pids([new_manager.pid])  # (also stopped by the stack's `dlhub down`)
            new_manager.wait(10)


def test_result_fetched_by_a_later_client(stack, tmp_path):
    release = tmp_path / "release"
    log = tmp_path / "ran.log"
    first = stack.executor()
    fut = first.submit(gated_double, 21, str(release), str(log))
    wait_until(
        lambda: log.exists() and log.read_text().strip() == "21", RESULT_TIMEOUT_S, what="the task to start"
    )
    task_id = fut.task_id
    first.shutdown(wait=False)  # the submitting client goes away
    release.touch()
    later = stack.executor()
    (again,) = later.fetch([task_id])
    assert again.task_id == task_id
    assert again.result(RESULT_TIMEOUT_S) == 42
    # an id the manager never saw fails rather than hanging
    from dlhub.protocol import TaskLost

    (unknown,) = later.fetch([uuid.uuid4().hex])
    with pytest.raises(TaskLost):
        unknown.result(RESULT_TIMEOUT_S)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _states(home, futures) -> dict[str, str]:
    con = sqlite3.connect(home / "manager" / "dlhub.db", timeout=5)
    try:
        ids = [bytes.fromhex(f.task_id) for f in futures]
        rows = con.execute(
            f"SELECT task_id, state FROM tasks WHERE task_id IN ({','.join('?' * len(ids))})", ids
        ).fetchall()
    finally:
        con.close()
    return {bytes(t).hex(): s for t, s in rows}
