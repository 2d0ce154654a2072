"""Pools without sockets: each worker's accelerator variables, and how the endpoint reacts to
blocks that end (before their pool started: a broken worker_init; after: walltime, scancel)."""

from __future__ import annotations

import types

import pytest
from parsl.jobs.states import JobState, JobStatus

from dlhub.endpoint import pool as pool_module
from dlhub.endpoint.blocks import MAX_EARLY_BLOCK_FAILURES
from dlhub.endpoint.config import parse_config
from dlhub.endpoint.daemon import Endpoint
from dlhub.endpoint.pool import ACCELERATOR_VARS, Pool
from dlhub.protocol import messages as m
from dlhub.protocol.serialize import runtime_versions

# ---- accelerator variables per worker --------------------------------------------------------


class FakePopen:
    started: list[FakePopen] = []

    def __init__(self, args, env=None, **kwargs):
        self.args, self.env = args, env
        FakePopen.started.append(self)


@pytest.fixture
def spawned(monkeypatch):
    FakePopen.started = []
    monkeypatch.setattr(pool_module, "subprocess", types.SimpleNamespace(Popen=FakePopen))
    for var in ACCELERATOR_VARS:
        monkeypatch.delenv(var, raising=False)
    return FakePopen.started


def make_pool(accelerators: list[str], workers: int) -> Pool:
    config = {"workers_per_node": workers, "accelerators": accelerators, "endpoint_url": "tcp://x:1"}
    return Pool(config, "/run/pool-gpu.json", "gpu/0")


def test_each_worker_sees_only_its_own_device(spawned):
    pool = make_pool(["0.0", "0.1", "1.0"], 3)
    for slot in range(3):
        pool._spawn(slot)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in spawned] == ["0.0", "0.1", "1.0"]
    for p in spawned:
        assert {var: p.env[var] for var in ACCELERATOR_VARS} == dict.fromkeys(
            ACCELERATOR_VARS, p.env["CUDA_VISIBLE_DEVICES"]
        )
    assert set(ACCELERATOR_VARS) == {"CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK"}
    # each worker has its own id, and runs the worker module with the pool's config
    assert len({p.env["DLHUB_WORKER_ID"] for p in spawned}) == 3
    assert all(p.args[1:3] == ["-m", "dlhub.endpoint.worker"] for p in spawned)
    assert all("/run/pool-gpu.json" in p.args for p in spawned)


def test_a_restarted_worker_gets_the_same_device(spawned):
    pool = make_pool(["0", "1"], 2)
    pool._spawn(1)
    pool._spawn(1)  # what _reap does when the worker in slot 1 dies
    assert [p.env["ROCR_VISIBLE_DEVICES"] for p in spawned] == ["1", "1"]
    assert spawned[0].env["DLHUB_WORKER_ID"] != spawned[1].env["DLHUB_WORKER_ID"]


def test_workers_without_accelerators_get_no_device_variables(spawned):
    pool = make_pool([], 2)
    pool._spawn(0)
    pool._spawn(1)
    for p in spawned:
        assert not set(ACCELERATOR_VARS) & set(p.env)


# ---- blocks that end: the endpoint's bookkeeping, with fake executors --------------------------


class FakeProvider:
    def __init__(self):
        self.states: dict[str, JobStatus] = {}
        self.asked: list[list[str]] = []

    def status(self, job_ids):
        self.asked.append(list(job_ids))
        return [self.states.get(j, JobStatus(JobState.RUNNING)) for j in job_ids]


class FakeExecutor:
    """What BlockWatch.watch and BlockWatch.block_ended use of a PoolExecutor."""

    def __init__(self, blocks: list[str], prefix: str):
        self.blocks_to_job_id = {b: f"{prefix}{b}" for b in blocks}
        self._status = {b: JobStatus(JobState.RUNNING) for b in blocks}
        self.provider = FakeProvider()
        self.bad: Exception | None = None

    def block_states(self) -> dict:
        return {
            b: {"job_id": self.blocks_to_job_id[b], "state": st.state.name} for b, st in self._status.items()
        }

    def fresh_status(self, block_ids: list[str]) -> list[JobStatus]:
        return self.provider.status([self.blocks_to_job_id[b] for b in block_ids])

    def mark_ended(self, block_id: str, status: JobStatus) -> None:
        self._status[block_id] = status

    def set_bad_state_and_fail_all(self, exc: Exception) -> None:
        self.bad = exc


