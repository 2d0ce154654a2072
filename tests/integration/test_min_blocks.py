"""A pool killed while idle is replaced: the endpoint keeps ``min_blocks`` blocks. Parsl's
``simple`` strategy takes no action below ``min_blocks`` when no task is outstanding, and the
manager sends no work to an endpoint with no workers, so without our top-up an endpoint whose
only block ended while idle stayed empty for good (found by the kill -9 soak). And a pool lost to
missed heartbeats before its block read as ended is not an early failure ("check worker_init"):
three of those in a row used to refuse the pool. Real endpoint, LocalProvider blocks, workers."""

from __future__ import annotations

import os
import signal

from conftest import pool_pids, wait_until

TIMEOUT_S = 60


def kill_idle_pool_and_wait_for_another(cs) -> int:
    (old,) = wait_until(lambda: pool_pids(cs.endpoint_dir), TIMEOUT_S, what="the pool process")
    assert cs.status()["outstanding"] == 0, "the pool must be idle for this test"
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: cs.status().get("workers", 0) == 0, TIMEOUT_S, what="the killed pool to be noticed")
    new = wait_until(
        lambda: [p for p in pool_pids(cs.endpoint_dir) if p != old] and cs.status().get("workers", 0) >= 1,
        TIMEOUT_S,
        what="a replacement pool with a worker (min_blocks: 1)",
    )
    assert new
    return old


def test_idle_pools_killed_again_and_again_are_replaced_and_never_blamed_on_worker_init(
    custom_stack_factory,
):
    cs = custom_stack_factory(
        endpoint={
            # heartbeats short enough that the pool is dropped (3 s of silence) before its block's
            # end is confirmed by the provider (quiet for 2 s, then terminal across 2 s)
            "heartbeat_s": 1.0,
            "heartbeat_threshold_s": 3.0,
            "strategy_period_s": 1.0,
            "provider": {"type": "local", "init_blocks": 1, "min_blocks": 1, "max_blocks": 1},
        },
        name="minblocks",
    )
    ex = cs.executor()
    assert ex.submit(pow, 2, 5).result(TIMEOUT_S) == 32
    for _ in range(3):  # MAX_EARLY_BLOCK_FAILURES of them in a row
        wait_until(lambda: cs.status()["outstanding"] == 0, TIMEOUT_S, what="the endpoint to be idle")
        kill_idle_pool_and_wait_for_another(cs)
    assert ex.submit(pow, 3, 4).result(TIMEOUT_S) == 81
    status = cs.status()
    assert status["block_errors"] == {} and status["failing"] == {}, status
    log = (cs.endpoint_dir / "endpoint.log").read_text()
    assert "before its pool started" not in log
    assert log.count("after its pool was lost") + log.count("its tasks were re-queued") >= 3, log[-3000:]
    assert log.count("min_blocks is 1: starting 1") >= 3, log[-3000:]
