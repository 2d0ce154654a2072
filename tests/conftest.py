"""Shared fixtures: real dlhub stacks on 127.0.0.1 with ephemeral ports, always torn down.

- ``wait_until(pred, timeout)`` (import it from conftest): the bounded poll loop the suite waits
  with, never a bare sleep.
- ``stack``: a session-wide ``dlhub up --workers 2`` (manager + ``local`` endpoint as processes),
  for tests that do not disturb each other.
- ``stack_factory``: start an extra, private stack (for tests that stop it or need fresh workers).
- ``custom_stack_factory``: an in-process :class:`dlhub.manager.Manager` plus an endpoint subprocess
  started from a config.yaml written here (for settings ``dlhub up`` does not expose).

Every process a stack starts lives in the endpoint's session (``dlhub up --detach`` starts it
with ``start_new_session``; pools and workers inherit it) or is the manager: teardown runs
``dlhub down`` and then kills whatever of those is left, by pid.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

CLI_TIMEOUT_S = 90


# ---- the checkout stays clean: tests and the jobs they start write under tmp dirs only ----------

REPO_ROOT = Path(__file__).resolve().parents[1]
_NEVER_CHECKED = (".venv/", ".pytest_cache/")  # the venv and pytest's cache (also in .gitignore)
# ignored, yet still caught: the scheduler output a job run from the checkout leaves there
_JOB_OUTPUT = ("parsl.*.submit*", "*.submit.[eo][0-9]*")


def _untracked_files() -> set[str] | None:
    """Untracked files in the checkout (not ignored ones, except Slurm/Parsl job output); None
    when it is not a git checkout."""
    try:
        proc = subprocess.run(
            [
                "git",
                "-C",
                str(REPO_ROOT),
                "status",
                "--porcelain",
                "--untracked-files=all",
                "--ignored",
                "-z",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    found = set()
    for entry in proc.stdout.split("\0"):
        path = entry[3:]
        if path.startswith(_NEVER_CHECKED):
            continue
        if entry.startswith("?? ") or (
            entry.startswith("!! ") and any(fnmatch.fnmatch(Path(path).name, p) for p in _JOB_OUTPUT)
        ):
            found.add(path)
    return found


@pytest.fixture(scope="session", autouse=True)
def checkout_gains_no_files() -> Iterator[None]:
    """Fail the run when the tests leave new untracked files in the checkout (a Slurm job or a
    subprocess that ran with the checkout as its working directory, like the Slurm job output
    files once committed by accident): processes started by tests must run in a tmp dir."""
    before = _untracked_files()
    yield
    if before is None:
        return
    new = sorted((_untracked_files() or set()) - before)
    if new:
        pytest.fail(
            f"the tests left {len(new)} new untracked file(s) in the checkout {REPO_ROOT}: "
            f"{', '.join(new[:20])}{' ...' if len(new) > 20 else ''}; start processes and jobs with a "
            "tmp dir as their cwd (e.g. cwd=tmp_path)",
            pytrace=False,
        )


# ---- the shared RabbitMQ gains no users or queues: what the run's managers created is deleted --


def _rabbit_api(method: str, path: str) -> Any:
    """One call to the management API of the broker scripts/rabbitmq-localhost.sh runs, or None
    when it is not there (most runs on a laptop)."""
    import base64
    import urllib.error
    import urllib.request

    port = os.environ.get("RMQ_MGMT_PORT", "15672")
    user = os.environ.get("RMQ_ADMIN_USER", "dlhub-admin")
    auth = f"{user}:{os.environ.get('RMQ_ADMIN_PASSWORD', 'dlhub-admin')}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/{path}", method=method)
    req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read()
    except (OSError, urllib.error.HTTPError):
        return None
    return json.loads(body) if body else {}


def _rabbit_names() -> tuple[set[str], set[str]] | None:
    users, queues = _rabbit_api("GET", "users"), _rabbit_api("GET", "queues/%2F?columns=name")
    if users is None or queues is None:
        return None
    return (
        {u["name"] for u in users if u["name"].startswith("dlhub-gc-")},
        {q["name"] for q in queues if q["name"].startswith("dlhub.gc.")},
    )


@pytest.fixture(scope="session", autouse=True)
def rabbitmq_gains_no_users() -> Iterator[None]:
    """The Globus Compute tests' managers create a RabbitMQ user per dlhub user (random names,
    so runs do not collide) and a queue per task group; a long-lived broker would keep them all.
    Delete, after the run, the ones that were not there before it."""
    import urllib.parse

    before = _rabbit_names()
    yield
    after = _rabbit_names()
    if before is None or after is None:
        return
    left = [
        name
        for kind, names in (("users", after[0] - before[0]), ("queues/%2F", after[1] - before[1]))
        for name in sorted(names)
        if _rabbit_api("DELETE", f"{kind}/{urllib.parse.quote(name, safe='')}") is None
    ]
    if left:  # not a test failure (the broker is shared), but not silent either
        what = f"{len(left)} RabbitMQ users/queues the tests created: {left[:5]}"
        warnings.warn(f"could not delete {what}", stacklevel=2)


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``pred`` until it returns something truthy (returned) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or pred}")
        time.sleep(interval)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def dlhub_cli(
    *args: str, timeout: float = CLI_TIMEOUT_S, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlhub.executor.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _session_members(sid: int) -> list[int]:
    out = []
    for pid in psutil.pids():
        if pid == os.getpid():
            continue
        try:
            if os.getsid(pid) == sid:
                out.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# podman as ../shared/recipes/containers.md tested it here: a private store, runc (crun refuses
# this hybrid cgroup setup), ulimits this sandbox allows, events to a file
_PODMAN_CONF = """[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
tmp_dir = "{p}/tmp"
events_logger = "file"
[network]
network_config_dir = "{p}/networks"
"""
_PODMAN_STORAGE = """[storage]
driver = "overlay"
graphroot = "{p}/root"
runroot = "{p}/run"
"""


def podman_store(folder: Path) -> dict[str, str]:
    """A private podman store under ``folder``; the environment variables that select it."""
    for d in ("root", "run", "tmp"):
        (folder / d).mkdir(parents=True, exist_ok=True)
    (folder / "containers.conf").write_text(_PODMAN_CONF.format(p=folder))
    (folder / "storage.conf").write_text(_PODMAN_STORAGE.format(p=folder))
    return {
        "CONTAINERS_CONF": str(folder / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(folder / "storage.conf"),
    }


def pool_pids(endpoint_dir: Path | str) -> list[int]:
    """An endpoint's pool processes. LocalProvider starts each block in a session of its own, so
    they are found by the endpoint's folder on their command line (the pool config path), not
    as the endpoint's children."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or ())
        if "dlhub.endpoint.pool" in cmdline and str(endpoint_dir) in cmdline:
            out.append(p.pid)
    return out


def kill_pids(pids: list[int], timeout: float = 10.0) -> None:
    """SIGKILL what is still alive among ``pids`` and wait (bounded) for it to go."""
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for pid in pids:
        try:
            psutil.Process(pid).wait(timeout)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
            pass


@dataclass
class Stack:
    """A running manager + ``local`` endpoint under ``home`` started by ``dlhub up``."""

    home: Path
    executors: list = field(default_factory=list)

    @property
    def manager_info(self) -> dict:
        return read_json(self.home / "manager" / "manager.json")

    @property
    def endpoint_dir(self) -> Path:
        return self.home / "endpoints" / "local"

    def endpoint_pid(self) -> int | None:
        try:
            return int((self.endpoint_dir / "endpoint.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def executor(self, endpoint: str = "local", **kwargs: Any):
        from dlhub.executor import Executor

        kwargs.setdefault("home", str(self.home))
        ex = Executor(endpoint=endpoint, **kwargs)
        self.executors.append(ex)
        return ex

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        return dlhub_cli(*args, "--home", str(self.home), timeout=timeout)

    def close_executors(self) -> None:
        for ex in self.executors:
            try:
                ex.shutdown(wait=False, cancel_futures=False)
            except Exception:
                pass
        self.executors.clear()


def start_stack(home: Path, workers: int = 2, examples: bool = False, up_args: tuple[str, ...] = ()) -> Stack:
    flag = "--examples" if examples else "--no-examples"
    proc = dlhub_cli("up", "--home", str(home), "--workers", str(workers), "--detach", flag, *up_args)
    stack = Stack(home)
    if proc.returncode != 0:
        stop_stack(stack)
        raise RuntimeError(f"dlhub up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    # `dlhub up` returns once one worker has registered; tests that count on all of them wait
    try:
        wait_until(
            lambda: read_json(stack.endpoint_dir / "status.json").get("workers", 0) >= workers,
            60,
            what=f"{workers} workers to register",
        )
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def stop_stack(stack: Stack) -> None:
    """``dlhub down``, then kill anything of this stack that is left."""
    stack.close_executors()
    ep_pid = stack.endpoint_pid()
    sid = None
    if ep_pid is not None:
        try:
            sid = os.getsid(ep_pid)
        except ProcessLookupError:
            sid = None
    pids = [p for p in [stack.manager_info.get("pid"), ep_pid] if p]
    if sid is not None:
        pids += _session_members(sid)
    try:
        dlhub_cli("down", "--home", str(stack.home), timeout=60)
    except subprocess.TimeoutExpired:
        pass
    if sid is not None:
        pids += _session_members(sid)
    kill_pids(sorted(set(pids)))


@pytest.fixture(scope="session")
def stack_factory(tmp_path_factory) -> Iterator[Callable[..., Stack]]:
    """Start private stacks; each is stopped at the end of the session unless stopped before."""
    started: list[Stack] = []

    def make(workers: int = 2, examples: bool = False) -> Stack:
        s = start_stack(tmp_path_factory.mktemp("dlhub-home"), workers, examples)
        started.append(s)
        return s

    try:
        yield make
    finally:
        for s in started:
            stop_stack(s)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """One ``dlhub up --workers 2`` for the whole session."""
    s = start_stack(tmp_path_factory.mktemp("dlhub-session"))
    try:
        yield s
    finally:
        stop_stack(s)


# ---- an in-process manager plus an endpoint subprocess with a custom config -------------------


@dataclass
class CustomStack:
    manager: Any
    home: Path
    token: str
    endpoint_proc: subprocess.Popen | None = None
    endpoint_name: str = "custom"
    executors: list = field(default_factory=list)

    @property
    def endpoint_dir(self) -> Path:
        return self.home / "endpoints" / self.endpoint_name

    def status(self) -> dict:
        return read_json(self.endpoint_dir / "status.json")

    def executor(self, **kwargs: Any):
        from dlhub.executor import Executor

        kwargs.setdefault("manager", self.manager.client_url)
        kwargs.setdefault("token", self.token)
        kwargs.setdefault("home", str(self.home))
        ex = Executor(endpoint=self.endpoint_name, **kwargs)
        self.executors.append(ex)
        return ex


def start_custom_stack(
    home: Path,
    manager_kwargs: dict | None = None,
    endpoint: dict | None = None,
    name: str = "custom",
    workers: int = 1,
) -> CustomStack:
    from dlhub.manager import Manager, ManagerConfig

    mgr_home = home / "manager"
    mgr = Manager(ManagerConfig(home=mgr_home, **(manager_kwargs or {})))
    mgr.start_thread()
    token = (mgr_home / "admin.token").read_text().strip()
    cs = CustomStack(mgr, home, token, endpoint_name=name)
    config = {
        "name": name,
        "manager": {"address": mgr.endpoint_url, "token": token},
        "pool": {"workers_per_node": workers},
        **(endpoint or {}),
    }
    cs.endpoint_dir.mkdir(parents=True, exist_ok=True)
    (cs.endpoint_dir / "config.yaml").write_text(yaml.safe_dump(config))
    cs.endpoint_proc = subprocess.Popen(
        [sys.executable, "-m", "dlhub.endpoint.cli", "start", name, "--home", str(home)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its pools and workers share this session: easy to clean up
        cwd=home,  # schedulers' stray output files (qsub writes *.o/*.e to the cwd) land here
    )
    try:
        wait_until(
            lambda: cs.status().get("workers", 0) >= workers or cs.endpoint_proc.poll() is not None,
            60,
            what="the custom endpoint's workers",
        )
        if cs.endpoint_proc.poll() is not None:
            log = cs.endpoint_dir / "endpoint.log"
            raise RuntimeError(f"endpoint exited: {log.read_text()[-3000:] if log.exists() else ''}")
    except BaseException:
        stop_custom_stack(cs)
        raise
    return cs


def stop_custom_stack(cs: CustomStack) -> None:
    for ex in cs.executors:
        try:
            ex.shutdown(wait=False)
        except Exception:
            pass
    proc = cs.endpoint_proc
    if proc is not None:
        members = _session_members(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        kill_pids(members + _session_members(proc.pid))
    cs.manager.stop()


@pytest.fixture
def custom_stack_factory(tmp_path_factory) -> Iterator[Callable[..., CustomStack]]:
    started: list[CustomStack] = []

    def make(**kwargs: Any) -> CustomStack:
        cs = start_custom_stack(tmp_path_factory.mktemp("dlhub-custom"), **kwargs)
        started.append(cs)
        return cs

    try:
        yield make
    finally:
        for cs in started:
            stop_custom_stack(cs)


# ---- databases: every store/repository test runs on SQLite and on a real PostgreSQL -------------

PG_URL = os.environ.get("DLHUB_TEST_PG_URL", "postgresql+psycopg://dlhub:dlhub@127.0.0.1:5432/dlhub_test")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new database on the PostgreSQL that
    scripts/postgres-localhost.sh runs (fails, not skips, when it is not reachable)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'dlhub.db'}"
        return
    with fresh_pg_database("t_") as url:
        yield url


@contextlib.contextmanager
def fresh_pg_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty database on the test PostgreSQL, dropped afterwards (fails, not
    skips, when the server is not reachable)."""
    import uuid

    import sqlalchemy as sa

    name = prefix + uuid.uuid4().hex[:16]
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_URL} ({exc}); run scripts/postgres-localhost.sh "
            "(scripts/test.sh does, and sets DLHUB_TEST_PG_URL)",
            pytrace=False,
        )
    try:
        yield sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_pg_database(admin, name)
        admin.dispose()


def _drop_pg_database(admin: Any, name: str) -> None:
    """DROP ... WITH (FORCE), tried again for a few seconds: an autovacuum worker in the new
    database makes it fail for a role without pg_signal_backend (a server set up before
    scripts/postgres-localhost.sh granted it), and such a worker ends on its own."""
    import sqlalchemy as sa

    deadline = time.monotonic() + 10
    while True:
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except (sa.exc.OperationalError, sa.exc.ProgrammingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# ---- servables on the session stack: clients, unique names, metadata ----------------------------

RESULT_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def client(stack):
    """A repository Client on the session stack."""
    from dlhub.executor import Client

    with Client(home=str(stack.home)) as c:
        yield c


@pytest.fixture(scope="module")
def ex(stack):
    """An Executor on the session stack's ``local`` endpoint."""
    executor = stack.executor()
    try:
        yield executor
    finally:
        executor.shutdown(wait=False)


@pytest.fixture(scope="module")
def rest(stack):
    """(an httpx client on the REST API, auth headers), from the config `dlhub up` wrote."""
    import httpx

    config = json.loads((stack.home / "config.json").read_text())
    with httpx.Client(base_url=config["rest_url"], timeout=RESULT_TIMEOUT_S) as http:
        yield http, {"Authorization": f"Bearer {config['token']}"}


@pytest.fixture
def name(request) -> str:
    """A servable name of this test's own (the stack is shared by the session)."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    return f"{base[:60]}-{uuid.uuid4().hex[:6]}"


def meta(name: str, **overrides: Any) -> dict[str, Any]:
    """Builder metadata for a test servable."""
    fields = {
        "name": name,
        "title": f"Test servable {name}",
        "authors": ["Doe, Jane"],
        "domains": ["testing"],
    }
    return {**fields, **overrides}


def task_row(n: int, payload: bytes | memoryview | None = b"x", t_received: float = 1.0) -> dict:
    """A ``tasks`` row for TaskStore tests: task ``n`` (its id ``n`` as 16 big-endian bytes),
    alice's, dispatched to ``ep``."""
    return {
        "task_id": n.to_bytes(16, "big"),
        "owner": "alice",
        "client_session": "s",
        "endpoint": "ep",
        "function": "sha256:f",
        "state": "dispatched",
        "result_serializer": "auto",
        "t_received": t_received,
        "payload": payload,
    }
