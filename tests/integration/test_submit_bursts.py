"""Bursts of submits back to back, as a benchmark or a parameter sweep sends them: each burst's
results come within the time of its work, never at the I/O thread's poll timeout.

A lost wake-up (executor/_wakeup.py: a drain that lowered its flag before reading) once left
the Executor's I/O thread asleep until its 2 s poll timeout for every later send: bursts of 300
no-op calls took 2.0 s each instead of ~0.02 s, and benchmarks/batching.py measured ~127 calls/s
for every configuration. Alternating a servable and a function without pauses, the pattern that
hit it within two rounds here.
"""

from __future__ import annotations

import statistics
import time

from conftest import meta

BURST = 300
ROUNDS = 6


def echo(x):
    return x


def test_bursts_of_submits_are_answered_without_waiting_for_a_poll_timeout(ex, client, name):
    from dlhub.executor import Servable

    ref = client.publish(Servable.from_function(echo, **meta(name)))
    ex.submit(ref, -1).result(60)  # loaded at a worker: the rounds below measure the path only
    ex.submit(echo, -1).result(60)
    took: list[float] = []
    for r in range(ROUNDS):
        for target in (ref, echo):
            start = time.perf_counter()
            futures = [ex.submit(target, (r, i)) for i in range(BURST)]
            assert [f.result(60) for f in futures] == [(r, i) for i in range(BURST)]
            took.append(time.perf_counter() - start)
    # the bug made every burst after the first few take the poll timeout (2 s); a burst of 300
    # no-ops takes ~0.02 s here, and a loaded CI machine stays far below 1 s at the median
    assert statistics.median(took) < 1.0, [round(t, 3) for t in took]
