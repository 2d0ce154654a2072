"""Batched calls are fair between users (issue 10, item 7): a vectorized servable's calls wait at
the endpoint in a FIFO per user and each batch takes the users in turn, so bob's single call
rides in one of the next batches while alice has hundreds waiting, not after all of them.

A manager in this process, an endpoint process with one worker (policy: alice and bob), a
public vectorized servable that logs each batch's inputs (alice's are >= 0, bob's is -1).
"""

from __future__ import annotations

import pytest
from conftest import RESULT_TIMEOUT_S, meta, start_custom_stack, stop_custom_stack, wait_until

from dlhub.executor import Client, Servable
from dlhub.manager.auth import create_user, users_generation

ALICE_CALLS = 240
BATCH = 8


def logged_batches(log: str, seconds: float):
    def run(xs):
        import time

        with open(log, "a") as f:
            f.write(" ".join(str(x) for x in xs) + "\n")
        time.sleep(seconds)
        return [x * 2 for x in xs]

    return run


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cs = start_custom_stack(
        tmp_path_factory.mktemp("dlhub-batch-fair"),
        endpoint={"policy": {"allowed_users": ["alice", "bob"]}},
        workers=1,
    )
    engine = cs.manager.auth.engine
    cs.tokens = {"alice": create_user(engine, "alice"), "bob": create_user(engine, "bob")}
    wait_until(lambda: cs.manager.auth.generation == users_generation(engine), 10, what="the new users")
    try:
        yield cs
    finally:
        stop_custom_stack(cs)


def test_bobs_batched_call_does_not_wait_behind_alices_flood(hub, tmp_path):
    log = tmp_path / "batches.log"
    servable = Servable.from_function(
        logged_batches(str(log), 0.05),
        **meta("fair-vec", vectorized=True, batching={"max_batch_size": BATCH, "max_batch_delay_ms": 0}),
    )
    ref = Client(hub.manager.api.url, hub.token).publish(servable)
    alice = hub.executor(token=hub.tokens["alice"])
    bob = hub.executor(token=hub.tokens["bob"])
    assert bob.submit(ref, 5).result(RESULT_TIMEOUT_S) == 10  # warm: the servable is loaded
    log.write_text("")

    futures = [alice.submit(ref, x) for x in range(ALICE_CALLS)]
    wait_until(lambda: len(log.read_text().splitlines()) >= 2, 30, what="alice's batches to run")
    mine = bob.submit(ref, -1)
    assert mine.result(RESULT_TIMEOUT_S) == -2
    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [2 * x for x in range(ALICE_CALLS)]

    batches = [[int(x) for x in line.split()] for line in log.read_text().splitlines()]
    assert sorted(x for b in batches for x in b) == [-1, *range(ALICE_CALLS)]  # each call ran once
    bobs = next(i for i, b in enumerate(batches) if -1 in b)
    # FIFO would run it after all of alice's calls (batch ~30 of 31); in turn: within a few
    assert bobs <= 6, f"bob's call ran in batch {bobs} of {len(batches)}: {batches[: bobs + 1]}"