def make_endpoint(tmp_path, t: list[float], pools: dict | None = None) -> Endpoint:
    config = parse_config(
        {
            "name": "ep",
            "manager": {"address": "tcp://127.0.0.1:1", "token": "t"},
            "heartbeat_s": 1.0,
            "pool": {"workers_per_node": 1},
            "pools": pools or {},
        }
    )
    ep = Endpoint(config, tmp_path)
    ep.scheduler.clock = lambda: t[0]
    return ep


ADMIN = {"user": "admin", "admin": True}  # what the manager writes for the hub's admin (policy: allowed)


def rec(n: int, resources: dict | None = None) -> list:
    task_id = n.to_bytes(m.TASK_ID_BYTES, "big")
    return m.task_record(task_id, "sha256:f", b"\x01\x90", None, "auto", resources, None, dict(ADMIN))


def watch_until(ep: Endpoint, t: list[float], done, beats: int = 4) -> int:
    """Run the endpoint's block watch once a heartbeat (clock advanced by hand) until ``done()``;
    return how many watches it took (the endpoint may confirm a terminal state once more)."""
    for n in range(1, beats + 1):
        ep.blocks.watch()
        if done():
            return n
        t[0] += ep.config.heartbeat_s
    raise AssertionError(f"not done after {beats} heartbeats")


def failed_block(tmp_path, name: str, text: str) -> JobStatus:
    err = tmp_path / f"{name}.stderr"
    err.write_text(text)
    return JobStatus(JobState.FAILED, "exit code 3", 3, str(tmp_path / "absent.stdout"), str(err))


def test_watch_asks_only_about_blocks_without_a_live_pool(tmp_path):
    t = [100.0]
    ep = make_endpoint(tmp_path, t)
    ex = ep.executors["default"] = FakeExecutor(["0", "1", "2", "3"], "job")
    ex._status["3"] = JobStatus(JobState.SCALED_IN)
    s = ep.scheduler
    s.add_pool(b"p:a", "pool-a", "default/0", {})  # registered, heartbeating
    t[0] = 90.0
    s.add_pool(b"p:b", "pool-b", "default/1", {})  # registered, silent for 10 s > 2 heartbeats
    t[0] = 100.0
    s.pool_heartbeat("pool-a")
    ep.blocks.watch()
    assert ex.provider.asked == [["job1", "job2"]]  # not the live one, not the scaled-in one
    assert ep.blocks.block_errors == {} and s.refused_pools == {}


def test_a_block_ending_before_its_pool_started_is_recorded_with_its_output(tmp_path):
    t = [0.0]
    ep = make_endpoint(tmp_path, t)
    ex = ep.executors["default"] = FakeExecutor(["0"], "job")
    ex.provider.states["job0"] = failed_block(tmp_path, "b0", "module: command not found\n")
    watch_until(ep, t, lambda: "default/0" in ep.blocks.block_errors)
    err = ep.blocks.block_errors["default/0"]
    assert err["job_id"] == "job0" and err["state"] == "FAILED"
    assert err["reason"] == "block default/0 (local job job0) ended: FAILED (exit code 3)"
    assert err["output"] == "module: command not found"
    assert ep.scheduler.refused_pools == {} and ex.bad is None  # one failure is not yet a pattern
    asked = len(ex.provider.asked)
    t[0] += 10
    ep.blocks.watch()  # an ended block is not asked about again
    assert len(ex.provider.asked) == asked and list(ep.blocks.block_errors) == ["default/0"]
    assert ex._status["0"].state == JobState.FAILED  # Parsl's strategy sees it gone
    status = ep.status()
    assert status["block_errors"]["default/0"]["output"] == "module: command not found"
    assert not status["failing"]


