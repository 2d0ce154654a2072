"""A whole manager on PostgreSQL: ``dlhub-manager serve --db-url postgresql+psycopg://...`` as a
process, with an endpoint (``dlhub-endpoint start``) and real clients. Tasks run, a servable is
published (verified on the endpoint) and run by name, the manager is restarted on the same ports
and database, and the earlier results are fetched from it.

The database is a fresh one per test on the PostgreSQL that scripts/postgres-localhost.sh runs
(``DLHUB_TEST_PG_URL``, as for the ``[postgresql]`` variants of the store tests); it is created
through the admin connection and dropped afterwards. The test fails, never skips, when that
PostgreSQL is not reachable.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml
from conftest import _session_members, fresh_pg_database, kill_pids, meta, read_json, wait_until

from dlhub.executor import Client, Executor, Servable

RESULT_TIMEOUT_S = 60
BIN = Path(sys.executable).parent


def square(x):
    return x * x


def add_one(x):
    return x + 1


@pytest.fixture
def pg_database() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database of this test's own; dropped afterwards."""
    with fresh_pg_database("t_mgr_") as url:
        yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(name: str) -> list[str]:
    """A console script next to this interpreter (what a user runs), else ``python -m``."""
    script = BIN / name
    module = {"dlhub-manager": "dlhub.manager.cli", "dlhub-endpoint": "dlhub.endpoint.cli"}[name]
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


class ServedManager:
    """``dlhub-manager serve`` on fixed ports (so a restart keeps its addresses)."""

    def __init__(self, home: Path, db_url: str):
        self.home, self.db_url = home / "manager", db_url
        self.ports = {flag: free_port() for flag in ("--client-port", "--endpoint-port", "--rest-port")}
        self.proc: subprocess.Popen | None = None

    def start(self) -> dict:
        cmd = [*cli("dlhub-manager"), "serve", "--home", str(self.home), "--db-url", self.db_url]
        for flag, port in self.ports.items():
            cmd += [flag, str(port)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.home.parent,
        )

        def ready() -> dict | None:
            if self.proc.poll() is not None:
                log = self.home / "manager.log"
                raise AssertionError(
                    f"dlhub-manager serve exited ({self.proc.returncode}):\n"
                    f"{log.read_text()[-3000:] if log.exists() else '(no manager.log)'}"
                )
            info = read_json(self.home / "manager.json")
            return info if info.get("pid") == self.proc.pid else None

        return wait_until(ready, 60, 0.05, what="dlhub-manager serve to write manager.json")

    def stop(self) -> None:
        """SIGTERM (the manager stops cleanly), then make sure it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                kill_pids([self.proc.pid])
                self.proc.wait(10)

    @property
    def token(self) -> str:
        return (self.home / "admin.token").read_text().strip()


def start_endpoint(home: Path, manager: ServedManager, info: dict) -> subprocess.Popen:
    run_dir = home / "endpoints" / "pg-ep"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "name": "pg-ep",
        "manager": {"address": info["endpoint_url"], "token": manager.token},
        "pool": {"workers_per_node": 2},
        "heartbeat_s": 0.5,
        "heartbeat_threshold_s": 5.0,
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [*cli("dlhub-endpoint"), "start", "pg-ep", "--home", str(home)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=home,
    )

    def up() -> bool:
        if proc.poll() is not None:
            log = run_dir / "endpoint.log"
            raise AssertionError(f"endpoint exited:\n{log.read_text()[-3000:] if log.exists() else ''}")
        return read_json(run_dir / "status.json").get("workers", 0) >= 2

    wait_until(up, 60, 0.05, what="the endpoint's 2 workers")
    return proc


def stop_endpoint(proc: subprocess.Popen) -> None:
    members = _session_members(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    kill_pids(members + _session_members(proc.pid))


def endpoint_connected(info: dict, token: str) -> bool:
    """The manager's view (REST metrics): is ``pg-ep`` connected?"""
    try:
        r = httpx.get(
            f"{info['rest_url']}/api/v1/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and bool((r.json().get("endpoints", {}).get("pg-ep") or {}).get("connected"))


def pg_rows(db_url: str, sql: str) -> list:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.exec_driver_sql(sql).all())
    finally:
        engine.dispose()


