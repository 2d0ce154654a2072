"""Endpoints on a real Slurm cluster: blocks are batch jobs, tasks run inside them.

Needs the single-node Slurm with accounting (slurmdbd, so ``sacct`` says how a job ended) that
``scripts/slurm-localhost.sh`` starts; ``scripts/test.sh`` runs it before pytest. These tests are
part of the default suite and FAIL, never skip, when Slurm is not up.

Each test starts an in-process manager and an endpoint whose provider is ``slurm``
(``custom_stack_factory``), with short heartbeats so a lost block is noticed within seconds.
Every job an endpoint submits has its batch script under the endpoint's directory (Parsl's
``submit_scripts``): that is how a test finds its own jobs in ``squeue`` and cancels leftovers.

Slurm 22.05 facts the tests rely on: time limits are whole minutes, and slurmctld enforces them
in a pass every 30 s (fixed), so ``scontrol update JobId=N TimeLimit=0`` ends a running job with
state TIMEOUT 0-30 s later (``OverTimeLimit=0``, ``KillWait=2`` in slurm-localhost.sh make the
end itself prompt). A job reaches slurmdbd, and so ``sacct``, 0.2-1 s after ``sbatch`` (longer on
busy clusters); ``lagging_sacct`` makes that lag a steady 3 s where a test needs it to be
deterministic.

Product checks raise ``ProductBug`` (an AssertionError), so a failure report says whether the
product or the cluster/harness broke.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(150)]

SLURM_CMD_TIMEOUT_S = 30
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
# resolved before any test puts a shim on PATH
SACCT = shutil.which("sacct") or "sacct"


class ProductBug(AssertionError):
    """A product check failed (what the strict xfails expect); anything else is a real failure."""


def product_check(ok: Any, message: str) -> None:
    if not ok:
        raise ProductBug(message)


# ---- functions that run remotely --------------------------------------------------------------


def where():
    import os
    import socket

    return os.environ.get("SLURM_JOB_ID"), os.getpid(), socket.gethostname()


def square_in_job(x, seconds=0.0):
    import os
    import time

    time.sleep(seconds)
    return x * x, os.environ.get("SLURM_JOB_ID")


# ---- Slurm helpers -----------------------------------------------------------------------------


def run(cmd: list[str], timeout: float = SLURM_CMD_TIMEOUT_S) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def live_jobs(under: Path) -> dict[str, str]:
    """Job id -> state of the unfinished Slurm jobs whose batch script lies under ``under``."""
    jobs = {}
    for line in run(["squeue", "-h", "-o", "%i|%T|%o"]).splitlines():
        job_id, state, command = line.split("|", 2)
        if command.startswith(f"{under}/") and state in LIVE_STATES:
            jobs[job_id] = state
    return jobs


def sacct_state(job_id: str) -> tuple[str, str]:
    """(state, exit code) of a job as accounting records it; ('', '') while it has no record."""
    out = run([SACCT, "-X", "-n", "-P", "-j", str(job_id), "-o", "State,ExitCode"]).strip()
    if not out:
        return "", ""
    state, exit_code = out.splitlines()[0].split("|")
    return state.split()[0], exit_code  # "CANCELLED by 0" -> "CANCELLED"


def cancel_jobs_under(under: Path) -> None:
    jobs = live_jobs(under)
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=SLURM_CMD_TIMEOUT_S)
        try:
            wait_until(lambda: not live_jobs(under), 20, 0.2, what=f"leftover jobs {sorted(jobs)} to end")
        except AssertionError:
            pass


@pytest.fixture(scope="module")
def slurm_partition() -> str:
    """The partition to use; fails (never skips) when Slurm or its accounting is not usable."""
    hint = "start it with `bash scripts/slurm-localhost.sh` as root (scripts/test.sh does)"
    for tool in ("sinfo", "sbatch", "squeue", "scancel", "sacct", "scontrol"):
        if shutil.which(tool) is None:
            pytest.fail(f"Slurm is not installed: `{tool}` is not on PATH; {hint}", pytrace=False)
    proc = subprocess.run(["sinfo", "-h", "-o", "%P|%a|%T"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.fail(f"Slurm is not up: sinfo failed: {proc.stderr.strip()}; {hint}", pytrace=False)
    usable = []
    for line in proc.stdout.splitlines():
        name, avail, state = line.split("|")
        if avail == "up" and state.rstrip("*~#") in {"idle", "mixed", "allocated", "completing"}:
            usable.append(name)
    if not usable:
        pytest.fail(f"Slurm has no usable partition (sinfo: {proc.stdout.strip()!r}); {hint}", pytrace=False)
    acct = subprocess.run([SACCT, "-X", "-n"], capture_output=True, text=True, timeout=30)
    if acct.returncode != 0:
        pytest.fail(f"Slurm accounting is not up: sacct failed: {acct.stderr.strip()}; {hint}", pytrace=False)
    default = [p for p in usable if p.endswith("*")]
    return (default or usable)[0].rstrip("*")


@pytest.fixture(scope="module")
def block_cores(slurm_partition) -> tuple[int, int]:
    """(cores per block, blocks that fit on the node at once), from the node's CPU count as Slurm
    reports it (``slurmd -C`` found the real CPUs): a block takes half the node, so that two
    blocks run side by side and a third waits, whether the node has 2 cores or 64."""
    out = run(["sinfo", "-h", "-p", slurm_partition, "-N", "-o", "%N|%c"]).split()
    if len(out) != 1:
        pytest.fail(f"the cluster tests need a one-node partition (sinfo: {out})", pytrace=False)
    node, cpus = out[0].split("|")
    cpus = int(cpus.rstrip("+"))
    if cpus < 2:
        pytest.fail(
            f"node {node} has {cpus} CPU; the cluster tests need 2 blocks side by side", pytrace=False
        )
    cores = cpus // 2
    return cores, cpus // cores  # 2, or 3 on a 3-CPU node


SACCT_SHIM = '''#!{python}
"""sacct as seen through a slurmdbd that lags {lag} s behind slurmctld: jobs submitted less
than {lag} s ago are missing from its output (real sacct does this for 0.2-1 s)."""
import datetime, subprocess, sys
proc = subprocess.run([{real!r}, *sys.argv[1:]], capture_output=True, text=True)
sys.stderr.write(proc.stderr)
def young(job_id):
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    for field in out.split():
        if field.startswith("SubmitTime="):
            submitted = datetime.datetime.fromisoformat(field.split("=", 1)[1])
            return (datetime.datetime.now() - submitted).total_seconds() < {lag}
    return False
for line in proc.stdout.splitlines(keepends=True):
    fields = line.split()
    if fields and fields[0].split(".")[0].isdigit() and young(fields[0].split(".")[0]):
        continue
    sys.stdout.write(line)
sys.exit(proc.returncode)
'''


@pytest.fixture
def lagging_sacct(tmp_path, monkeypatch) -> None:
    """Put a ``sacct`` that lags 3 s behind slurmctld first on PATH for the endpoints started
    after this (they, and Parsl's SlurmProvider in them, inherit the test's environment)."""
    shim_dir = tmp_path / "lagging-sacct"
    shim_dir.mkdir()
    shim = shim_dir / "sacct"
    shim.write_text(SACCT_SHIM.format(python=sys.executable, real=SACCT, lag=3))
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim_dir}{os.pathsep}{os.environ['PATH']}")


def endpoint_config(
    partition: str,
    *,
    workers: int = 1,
    launcher: str = "single-node",
    max_idletime_s: float = 2.0,
    cores: int | None = None,
    **provider,
) -> dict:
    """A small Slurm endpoint: ``cores`` per block (default: 1 per worker), short heartbeats."""
    return {
        "provider": {
            "type": "slurm",
            "partition": partition,
            "exclusive": False,  # a block takes only its cores, so several fit on the node
            "cores_per_node": cores or workers,
            "walltime": "00:05:00",
            "init_blocks": 1,
            "min_blocks": 0,
            "max_blocks": 1,
            "cmd_timeout_s": 20,
            "launcher": {"type": launcher},
            **provider,
        },
        "pool": {"workers_per_node": workers},
        "heartbeat_s": 0.5,
        "heartbeat_threshold_s": 3.0,
        "strategy_period_s": 1.0,
        "max_idletime_s": max_idletime_s,
        "drain_timeout_s": 5.0,
    }


def stop_endpoint(cs, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:
    """Stop the endpoint process (SIGINT: at once; SIGTERM: drain first) and wait for it."""
    proc = cs.endpoint_proc
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def slurm_stack(custom_stack_factory, slurm_partition, block_cores) -> Iterator[Callable[..., Any]]:
    """Start manager + Slurm endpoint (each block takes half the node: ``block_cores``).
    Teardown stops the endpoint (it cancels its blocks), cancels any job of the test still
    queued, then ``custom_stack_factory`` stops the rest."""
    started = []

    def make(name: str, workers_to_wait: int = 1, **cfg) -> Any:
        cfg.setdefault("cores", block_cores[0])
        config = endpoint_config(slurm_partition, **cfg)
        cs = custom_stack_factory(endpoint=config, name=name, workers=workers_to_wait)
        started.append(cs)
        if workers_to_wait == 0:  # custom_stack_factory did not wait: wait for the first status
            wait_until(lambda: cs.status().get("state") == "running", 30, 0.05, what="endpoint status.json")
        return cs

    try:
        yield make
    finally:
        for cs in started:
            for ex in cs.executors:
                try:
                    ex.shutdown(wait=False)
                except Exception:
                    pass
            stop_endpoint(cs)
            cancel_jobs_under(cs.endpoint_dir)


def leaves(tree: Any) -> list[dict]:
    """The per-block records (dicts with a ``job_id``) in a part of status.json, however nested
    (``blocks`` is keyed by pool name, then block id)."""
    if not isinstance(tree, dict):
        return []
    if "job_id" in tree:
        return [tree]
    return [leaf for value in tree.values() for leaf in leaves(value)]


def blocks_by_job(cs) -> dict[str, dict]:
    return {str(b["job_id"]): b for b in leaves(cs.status().get("blocks", {}))}


def describe(cs) -> str:
    """For failure messages: status.json and the end of endpoint.log."""
    log = cs.endpoint_dir / "endpoint.log"
    tail = log.read_text()[-3000:] if log.exists() else "(no endpoint.log)"
    return f"status.json: {json.dumps(cs.status(), default=str)[:3000]}\nendpoint.log:\n{tail}"


# ---- a. tasks run inside a Slurm job --------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["single-node", "srun"])
def test_tasks_run_inside_a_slurm_job(slurm_stack, launcher):
    # idle blocks are kept for the whole test: under a loaded CI machine the checks between the
    # two submits can outlast a short max_idletime_s, and the scale-in is then right, not a bug
    cs = slurm_stack(f"slurm-a-{launcher}", launcher=launcher, max_idletime_s=300.0)
    ex = cs.executor()
    job_id, pid, host = ex.submit(where).result(60)
    assert job_id, "the task did not run inside a Slurm job (no SLURM_JOB_ID)"
    assert pid != os.getpid()

    # the job is the endpoint's block: running in squeue, known to accounting, in status.json
    assert live_jobs(cs.endpoint_dir) == {job_id: "RUNNING"}, run(["squeue"])
    wait_until(lambda: sacct_state(job_id)[0] in {"PENDING", "RUNNING"}, 10, 0.2, what="sacct record")
    assert job_id in blocks_by_job(cs), describe(cs)
    assert [p["job_id"] for p in cs.status()["pools"].values()] == [job_id], describe(cs)

    # the next task goes to the same warm block
    assert ex.submit(where).result(30)[0] == job_id, describe(cs)

    # the normal (draining) stop of the endpoint cancels its block
    stop_endpoint(cs, signal.SIGTERM)
    wait_until(lambda: not live_jobs(cs.endpoint_dir), 20, 0.2, what=f"block job {job_id} to be cancelled")
    # ended by scancel, or by its pool exiting on Shutdown first
    wait_until(
        lambda: sacct_state(job_id)[0] in {"CANCELLED", "COMPLETED"}, 20, 0.2, what=f"sacct end of {job_id}"
    )


# ---- b. scale out under load, back in when idle ---------------------------------------------------


def test_scales_out_to_two_blocks_under_load_and_back_in_when_idle(slurm_stack):
    cs = slurm_stack("slurm-b", max_blocks=2, init_blocks=1, min_blocks=0)
    ex = cs.executor()
    futures = [ex.submit(square_in_job, i, 0.5) for i in range(16)]
    seen_running: set[str] = set()
    max_running = 0

    def all_done() -> bool:
        nonlocal max_running
        running = {j for j, s in live_jobs(cs.endpoint_dir).items() if s == "RUNNING"}
        seen_running.update(running)
        max_running = max(max_running, len(running))
        return all(f.done() for f in futures)

    wait_until(all_done, 60, 0.2, what="16 tasks on up to 2 blocks")
    results = [f.result(0) for f in futures]
    assert [r[0] for r in results] == [i * i for i in range(16)]
    jobs_used = {r[1] for r in results}
    assert max_running == 2, f"squeue never showed 2 running blocks (saw {sorted(seen_running)})"
    assert len(jobs_used) == 2 and jobs_used <= seen_running, (jobs_used, seen_running)
    assert jobs_used <= set(blocks_by_job(cs)), describe(cs)

    # idle for max_idletime_s (2 s): both blocks are cancelled (min_blocks 0)
    wait_until(lambda: not live_jobs(cs.endpoint_dir), 30, 0.2, what="idle blocks to be scaled in")
    for job_id in jobs_used:
        wait_until(lambda j=job_id: sacct_state(j)[0] == "CANCELLED", 20, 0.2, what=f"sacct for {job_id}")
    wait_until(
        lambda: all(b["state"] == "SCALED_IN" for b in leaves(cs.status()["blocks"])),
        10,
        0.1,
        what="status.json blocks SCALED_IN",
    )

    # work arriving later starts a block again
    assert ex.submit(square_in_job, 7).result(60)[0] == 49


# ---- c/d. a block ended by the scheduler: its tasks are re-queued and complete elsewhere -------


def keep_busy(ex, end_a_block: Callable[[str], None], block_gone: Callable[[str], bool], limit_s: float):
    """Keep 4 one-second tasks outstanding on the two blocks. Once both blocks have returned
    results, call ``end_a_block(job)`` with the job that returned the latest result (so it is
    running its next task now); stop submitting when ``block_gone(job)``. Returns the victim
    job and the futures (task i computes i*i)."""
    futures: list[cf.Future] = []
    victim = None
    deadline = time.monotonic() + limit_s
    while victim is None or not block_gone(victim):
        assert time.monotonic() < deadline, f"the block did not end within {limit_s} s (victim {victim})"
        while sum(1 for f in futures if not f.done()) < 4:
            futures.append(ex.submit(square_in_job, len(futures), 1.0))
        ok = [f for f in futures if f.done() and f.exception() is None]
        if victim is None and len({f.result()[1] for f in ok}) >= 2:
            victim = ok[-1].result()[1]  # futures complete in order on each worker
            end_a_block(victim)
        time.sleep(0.1)
    return victim, futures


def check_all_completed(cs, futures: list[cf.Future]) -> list:
    _, pending = cf.wait(futures, timeout=60)
    product_check(not pending, f"{len(pending)} tasks never finished\n{describe(cs)}")
    failed = {i: f.exception() for i, f in enumerate(futures) if f.exception() is not None}
    product_check(not failed, f"tasks failed instead of being retried: {failed}\n{describe(cs)}")
    results = [f.result() for f in futures]
    product_check([r[0] for r in results] == [i * i for i in range(len(futures))], results)
    status = cs.status()
    product_check(status["requeued"] >= 1, f"no task was re-queued\n{describe(cs)}")
    return results


# Slurm SIGTERMs every process of an ended job at once: the worker must count as lost with its
# block (task re-queued), not as a worker that died running the task (WorkerLost).


def test_scancel_of_a_busy_block_requeues_its_tasks(slurm_stack):
    cs = slurm_stack("slurm-c", workers_to_wait=2, max_blocks=2, init_blocks=2, min_blocks=2)
    assert len(live_jobs(cs.endpoint_dir)) == 2
    ex = cs.executor()

    def scancel(job: str) -> None:
        run(["scancel", job])

    victim, futures = keep_busy(ex, scancel, lambda job: job not in live_jobs(cs.endpoint_dir), limit_s=40)
    wait_until(lambda: sacct_state(victim)[0] == "CANCELLED", 20, 0.2, what=f"sacct CANCELLED for {victim}")
    results = check_all_completed(cs, futures)
    product_check(cs.status()["worker_lost"] == 0, describe(cs))
    product_check(any(r[1] != victim for r in results[-3:]), "later tasks did not run on the other block")


def test_block_reaching_its_time_limit_requeues_its_tasks(slurm_stack):
    cs = slurm_stack("slurm-d", workers_to_wait=2, max_blocks=2, init_blocks=2, min_blocks=2)
    ex = cs.executor()

    def out_of_time(job: str) -> None:
        # limits are whole minutes: 0 is "already over"; slurmctld acts on its next 30 s pass
        run(["scontrol", "update", f"JobId={job}", "TimeLimit=0"])

    victim, futures = keep_busy(
        ex, out_of_time, lambda job: job not in live_jobs(cs.endpoint_dir), limit_s=60
    )
    wait_until(lambda: sacct_state(victim)[0] == "TIMEOUT", 20, 0.2, what=f"sacct TIMEOUT for {victim}")
    check_all_completed(cs, futures)
    product_check(cs.status()["worker_lost"] == 0, describe(cs))


# ---- e. blocks that cannot start, and blocks sacct does not know yet ---------------------------

# Regression guard: a job slurmdbd does not know yet (sacct lags sbatch) is read by Parsl's
# SlurmProvider as COMPLETED and cached for good; the endpoint must not believe it.


def test_queued_blocks_unknown_to_sacct_yet_are_not_reported_as_ended(
    slurm_stack, lagging_sacct, block_cores
):
    # one healthy block more than the node has room for: the last waits in the queue for cores
    fit = block_cores[1]
    cs = slurm_stack(
        "slurm-queued",
        workers_to_wait=fit,
        max_blocks=fit + 1,
        init_blocks=fit + 1,
        min_blocks=0,
        max_idletime_s=60,
    )
    jobs = blocks_by_job(cs)
    waiting = [j for j, s in live_jobs(cs.endpoint_dir).items() if s == "PENDING"]
    assert len(jobs) == fit + 1 and len(waiting) == 1, (jobs, run(["squeue"]))
    # wait until accounting knows the waiting job (the lag is over), then for 2 s of watching
    wait_until(
        lambda: sacct_state(waiting[0])[0] == "PENDING", 20, 0.2, what="sacct record of the queued job"
    )
    since = time.time()
    wait_until(lambda: cs.status().get("updated", 0) > since + 2, 10, 0.1, what="2 s of status updates")
    status = cs.status()
    product_check(
        not leaves(status.get("block_errors")), f"a queued block was reported ended\n{describe(cs)}"
    )
    product_check(not status.get("failing"), describe(cs))
    product_check(
        blocks_by_job(cs)[waiting[0]]["state"] not in {"COMPLETED", "FAILED", "CANCELLED"}, describe(cs)
    )
    product_check(len(live_jobs(cs.endpoint_dir)) == fit + 1, f"blocks were replaced\n{run(['squeue'])}")
    assert cs.executor().submit(square_in_job, 5).result(30)[0] == 25


def test_failing_worker_init_is_reported_within_one_block_start(slurm_stack, lagging_sacct):
    marker = "dlhub-test: worker_init failed on purpose"
    # max_idletime_s 60: with the default 2 s, Parsl's strategy may scale the block in as idle
    # (no pool, no tasks) before the lagging sacct (3 s) shows it FAILED, and a cancelled block is
    # not watched any more (seen once in a loaded full run)
    cs = slurm_stack(
        "slurm-e", workers_to_wait=0, worker_init=f"echo '{marker}' >&2\nexit 3", max_idletime_s=60
    )
    job_id = wait_until(lambda: next(iter(blocks_by_job(cs)), None), 20, 0.05, what="a block job")
    # Slurm's side: the job ran and failed with worker_init's exit code
    wait_until(lambda: sacct_state(job_id) == ("FAILED", "3:0"), 20, 0.2, what=f"sacct FAILED for {job_id}")

    def reported() -> bool:
        log = cs.endpoint_dir / "endpoint.log"
        text = json.dumps(cs.status().get("block_errors", {})) + (log.read_text() if log.exists() else "")
        return marker in text and job_id in text

    try:
        wait_until(reported, 10, 0.1, what="the failure to be named")
    except AssertionError:
        raise ProductBug(f"status.json/endpoint.log do not name the failure\n{describe(cs)}") from None

    # the endpoint logs the failure, then writes status.json: the log may name it a moment first
    def recorded() -> list[dict]:
        return [e for e in leaves(cs.status().get("block_errors")) if e["job_id"] == job_id]

    try:
        errors_ = wait_until(recorded, 5, 0.1, what="status.json's block_errors to hold the job")
    except AssertionError:
        raise ProductBug(f"the log names the failure, status.json does not\n{describe(cs)}") from None
    product_check(any(e["state"] == "FAILED" for e in errors_), errors_)
    assert cs.status()["workers"] == 0


def test_tasks_fail_with_the_error_when_no_block_can_start(slurm_stack):
    # `module` does not exist here: worker_init fails (the endpoint runs it under `set -e`)
    cs = slurm_stack("slurm-e2", workers_to_wait=0, worker_init="module load dlhub-no-such-module")
    fut = cs.executor().submit(square_in_job, 3)
    with pytest.raises(Exception) as info:  # noqa: B017 - any dlhub error type, checked below
        fut.result(40)
    assert not isinstance(info.value, cf.TimeoutError), f"the task neither ran nor failed\n{describe(cs)}"
    text = str(info.value)
    assert "cannot start workers" in text and "module" in text and "not found" in text, text
    assert len(leaves(cs.status()["block_errors"])) >= 3, describe(cs)


# ---- `dlhub-endpoint check`: sbatch --test-only against the real scheduler -----------------------


@pytest.fixture(scope="module")
def check_manager(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """An in-process manager for ``check``'s token probe: (endpoint URL, token)."""
    from dlhub.manager import Manager, ManagerConfig

    home = tmp_path_factory.mktemp("check-manager")
    mgr = Manager(ManagerConfig(home=home / "manager"))
    mgr.start_thread()
    try:
        yield mgr.endpoint_url, (home / "manager" / "admin.token").read_text().strip()
    finally:
        mgr.stop()


