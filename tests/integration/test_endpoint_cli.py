"""``dlhub-endpoint`` as users run it: configure, check, start/stop/restart, logs, list, status,
and an endpoint whose blocks cannot start. Real processes on 127.0.0.1 against an in-process
manager (or the session's ``dlhub up`` stack); every endpoint started here is killed, with its
session, at teardown."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import _session_members, kill_pids, read_json, wait_until

from dlhub.endpoint.config import load_config

CLI_TIMEOUT_S = 60
TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "configs"
TASK_TIMEOUT_S = 30


def ep_cli(home: Path, *args: str, timeout: float = CLI_TIMEOUT_S, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "dlhub.endpoint.cli", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- functions run by workers -------------------------------------------------------------------


def square(x):
    return x * x


def block_until(started: str, release: str, limit_s: float = 60.0):
    """Write this worker's pid to ``started``, then wait (bounded) for ``release`` to exist."""
    import os
    import time

    with open(started + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(started + ".tmp", started)
    deadline = time.monotonic() + limit_s
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)
    return os.getpid()


# ---- fixtures --------------------------------------------------------------------------------


class LocalManager:
    def __init__(self, home: Path):
        from dlhub.manager import Manager, ManagerConfig

        self.home = home
        self.manager = Manager(ManagerConfig(home=home / "manager"))
        self.manager.start_thread()
        self.token = (home / "manager" / "admin.token").read_text().strip()

    @property
    def endpoint_url(self) -> str:
        return self.manager.endpoint_url

    @property
    def client_url(self) -> str:
        return self.manager.client_url


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    mgr = LocalManager(tmp_path_factory.mktemp("ep-cli-manager"))
    try:
        yield mgr
    finally:
        mgr.manager.stop()