def test_a_manager_on_postgresql_runs_publishes_restarts_and_returns_results(tmp_path, pg_database):
    home = tmp_path / "home"
    home.mkdir()
    manager = ServedManager(home, pg_database)
    endpoint = None
    executors: list[Executor] = []

    def executor() -> Executor:
        ex = Executor(
            endpoint="pg-ep", manager=info["client_url"], token=manager.token, home=str(tmp_path / "client")
        )
        executors.append(ex)
        return ex

    try:
        info = manager.start()
        endpoint = start_endpoint(home, manager, info)

        # tasks by value
        ex = executor()
        futures = [ex.submit(square, i) for i in range(20)]
        assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [i * i for i in range(20)]

        # publish (verified on the endpoint) and run by name
        name = f"pg-add-one-{uuid.uuid4().hex[:6]}"
        with Client(info["rest_url"], manager.token, home=str(tmp_path / "client")) as client:
            ref = client.publish(
                Servable.from_function(add_one, **meta(name, examples=[((1,), 2)])),
                timeout_s=RESULT_TIMEOUT_S,
            )
        assert ref == f"admin/{name}:1"
        by_name = ex.submit(f"admin/{name}", 41)
        assert by_name.result(RESULT_TIMEOUT_S) == 42

        # it all lives in PostgreSQL, none of it in a SQLite file under the home
        # (results go out before their rows' group commit: the last rows land within its window)
        ids = [f.task_id for f in futures] + [by_name.task_id]

        def stored() -> dict[str, str]:
            rows = pg_rows(pg_database, "SELECT encode(task_id, 'hex'), state FROM tasks")
            return {t: s for t, s in rows if t in ids}

        succeeded = dict.fromkeys(ids, "succeeded")
        with contextlib.suppress(AssertionError):  # the assert below says what the rows read
            wait_until(lambda: stored() == succeeded, 10, 0.05, what="the tasks' rows")
        assert stored() == succeeded, stored()
        versions = pg_rows(
            pg_database, f"SELECT owner, version, status FROM servable_versions WHERE name = '{name}'"
        )
        assert versions == [("admin", 1, "ready")], versions
        assert not list(manager.home.glob("*.db")), sorted(p.name for p in manager.home.iterdir())

        # restart the manager on the same database and ports
        for e in executors:
            e.shutdown(wait=False)
        executors.clear()
        manager.stop()
        assert manager.proc.returncode == 0, manager.proc.returncode
        again = manager.start()
        assert again["client_url"] == info["client_url"] and again["pid"] != info.get("pid")

        # a new client fetches the earlier results from it; the endpoint is back and runs more
        wait_until(
            lambda: endpoint_connected(again, manager.token), 30, 0.1, what="the endpoint to reconnect"
        )
        later = executor()
        fetched = later.fetch(ids)
        assert [f.result(RESULT_TIMEOUT_S) for f in fetched] == [i * i for i in range(20)] + [42]
        assert later.submit(square, 12).result(RESULT_TIMEOUT_S) == 144
        assert later.submit(f"admin/{name}", 1).result(RESULT_TIMEOUT_S) == 2  # the servable survived
        with Client(info["rest_url"], manager.token, home=str(tmp_path / "client")) as client:
            described = client.describe(f"admin/{name}")
        assert (described["record"]["version"], described["status"]) == (1, "ready"), described
    finally:
        for e in executors:
            e.shutdown(wait=False)
        if endpoint is not None:
            stop_endpoint(endpoint)
        manager.stop()
        if manager.proc is not None:
            kill_pids([manager.proc.pid, *_session_members(manager.proc.pid)])