def endpoint_check(tmp_path: Path, manager: tuple[str, str], provider: dict) -> subprocess.CompletedProcess:
    """``dlhub-endpoint check ep`` as a user runs it, on a config with this Slurm ``provider``."""
    run_dir = tmp_path / "endpoints" / "ep"
    run_dir.mkdir(parents=True)
    config = {
        "name": "ep",
        "manager": {"address": manager[0], "token": manager[1]},
        "provider": {"type": "slurm", "exclusive": False, "walltime": "00:05:00", **provider},
        "pool": {"workers_per_node": 1},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    cli = Path(sys.executable).with_name("dlhub-endpoint")
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "dlhub.endpoint.cli"]
    return subprocess.run(
        [*cmd, "check", "ep", "--home", str(tmp_path), "--timeout", "30"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )


def check_detail(out: str, title: str) -> str:
    """The lines ``check`` prints under the check whose title starts with ``title``."""
    after = out.split(title, 1)[1]
    return re.split(r"^(?:ok  |FAIL) ", after, maxsplit=1, flags=re.M)[0]


def test_check_passes_on_the_real_slurm_with_a_good_config(tmp_path, check_manager, slurm_partition):
    proc = endpoint_check(tmp_path, check_manager, {"partition": slurm_partition, "cores_per_node": 1})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "ok   pool default: sbatch --test-only" in out, out
    # the scheduler's own answer: where and when the job would start; nothing was queued
    detail = check_detail(out, "ok   pool default: sbatch --test-only")
    assert re.search(rf"Job \d+ to start at .* in partition {slurm_partition}", detail), detail
    assert "ok   manager" in out and not re.search(r"^FAIL", out, re.M), out


@pytest.mark.parametrize(
    "provider, message",
    [
        ({"partition": "no-such-partition"}, "invalid partition specified: no-such-partition"),
        ({"cores_per_node": 100_000}, "Requested node configuration is not available"),
    ],
    ids=["unknown-partition", "more-cores-than-any-node"],
)
def test_check_fails_with_the_schedulers_message(tmp_path, check_manager, slurm_partition, provider, message):
    proc = endpoint_check(tmp_path, check_manager, {"partition": slurm_partition, **provider})
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "FAIL pool default: sbatch --test-only" in out, out
    assert message in check_detail(out, "FAIL pool default: sbatch --test-only"), out
    assert "ok   manager" in out  # the other checks still ran


# ---- Torque through Debian's slurm-wlm-torque wrappers (qsub/qstat/qdel on top of Slurm) --------


def test_torque_provider_runs_tasks_through_the_qsub_wrappers(custom_stack_factory, slurm_partition):
    """Parsl's TorqueProvider, for real: qsub submits the block (the wrappers turn it into a Slurm
    job), qstat reports it, and the task runs inside that job."""
    assert shutil.which("qsub") and shutil.which("qstat"), "slurm-wlm-torque is not installed"
    config = endpoint_config(slurm_partition)
    config["provider"] = {
        "type": "torque",
        "walltime": "00:05:00",
        "init_blocks": 1,
        "max_blocks": 1,
        "cmd_timeout_s": 20,
        "launcher": {"type": "single-node"},
    }
    cs = custom_stack_factory(endpoint=config, name="torque-e", workers=1)
    try:
        job_id, pid, _host = cs.executor().submit(where).result(60)
        assert job_id is not None and pid != os.getpid()
        blocks = blocks_by_job(cs)
        assert job_id in blocks, (job_id, blocks)
        assert blocks[job_id]["state"] == "RUNNING"  # its pool is registered, whatever Parsl polled
        assert sacct_state(job_id)[0] in LIVE_STATES, sacct_state(job_id)
    finally:
        stop_endpoint(cs)
        cancel_jobs_under(cs.endpoint_dir)