def test_a_block_ending_under_a_running_pool_requeues_its_tasks(tmp_path):
    t = [0.0]
    ep = make_endpoint(tmp_path, t)
    ex = ep.executors["default"] = FakeExecutor(["0"], "job")
    s = ep.scheduler
    s.add_pool(b"p:a", "pool-a", "default/0", {})
    s.add_worker(b"w:a.0", "a.0", "pool-a")
    s.add_code({"sha256:f": b"\x10"})
    s.add_tasks([rec(1)])
    s.dispatch()
    s.to_workers.clear()
    t[0] = 5.0  # silent for 5 s: quiet
    ex.provider.states["job0"] = JobStatus(JobState.CANCELLED, "walltime")
    watch_until(ep, t, lambda: "pool-a" not in s.pools)
    assert list(s.queue) == [rec(1)[m.T_ID]]
    assert s.tasks[rec(1)[m.T_ID]].retries == 1
    assert ep.blocks.block_errors == {}  # not an early failure: its pool had run


def early_failures(ep: Endpoint, ex: FakeExecutor, pool: str, blocks: list[str], text: str = "x") -> None:
    for b in blocks:
        ep.blocks.block_ended(ex, pool, b, failed_block(ep.run_dir, f"{pool}-{b}", text), None)


def test_after_max_early_failures_the_pools_tasks_fail_with_the_blocks_error(tmp_path):
    t = [0.0]
    ep = make_endpoint(tmp_path, t)
    blocks = [str(i) for i in range(MAX_EARLY_BLOCK_FAILURES)]
    ex = ep.executors["default"] = FakeExecutor(blocks, "job")
    s = ep.scheduler
    s.add_code({"sha256:f": b"\x10"})
    s.add_tasks([rec(1)])
    early_failures(ep, ex, "default", blocks[:-1], "boom")
    assert s.refused_pools == {} and ex.bad is None and s.results == []
    early_failures(ep, ex, "default", blocks[-1:], "worker_init: exit 3")
    assert isinstance(ex.bad, RuntimeError) and "cannot start workers" in str(ex.bad)
    (res,) = s.results
    assert res[m.R_STATE] == "failed"
    code, message = res[m.R_ERROR][:2]
    assert code == "lost"
    assert (
        f"endpoint 'ep' cannot start workers in pool 'default': {MAX_EARLY_BLOCK_FAILURES} blocks" in message
    )
    assert "worker_init: exit 3" in message
    assert ep.status()["failing"] == {"default": message}
    s.results.clear()
    s.add_tasks([rec(2)])  # and so does what comes later
    assert s.results[0][m.R_ERROR][:2] == ["lost", message]


def test_failures_must_be_in_a_row(tmp_path):
    """A pool that registers (its hello) restarts the count."""
    t = [0.0]
    ep = make_endpoint(tmp_path, t)
    ex = ep.executors["default"] = FakeExecutor([str(i) for i in range(2 * MAX_EARLY_BLOCK_FAILURES)], "job")
    ep.worker_sock = types.SimpleNamespace(send=lambda *a, **k: None)
    blocks = list(ex.blocks_to_job_id)
    early_failures(ep, ex, "default", blocks[: MAX_EARLY_BLOCK_FAILURES - 1])
    info = {"block_id": "default/9", "pool_name": "default"}
    ep._worker_hello(
        b"p:pool-z", m.Hello("pool", "pool-z", ep.pool_token, "pool-z", runtime_versions(), info)
    )
    assert "pool-z" in ep.scheduler.pools  # it did register
    early_failures(ep, ex, "default", blocks[MAX_EARLY_BLOCK_FAILURES - 1 : 2 * MAX_EARLY_BLOCK_FAILURES - 2])
    assert ep.scheduler.refused_pools == {} and ex.bad is None
    early_failures(ep, ex, "default", blocks[2 * MAX_EARLY_BLOCK_FAILURES - 2 :])
    assert list(ep.scheduler.refused_pools) == ["default"]


