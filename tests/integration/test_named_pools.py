"""Named pools end to end: an endpoint with a default pool and a ``gpu`` pool (two "devices",
both local blocks); ``Executor(resources=...)`` routes tasks, and each GPU worker sees only its
own device in every vendor's variable."""

from __future__ import annotations

import pytest
from conftest import wait_until

from dlhub.executor import ResourceUnavailable

RESULT_TIMEOUT_S = 30
VARS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")


def device_env():
    import os

    return {
        v: os.environ.get(v) for v in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")
    }


def meet(folder: str, expected: int, limit_s: float = 20.0):
    """Check in under this worker's device, wait (bounded) until ``expected`` tasks have, and
    return this worker's variables: tasks that meet ran at the same time on different workers."""
    import os
    import time

    device = os.environ.get("CUDA_VISIBLE_DEVICES")
    open(os.path.join(folder, f"{device}.{os.getpid()}"), "w").close()
    deadline = time.monotonic() + limit_s
    while len(os.listdir(folder)) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {os.listdir(folder)} checked in")
        time.sleep(0.01)
    return {
        v: os.environ.get(v) for v in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")
    }


@pytest.fixture
def two_pools(custom_stack_factory, monkeypatch):
    for var in VARS:  # the endpoint inherits our environment: start from none set
        monkeypatch.delenv(var, raising=False)
    cs = custom_stack_factory(
        name="pools",
        workers=1,
        endpoint={
            "heartbeat_s": 0.5,
            "heartbeat_threshold_s": 5.0,
            "pools": {"gpu": {"provider": {"type": "local"}, "pool": {"accelerators": ["0", "1"]}}},
        },
    )
    # one default worker and one per device
    wait_until(lambda: cs.status().get("workers", 0) >= 3, 60, what="the gpu pool's workers")
    return cs


def test_tasks_go_to_the_pool_that_offers_their_resources(two_pools, tmp_path):
    cs = two_pools
    gpu = cs.executor(resources={"gpus": 1})
    plain = cs.executor()
    # two GPU tasks at once run on the two GPU workers, one device each
    folder = tmp_path / "meet"
    folder.mkdir()
    futs = [gpu.submit(meet, str(folder), 2) for _ in range(2)]
    seen = [f.result(RESULT_TIMEOUT_S) for f in futs]
    assert sorted(env["CUDA_VISIBLE_DEVICES"] for env in seen) == ["0", "1"]
    for env in seen:
        assert env["ROCR_VISIBLE_DEVICES"] == env["ZE_AFFINITY_MASK"] == env["CUDA_VISIBLE_DEVICES"]
    # more GPU tasks: always a single device, never the default pool's worker
    for env in [f.result(RESULT_TIMEOUT_S) for f in [gpu.submit(device_env) for _ in range(6)]]:
        assert env["CUDA_VISIBLE_DEVICES"] in {"0", "1"}
        assert env["ROCR_VISIBLE_DEVICES"] == env["ZE_AFFINITY_MASK"] == env["CUDA_VISIBLE_DEVICES"]
    # plain tasks run in the default pool, whose workers get no device variables
    for env in [f.result(RESULT_TIMEOUT_S) for f in [plain.submit(device_env) for _ in range(4)]]:
        assert env == dict.fromkeys(VARS)
    # a task may name the pool instead
    by_name = cs.executor(resources={"pool": "gpu"}).submit(device_env).result(RESULT_TIMEOUT_S)
    assert by_name["CUDA_VISIBLE_DEVICES"] in {"0", "1"}
    # status.json is rewritten every heartbeat: wait for a snapshot taken after the last task
    status = wait_until(
        lambda: (s := cs.status()).get("queued_by_pool") == {"default": 0, "gpu": 0} and s,
        10,
        what="a status snapshot with both pools' queues empty",
    )
    assert set(status["blocks"]) == {"default", "gpu"}

    # requests no pool can meet fail at once, naming the pools
    with pytest.raises(ResourceUnavailable) as info:
        cs.executor(resources={"gpus": 2}).submit(device_env).result(RESULT_TIMEOUT_S)
    assert "no pool offers" in str(info.value) and "gpus" in str(info.value)
    assert "default" in str(info.value) and "gpu" in str(info.value)
    with pytest.raises(
        ResourceUnavailable, match=r"no pool named 'tpu' at this endpoint \(pools: default, gpu\)"
    ):
        cs.executor(resources={"pool": "tpu"}).submit(device_env).result(RESULT_TIMEOUT_S)
    # the endpoint goes on serving what it can
    assert gpu.submit(device_env).result(RESULT_TIMEOUT_S)["CUDA_VISIBLE_DEVICES"] in {"0", "1"}


@pytest.mark.parametrize(
    "resources, problem",
    [
        ({"gpu": 1}, "unknown key 'gpu'"),
        ({"gpus": 1.5}, "gpus must be int"),
        ({"gpus": True}, "gpus must be int"),
        ({"cores": -1}, "cores must not be negative"),
        ({"pool": 3}, "pool must be str"),
    ],
)
def test_bad_resources_are_refused_when_the_executor_is_made(resources, problem):
    from dlhub.executor import Executor

    # refused before any connection is tried: this manager address does not exist
    with pytest.raises(ValueError, match=f"resources: {problem}"):
        Executor("anywhere", manager="tcp://127.0.0.1:9", token="t", resources=resources)