class Endpoints:
    """Endpoint homes made by a test, and teardown for whatever runs in them."""

    def __init__(self, tmp_path_factory, manager: LocalManager):
        self.tmp_path_factory, self.manager = tmp_path_factory, manager
        self.seen_pids: set[int] = set()
        self.dirs: list[Path] = []
        self.executors: list = []

    def write(self, name: str = "ep", **config) -> tuple[Path, Path]:
        """A fresh home with ``endpoints/<name>/config.yaml``; returns (home, run_dir)."""
        home = self.tmp_path_factory.mktemp("ep-home")
        run_dir = home / "endpoints" / name
        run_dir.mkdir(parents=True)
        data = {
            "name": name,
            "manager": {"address": self.manager.endpoint_url, "token": self.manager.token},
            "pool": {"workers_per_node": 1},
            "heartbeat_s": 0.5,
            "heartbeat_threshold_s": 5.0,
            **config,
        }
        (run_dir / "config.yaml").write_text(yaml.safe_dump(data))
        self.dirs.append(run_dir)
        return home, run_dir

    def note_pid(self, run_dir: Path) -> int | None:
        try:
            pid = int((run_dir / "endpoint.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        self.seen_pids.add(pid)
        return pid

    def start(self, home: Path, name: str = "ep") -> int:
        proc = ep_cli(home, "start", name, "--detach")
        run_dir = home / "endpoints" / name
        self.note_pid(run_dir)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        m = re.search(r"endpoint '(.+)' started \(pid (\d+)\)", proc.stdout)
        assert m and m.group(1) == name, proc.stdout
        pid = int(m.group(2))
        self.seen_pids.add(pid)
        return pid

    def executor(self, name: str = "ep", **kwargs):
        from dlhub.executor import Executor

        ex = Executor(
            endpoint=name,
            manager=self.manager.client_url,
            token=self.manager.token,
            home=str(self.tmp_path_factory.mktemp("client-home")),
            **kwargs,
        )
        self.executors.append(ex)
        return ex

    def cleanup(self) -> None:
        for ex in self.executors:
            try:
                ex.shutdown(wait=False)
            except Exception:
                pass
        for run_dir in self.dirs:
            self.note_pid(run_dir)
        pids: list[int] = []
        for pid in self.seen_pids:  # each detached endpoint leads its own session
            pids += [pid, *_session_members(pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        kill_pids(sorted(set(pids)), timeout=10)


@pytest.fixture
def endpoints(tmp_path_factory, manager):
    eps = Endpoints(tmp_path_factory, manager)
    try:
        yield eps
    finally:
        eps.cleanup()


def fake_tool(tmp_path: Path, name: str, body: str) -> dict:
    """An environment whose PATH finds a fake ``name`` (a shell script) first."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


# ---- configure ----------------------------------------------------------------------------------


def test_configure_slurm_fills_the_manager_of_a_running_dlhub_up(stack):
    name = f"cfg-{uuid.uuid4().hex[:8]}"
    run_dir = stack.home / "endpoints" / name
    try:
        proc = ep_cli(stack.home, "configure", name, "--template", "slurm")
        assert proc.returncode == 0, proc.stderr
        path = run_dir / "config.yaml"
        assert f"wrote {path} (template slurm)" in proc.stdout
        assert "edit manager.address" not in proc.stdout  # nothing left to fill in
        cfg = load_config(path)
        assert cfg.name == name and cfg.provider.type == "slurm" and cfg.provider.partition == "debug"
        assert cfg.manager.address == stack.manager_info["endpoint_url"]
        assert cfg.manager.token == (stack.home / "manager" / "admin.token").read_text().strip()
        assert path.stat().st_mode & 0o777 == 0o600
        assert cfg.manager.key == stack.manager_info["curve_public_key"]  # pinned, on a line of its own
        # the template, comments and all, with only name, address and token changed (+ the key)
        template = (TEMPLATES_DIR / "slurm.yaml").read_text().splitlines()
        written = [line for line in path.read_text().splitlines() if not line.startswith("  key: ")]
        assert len(written) == len(template)
        changed = [(t, w) for t, w in zip(template, written) if t != w]
        assert [t.split(":")[0].strip() for t, _ in changed] == ["name", "address", "token"]
        for t, w in changed:  # each keeps its comment
            if "#" in t:
                assert w.endswith(t[t.index("#") :])
        assert "#SBATCH --partition" in path.read_text()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_configure_without_a_manager_leaves_change_me_and_says_so(tmp_path):
    proc = ep_cli(tmp_path, "configure", "lonely")
    assert proc.returncode == 0, proc.stderr
    assert "edit manager.address and manager.token before `dlhub-endpoint check`" in proc.stdout
    cfg = load_config(tmp_path / "endpoints" / "lonely" / "config.yaml")
    assert cfg.name == "lonely" and cfg.provider.type == "local"
    assert cfg.manager.token == "CHANGE-ME"
    # explicit values fill the template, and then there is nothing to edit
    proc = ep_cli(
        tmp_path,
        "configure",
        "pbs-site",
        "--template",
        "pbs",
        "--manager",
        "tcp://10.1.2.3:5581",
        "--token",
        "dlh_tok",
        "--workers",
        "8",
    )
    assert proc.returncode == 0, proc.stderr
    assert "edit manager" not in proc.stdout
    cfg = load_config(tmp_path / "endpoints" / "pbs-site" / "config.yaml")
    assert (cfg.manager.address, cfg.manager.token) == ("tcp://10.1.2.3:5581", "dlh_tok")
    assert cfg.pool.workers_per_node == 8 and cfg.provider.type == "pbspro"


def test_configure_refuses_to_overwrite_without_force(tmp_path):
    assert ep_cli(tmp_path, "configure", "ep").returncode == 0
    path = tmp_path / "endpoints" / "ep" / "config.yaml"
    path.write_text(path.read_text() + "# my edits\n")
    proc = ep_cli(tmp_path, "configure", "ep", "--template", "slurm")
    assert proc.returncode == 1
    assert f"{path} exists; edit it, or pass --force to replace it" in proc.stderr
    assert path.read_text().endswith("# my edits\n") and load_config(path).provider.type == "local"
    proc = ep_cli(tmp_path, "configure", "ep", "--template", "slurm", "--force")
    assert proc.returncode == 0, proc.stderr
    assert "# my edits" not in path.read_text() and load_config(path).provider.type == "slurm"


def test_configure_refuses_values_the_template_cannot_take(tmp_path):
    proc = ep_cli(tmp_path, "configure", "pm", "--template", "perlmutter", "--workers", "2")
    assert proc.returncode == 1
    assert "workers_per_node (2) must equal the number of accelerators (4)" in proc.stderr
    assert not (tmp_path / "endpoints" / "pm" / "config.yaml").exists()


# ---- check ------------------------------------------------------------------------------------


def test_check_passes_for_a_good_local_endpoint_with_two_pools(endpoints):
    home, _ = endpoints.write(pools={"gpu": {"pool": {"accelerators": ["0", "1"]}}})
    proc = ep_cli(home, "check", "ep", "--timeout", "30")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "ok   config" in out and "(local provider)" in out
    assert "ok   pool default: submit script" in out
    assert "ok   pool default: worker_init" in out
    assert "ok   pool gpu: worker_init" in out
    assert "ok   manager" in out and "accepts the token" in out
    assert not re.search(r"^FAIL", out, re.M)
    assert "--block-id gpu/0" in out  # the gpu pool's own launch command


def test_check_shows_a_failing_worker_init(endpoints):
    home, _ = endpoints.write(provider={"type": "local", "worker_init": "echo 'no such module' >&2\nexit 3"})
    proc = ep_cli(home, "check", "ep", "--timeout", "30")
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "FAIL pool default: worker_init" in out
    detail = out.split("FAIL pool default: worker_init", 1)[1].split("ok   manager")[0]
    assert "exit code 3" in detail and "no such module" in detail
    assert "ok   manager" in out  # the other checks still ran, and passed


def test_check_shows_a_token_the_manager_refuses(endpoints):
    home, run_dir = endpoints.write()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["manager"]["token"] = "not-a-token"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = ep_cli(home, "check", "ep", "--timeout", "30")
    assert proc.returncode == 1
    assert "FAIL manager" in proc.stdout and "refused: token refused" in proc.stdout
    assert "ok   pool default: worker_init" in proc.stdout


def test_check_reports_a_bad_config(endpoints):
    home, run_dir = endpoints.write(heartbeat_sec=1)
    proc = ep_cli(home, "check", "ep")
    assert proc.returncode == 1
    assert proc.stdout.startswith("FAIL config:") and "did you mean heartbeat_s?" in proc.stdout


def test_check_slurm_renders_and_asks_sbatch_test_only(endpoints, tmp_path):
    args = tmp_path / "sbatch-args"
    env = fake_tool(tmp_path, "sbatch", f'echo "$@" > {args}\ncp "$2" {args}.script\necho "Job 1 to start"\n')
    home, _ = endpoints.write(provider={"type": "slurm", "partition": "debug", "account": "proj9"})
    proc = ep_cli(home, "check", "ep", "--timeout", "30", env=env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "(slurm provider)" in out
    assert "#SBATCH --partition=debug" in out and "#SBATCH --account=proj9" in out
    assert "ok   pool default: scheduler commands" in out and "sbatch " in out
    assert "ok   pool default: sbatch --test-only" in out and "Job 1 to start" in out
    assert args.read_text().startswith("--test-only ")
    assert "#SBATCH --partition=debug" in Path(f"{args}.script").read_text()


def test_check_slurm_shows_what_sbatch_refuses(endpoints, tmp_path):
    env = fake_tool(
        tmp_path, "sbatch", 'echo "sbatch: error: invalid partition specified: nope" >&2\nexit 1\n'
    )
    home, _ = endpoints.write(provider={"type": "slurm", "partition": "nope"})
    proc = ep_cli(home, "check", "ep", "--timeout", "30", env=env)
    assert proc.returncode == 1
    assert "FAIL pool default: sbatch --test-only" in proc.stdout
    assert "invalid partition specified: nope" in proc.stdout


def test_check_slurm_with_a_hanging_sbatch_reports_fail(endpoints, tmp_path):
    env = fake_tool(tmp_path, "sbatch", "exec sleep 30\n")
    home, _ = endpoints.write(provider={"type": "slurm", "partition": "debug"})
    proc = ep_cli(home, "check", "ep", "--timeout", "1", env=env)
    assert "Traceback" not in proc.stderr
    assert "FAIL pool default: sbatch --test-only" in proc.stdout


# ---- start, list, status, logs, restart, stop ----------------------------------------------------


def test_lifecycle_start_stop_drains_restart_stop_now(endpoints, tmp_path):
    home, run_dir = endpoints.write(drain_timeout_s=120)  # a drain would outlast every timeout here
    log = run_dir / "endpoint.log"
    pid = endpoints.start(home)
    assert alive(pid)
    again = ep_cli(home, "start", "ep", "--detach")
    assert again.returncode == 1 and "already running" in again.stderr
    status = ep_cli(home, "status", "ep", "--json")
    assert status.returncode == 0, status.stdout
    info = json.loads(status.stdout)
    assert info["state"] == "running" and info["pid"] == pid and info["name"] == "ep"
    # what a person reads: local times and labelled counts, no epoch seconds, blocks with job ids
    human = ep_cli(home, "status", "ep")
    assert human.returncode == 0, human.stdout
    assert human.stdout.startswith(f"endpoint ep: running (pid {pid}), up "), human.stdout
    assert not re.search(r"\d{10}\.\d", human.stdout), human.stdout
    assert re.search(r"status: +written \d+ s ago \(20\d\d-\d\d-\d\d \d\d:\d\d:\d\d", human.stdout)
    assert re.search(r"^ +default/0 +(PENDING|RUNNING) +local job \d+", human.stdout, re.M), human.stdout
    assert f"manager:      {endpoints.manager.endpoint_url}\n" in human.stdout
    assert "tasks now:    0 queued for a worker, 0 on workers" in human.stdout
    listed = ep_cli(home, "list")
    # the last column: the endpoint's Globus Compute endpoint_id (uuid5 of its name, issue 13)
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}"
    assert re.search(rf"^ep\s+running\s+{pid}\s+1\s+\d\s+0\s+{uuid}$", listed.stdout, re.M), listed.stdout

    # `stop` drains: it waits for the running task, which finishes normally
    ex = endpoints.executor()
    started, release = tmp_path / "started-1", tmp_path / "release-1"
    fut = ex.submit(block_until, str(started), str(release))
    wait_until(started.exists, TASK_TIMEOUT_S, what="the task to start")
    stopper = subprocess.Popen(
        [sys.executable, "-m", "dlhub.endpoint.cli", "stop", "ep", "--home", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: "draining: no new work" in log.read_text(), 20, what="draining")
        assert alive(pid) and stopper.poll() is None and not fut.done()
        release.touch()
        assert fut.result(TASK_TIMEOUT_S) == int(started.read_text())
        out, err = stopper.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if stopper.poll() is None:
            stopper.kill()
            stopper.wait(10)
    assert stopper.returncode == 0 and "endpoint 'ep' stopped" in out, err
    assert not alive(pid)

    # start again, then `restart`: a new process each time
    pid2 = endpoints.start(home)
    restarted = ep_cli(home, "restart", "ep")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "endpoint 'ep' stopped" in restarted.stdout
    m = re.search(r"endpoint 'ep' started \(pid (\d+)\)", restarted.stdout)
    assert m, restarted.stdout
    pid3 = int(m.group(1))
    endpoints.seen_pids.add(pid3)
    assert len({pid, pid2, pid3}) == 3 and not alive(pid2) and alive(pid3)
    assert json.loads(ep_cli(home, "status", "ep", "--json").stdout)["pid"] == pid3

    # `logs -n 5`: the last five lines of the log, which holds every run
    logs = ep_cli(home, "logs", "ep", "-n", "5")
    assert logs.returncode == 0
    lines = logs.stdout.splitlines()
    assert len(lines) == 5
    whole = log.read_text().splitlines()
    first = whole.index(lines[0])
    assert whole[first : first + 5] == lines
    assert ep_cli(home, "logs", "ep", "-n", "1000").stdout.count("registered with manager") == 3

    # `stop --now` does not wait for the running task; the block and its worker go too
    started = tmp_path / "started-2"
    ex.submit(block_until, str(started), str(tmp_path / "never"))
    wait_until(started.exists, TASK_TIMEOUT_S, what="the second task to start")
    worker_pid = int(started.read_text())
    proc = ep_cli(home, "stop", "ep", "--now", timeout=30)
    assert proc.returncode == 0 and "endpoint 'ep' stopped" in proc.stdout, proc.stderr
    assert not alive(pid3)
    wait_until(lambda: not alive(worker_pid), 20, what="the worker to exit")

    stopped = ep_cli(home, "status", "ep", "--json")
    assert stopped.returncode == 1 and json.loads(stopped.stdout)["state"] == "stopped"
    human = ep_cli(home, "status", "ep")
    assert human.returncode == 1
    assert human.stdout.startswith("endpoint ep: stopped; its last status was written "), human.stdout
    assert "blocks:       none (stopped)" in human.stdout and not re.search(r"\d{10}\.\d", human.stdout)
    # a stopped endpoint has no blocks, workers or queue (not the numbers of its last status.json)
    listed = ep_cli(home, "list")
    assert re.search(rf"^ep\s+stopped\s+-\s+-\s+-\s+-\s+{uuid}$", listed.stdout, re.M), listed.stdout
    assert json.loads(ep_cli(home, "list", "--json").stdout)["ep"]["state"] == "stopped"
    again = ep_cli(home, "stop", "ep")
    assert again.returncode == 0 and "endpoint 'ep' is not running" in again.stdout


def test_start_with_a_refused_token_fails_and_says_why(endpoints):
    home, run_dir = endpoints.write()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["manager"]["token"] = "not-a-token"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = ep_cli(home, "start", "ep", "--detach")
    endpoints.note_pid(run_dir)
    assert proc.returncode == 1
    assert "endpoint 'ep' failed to start" in proc.stderr and "refused" in proc.stderr
    assert ep_cli(home, "status", "ep").returncode == 1


# ---- logs -f ----------------------------------------------------------------------------------


def test_logs_follow_prints_new_lines_and_follows_rotation(tmp_path):
    run_dir = tmp_path / "endpoints" / "ep"
    run_dir.mkdir(parents=True)
    log = run_dir / "endpoint.log"
    log.write_text("".join(f"old line {i}\n" for i in range(10)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlhub.endpoint.cli", "logs", "ep", "-f", "-n", "2", "--home", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: len(lines) >= 2, 20, what="the last lines")
        assert lines[:2] == ["old line 8\n", "old line 9\n"]
        with open(log, "a") as f:
            f.write("appended marker\n")
        wait_until(lambda: "appended marker\n" in lines, 10, what="the appended line")
        log.rename(run_dir / "endpoint.log.1")  # rotation: a new file under the same name
        log.write_text("after rotation\n")
        wait_until(lambda: "after rotation\n" in lines, 10, what="the rotated file's line")
        assert lines == ["old line 8\n", "old line 9\n", "appended marker\n", "after rotation\n"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0  # Ctrl-C ends it quietly
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(10)
    assert "Traceback" not in proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()


def test_logs_without_a_log_and_list_without_endpoints(tmp_path):
    proc = ep_cli(tmp_path, "logs", "ghost")
    assert proc.returncode == 1 and "no log at" in proc.stderr
    assert ep_cli(tmp_path, "list").stdout.strip() == "no endpoints configured"


def fail_as(x):
    """Raise one of 40 exception types (so the log sees many kinds of failure)."""
    raise type(f"Kind{x % 40}Error", (Exception,), {})(f"input {x} is bad\nsecond line")


def test_the_log_records_failed_tasks_rate_limited_with_summaries_and_stays_bounded(endpoints):
    max_bytes, backups, tasks = 3000, 2, 2000
    # its own name: the manager re-sends what an earlier test's `ep` left running to any `ep`
    home, run_dir = endpoints.write("failing", log_max_bytes=max_bytes, log_backups=backups)
    endpoints.start(home, "failing")
    ex = endpoints.executor("failing")
    futures = [ex.submit(fail_as, x) for x in range(tasks)]
    for fut in futures:
        assert fut.exception(TASK_TIMEOUT_S) is not None

    def log_text() -> str:
        files = [run_dir / "endpoint.log"] + [run_dir / f"endpoint.log.{i}" for i in range(backups, 0, -1)]
        return "".join(f.read_text() for f in files if f.exists())

    # once the endpoint is idle again: the suppressed failures are summed up, then the summary
    summary = (
        rf"tasks in the last \d+ s: {tasks} finished, {tasks} failed \(50 Kind\d+Error, 50 Kind\d+Error, "
        r"50 Kind\d+Error, 1850 of 37 other kinds\); now 0 queued, 0 on workers, 1 worker$"
    )
    wait_until(lambda: re.search(summary, log_text(), re.M), 30, what="the summary line")
    shown = ep_cli(home, "logs", "failing", "-n", "100").stdout  # what a user sees
    assert re.search(summary, shown, re.M), shown
    failed = re.findall(
        r"WARNING dlhub.endpoint: task [0-9a-f]{32} failed: (Kind\d+Error): input \d+ is bad "
        r"\(function fail_as [0-9a-f]{12}, worker \S+\)$",
        log_text(),
        re.M,
    )
    suppressed = re.findall(r"suppressed (\d+) (?:similar failures \(Kind\d+Error\)|failures of)", log_text())
    assert failed and suppressed, log_text()
    assert "second line" not in log_text()
    # at most 5 lines per kind and 50 in all in a 10 s window (the run may straddle two)
    assert max(failed.count(kind) for kind in set(failed)) <= 10 and len(failed) <= 100
    assert len(failed) + sum(map(int, suppressed)) <= tasks
    # bounded: the rotation keeps each file under log_max_bytes, and `backups` old files
    files = sorted(p.name for p in run_dir.glob("endpoint.log*"))
    assert files == ["endpoint.log", "endpoint.log.1", "endpoint.log.2"], files  # it did rotate
    assert all((run_dir / f).stat().st_size <= max_bytes for f in files)


# ---- an endpoint whose blocks cannot start ---------------------------------------------------------


def test_blocks_that_cannot_start_surface_and_then_fail_tasks(endpoints):
    from dlhub.executor import TaskLost

    home, run_dir = endpoints.write(
        provider={"type": "local", "worker_init": "echo 'conda: command not found' >&2\nexit 3"},
        strategy_period_s=1,
        heartbeat_s=0.5,
    )
    endpoints.start(home)
    # the first block's failure is in status.json within a few seconds, with its output
    errors = wait_until(
        lambda: read_json(run_dir / "status.json").get("block_errors"), 15, what="block_errors"
    )
    (key, err), *_ = errors.items()
    assert key.startswith("default/")
    assert "ended" in err["reason"] and "local job" in err["reason"]
    assert "conda: command not found" in err["output"]
    assert "before its pool started (check worker_init)" in (run_dir / "endpoint.log").read_text()
    # a task makes the endpoint try more blocks; after 3 early failures it fails with the reason
    ex = endpoints.executor()
    fut = ex.submit(square, 3)
    with pytest.raises(TaskLost) as info:
        fut.result(45)
    msg = str(info.value)
    assert re.search(
        r"endpoint 'ep' cannot start workers\b.*: 3 blocks in a row ended before their pool", msg
    )
    assert "conda: command not found" in msg
    # status.json (rewritten every heartbeat) shows the pool failing, and each block's error
    status = wait_until(
        lambda: (s := read_json(run_dir / "status.json")).get("failing") and s, 5, what="failing in status"
    )
    assert "cannot start workers" in str(status["failing"])
    assert len(status["block_errors"]) >= 3
    human = ep_cli(home, "status", "ep").stdout
    assert re.search(r"^  block error default/\d+ \(job \d+\): block default/\d+ \(local job", human, re.M)
    assert "    | conda: command not found" in human and "pool default is failing its tasks" in human
    # later tasks fail at once with the same error
    with pytest.raises(TaskLost, match="cannot start workers"):
        ex.submit(square, 4).result(TASK_TIMEOUT_S)