def test_a_failing_named_pool_does_not_stop_the_others(tmp_path):
    t = [0.0]
    ep = make_endpoint(tmp_path, t, pools={"gpu": {"pool": {"accelerators": ["0"]}}})
    cpu = ep.executors["default"] = FakeExecutor(["0"], "cpu")
    gpu = ep.executors["gpu"] = FakeExecutor([str(i) for i in range(MAX_EARLY_BLOCK_FAILURES)], "gpu")
    s = ep.scheduler
    s.add_pool(b"p:a", "pool-a", "default/0", {})
    s.add_worker(b"w:a.0", "a.0", "pool-a", pool_name="default")
    s.add_code({"sha256:f": b"\x10"})
    s.add_tasks([rec(1, {"gpus": 1})])
    early_failures(ep, gpu, "gpu", list(gpu.blocks_to_job_id), "no GPU partition")
    assert gpu.bad is not None and cpu.bad is None
    (res,) = s.results
    assert res[m.R_ERROR][0] == "lost" and "in pool 'gpu'" in res[m.R_ERROR][1]
    s.results.clear()
    s.add_tasks([rec(2), rec(3, {"gpus": 1})])  # a CPU task for the healthy default pool, a GPU one
    assert [r[m.R_ID] for r in s.results] == [rec(3)[m.T_ID]]
    s.dispatch()
    assert [ident for ident, _ in s.to_workers] == [b"w:a.0"]
    assert list(ep.status()["failing"]) == ["gpu"]


class CachingProvider:
    """Parsl providers' habit: a job seen terminal is never asked about again."""

    status_polling_interval = 60

    def __init__(self):
        self.resources = {"job0": {"status": JobStatus(JobState.COMPLETED)}}  # a false "missing" end
        self.truth = JobStatus(JobState.RUNNING)

    def status(self, job_ids):
        for j in job_ids:
            if not self.resources[j]["status"].terminal:
                self.resources[j]["status"] = self.truth
        return [self.resources[j]["status"] for j in job_ids]


def test_fresh_status_asks_past_the_cache_and_leaves_it_as_it_was(tmp_path):
    from dlhub.endpoint.engine import PoolExecutor

    provider = CachingProvider()
    ex = PoolExecutor(provider, tmp_path / "pool.json", 1, outstanding=lambda: 0, idle_blocks=list)
    ex.blocks_to_job_id["0"] = "job0"
    assert provider.status(["job0"])[0].state == JobState.COMPLETED  # what Parsl would believe
    assert [s.state for s in ex.fresh_status(["0"])] == [JobState.RUNNING]  # what is true
    assert provider.resources["job0"]["status"].state == JobState.COMPLETED  # cache untouched
    ex.mark_ended("0", JobStatus(JobState.FAILED))  # a confirmed end sticks in both views
    assert provider.resources["job0"]["status"].state == JobState.FAILED
    assert ex._status["0"].state == JobState.FAILED


def test_completed_for_a_block_that_never_registered_needs_the_long_grace(tmp_path):
    from dlhub.endpoint.blocks import UNSEEN_JOB_GRACE_S

    t = [0.0]
    ep = make_endpoint(tmp_path, t)
    ex = ep.executors["default"] = FakeExecutor(["0"], "job")
    ex.provider.states["job0"] = JobStatus(JobState.COMPLETED)  # maybe just unknown to sacct
    for _ in range(5):  # well past the normal 2-heartbeat confirmation
        ep.blocks.watch()
        t[0] += ep.config.heartbeat_s
    assert ep.blocks.block_errors == {} and ex._status["0"].state == JobState.RUNNING
    t[0] = UNSEEN_JOB_GRACE_S + 1
    ep.blocks.watch()
    assert "default/0" in ep.blocks.block_errors  # still "ended" half a minute on: believe it
