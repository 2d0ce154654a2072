"""Hundreds of different functions submitted at once all run (issue 11: the code race).

Each distinct function's code is asked of the manager when its first task arrives; a code reply
must only settle the digests its own request asked for. Before the fix, a reply to an early
request failed the tasks of every function asked for after it with ``function code ... is
unknown`` (seen as 9 of 50 and 101 of 200 failures).
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest

RESULT_TIMEOUT_S = 120


def distinct_functions(n: int, salt: int) -> list:
    """``n`` functions with different code (so different digests): each adds its own constant."""
    return [eval(f"lambda x: x + {salt * 100_000 + i}") for i in range(n)]  # noqa: S307


@pytest.mark.parametrize("round_", range(4))
def test_hundreds_of_distinct_functions_at_once_all_run(stack, round_):
    n = 250
    ex = stack.executor()
    try:
        fns = distinct_functions(n, round_ + 1)
        futures = [ex.submit(fn, 1) for fn in fns]
        cf.wait(futures, timeout=RESULT_TIMEOUT_S)
        errors = [f.exception(timeout=0) for f in futures if f.done() and f.exception(timeout=0)]
        assert not errors, f"{len(errors)} of {n} failed, e.g. {errors[0]!r}"
        assert [f.result(timeout=0) for f in futures] == [1 + (round_ + 1) * 100_000 + i for i in range(n)]
    finally:
        ex.shutdown(wait=False)
