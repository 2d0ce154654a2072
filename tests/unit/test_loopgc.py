"""protocol/loopgc.py: full collections run from the loop, on its schedule (issue 10, item 7)."""

from __future__ import annotations

import gc
import weakref

import pytest

from dlhub.protocol.loopgc import LoopGC


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Node:
    """An object in a reference cycle: only a (full) collection frees it."""

    def __init__(self) -> None:
        self.me = self


def _cycle_in_oldest_generation() -> weakref.ref:
    node = Node()
    ref = weakref.ref(node)
    # still referenced through two young collections: it moves to the oldest generation, where
    # only a full collection looks once it is garbage
    gc.collect(0)
    gc.collect(1)
    del node
    return ref


def test_automatic_full_collections_are_off_while_open_and_back_after():
    before = gc.get_threshold()
    loop_gc = LoopGC()
    try:
        young, middle, oldest = gc.get_threshold()
        assert (young, middle) == before[:2]
        assert oldest > 10**8  # no count of young collections reaches it
    finally:
        loop_gc.close()
    assert gc.get_threshold() == before


def test_thresholds_come_back_only_when_the_last_loop_closes():
    before = gc.get_threshold()
    first, second = LoopGC(), LoopGC()
    first.close()
    assert gc.get_threshold()[2] > 10**8  # the second loop still runs
    first.close()  # closing twice changes nothing
    assert gc.get_threshold()[2] > 10**8
    second.close()
    assert gc.get_threshold() == before


def test_idle_turns_collect_at_most_every_idle_interval():
    clock = Clock()
    loop_gc = LoopGC(idle_every_s=30, every_s=120, clock=clock)
    try:
        assert loop_gc.tick(idle=True) is None  # just opened
        clock.now += 29.9
        assert loop_gc.tick(idle=True) is None
        clock.now += 0.2
        took = loop_gc.tick(idle=True)
        assert took is not None and took >= 0
        assert loop_gc.collections == 1
        assert loop_gc.tick(idle=True) is None  # the interval starts again
    finally:
        loop_gc.close()


def test_busy_turns_collect_only_when_overdue():
    clock = Clock()
    loop_gc = LoopGC(idle_every_s=30, every_s=120, clock=clock)
    try:
        clock.now += 119
        assert loop_gc.tick(idle=False) is None  # busy, not overdue: no pause now
        clock.now += 2
        assert loop_gc.tick(idle=False) is not None  # overdue: collected anyway
        assert loop_gc.collections == 1
    finally:
        loop_gc.close()


def test_a_reference_cycle_is_freed_by_the_loops_collection():
    clock = Clock()
    loop_gc = LoopGC(idle_every_s=1, every_s=5, clock=clock)
    try:
        gc.collect()
        ref = _cycle_in_oldest_generation()
        assert ref() is not None
        # enough surviving containers that CPython would run a full collection on its own
        keep = [[i] for i in range(400_000)]
        assert ref() is not None  # it did not: only the loop's collection frees the cycle
        del keep
        clock.now += 1.5
        loop_gc.tick(idle=True)
        assert ref() is None
    finally:
        loop_gc.close()


@pytest.mark.parametrize("idle_every_s, every_s", [(0, 10), (-1, 10), (20, 10)])
def test_bad_intervals_are_refused(idle_every_s, every_s):
    with pytest.raises(ValueError, match="idle_every_s"):
        LoopGC(idle_every_s=idle_every_s, every_s=every_s)
