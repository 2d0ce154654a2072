"""Progress where users wait: ``Executor.map(progress=True)``, ``dlhub.executor.progress`` /
``as_completed``, ``dlhub up`` saying what it waits for (and where the examples' log is), and
``dlhub publish`` showing the verification stage. Under pytest stderr is not a terminal, so the
progress shows as plain lines and a one-line summary (what a batch job's log gets)."""

from __future__ import annotations

import re
import textwrap

import pytest
from conftest import Stack, dlhub_cli, stop_stack, wait_until

from dlhub.executor import as_completed, progress

RESULT_TIMEOUT_S = 60


def square(x):
    return x * x


def sleep_then_return(seconds, value):
    import time

    time.sleep(seconds)
    return value


def fail_on_zero(x):
    import time

    if x == 0:
        raise ValueError("zero")
    time.sleep(x)
    return x


def test_map_with_progress_counts_results_as_they_arrive_and_keeps_order(ex, capsys):
    results = ex.map(square, range(200), progress=True)
    # nothing consumed yet: the bar still reaches the end, because it counts arrivals
    wait_until(lambda: "200/200 done" in capsys.readouterr().err, RESULT_TIMEOUT_S, what="the summary")
    assert list(results) == [x * x for x in range(200)]
    assert list(ex.map(square, range(50))) == [x * x for x in range(50)]
    assert capsys.readouterr().err == ""  # progress is opt-in


def test_map_progress_summary_names_the_function_rate_and_failures(ex, capsys):
    with pytest.raises(ValueError, match="zero"):
        list(ex.map(fail_on_zero, [0, 2, 2], progress=True))  # fails first, the others still run
    err = capsys.readouterr().err
    assert re.search(r"map fail_on_zero: stopped at [0-2]/3 after [\d.]+ s \([\d.,?]+/s\)", err), err
    ok = list(ex.map(square, range(20), progress=True))
    assert ok == [x * x for x in range(20)]
    err = capsys.readouterr().err
    assert re.search(r"^map square: 20/20 done in [\d.]+ s \([\d.,]+/s\)$", err, re.M), err


def test_progress_helper_yields_every_future_once_as_it_completes(ex, capsys):
    delays = [0.6, 0.0, 0.3, 0.0, 0.0, 0.2]
    futures = [ex.submit(sleep_then_return, d, i) for i, d in enumerate(delays)]
    futures.append(ex.submit(fail_on_zero, 0))
    seen = list(progress(futures + futures[:3], description="naps"))  # duplicates count once
    assert len(seen) == len(futures) and set(seen) == set(futures)
    assert seen[-1] is futures[0] or seen.index(futures[0]) > seen.index(futures[1])  # completion order
    err = capsys.readouterr().err
    assert f"naps: {len(futures)}/{len(futures)} done in" in err and "1 failed" in err, err
    again = [ex.submit(square, i) for i in range(30)]
    assert sorted(f.result() for f in as_completed(again, timeout=RESULT_TIMEOUT_S)) == sorted(
        i * i for i in range(30)
    )
    assert capsys.readouterr().err == ""  # as_completed without progress stays silent


def test_dlhub_up_says_what_it_waits_for_and_where_the_examples_log_is(tmp_path_factory):
    home = tmp_path_factory.mktemp("up-progress")
    stack = Stack(home)
    try:
        up = dlhub_cli("up", "--home", str(home), "--workers", "2", "--detach")
        out = up.stdout
        assert up.returncode == 0, out + up.stderr
        assert re.search(r"starting the manager on free ports", out), out
        assert re.search(r"manager up in [\d.]+ s: clients tcp://127\.0\.0\.1:\d+, endpoints tcp://", out)
        assert "starting endpoint 'local' with 2 workers" in out, out
        assert re.search(r"workers registered: [01]/2", out), out  # while it waited
        assert re.search(r"endpoint 'local' up in [\d.]+ s: 2/2 workers registered", out), out
        assert f"log: {home.resolve() / 'examples.log'}" in out and "does not wait" in out, out
        # `dlhub status` follows the background publishing (the examples' own state file)
        status = wait_until(
            lambda: (
                (p := dlhub_cli("status", "--home", str(home))).returncode == 0
                and re.search(r"examples: [1-9]/6 published", p.stdout)
                and p.stdout
            ),
            120,
            what="an example published",
        )
        assert "examples.log" in status or "published" in status
        again = dlhub_cli("up", "--home", str(home), "--detach")
        assert "manager already running" in again.stdout, again.stdout
    finally:
        stop_stack(stack)


def test_dlhub_publish_shows_the_upload_and_the_verification_stage(stack, tmp_path, name):
    source = tmp_path / "progress_fns.py"
    source.write_text(
        textwrap.dedent(
            '''
            def double_it(x):
                """Twice x."""
                return 2 * x
            '''
        )
    )
    p = stack.cli(
        "publish", f"{source}:double_it", "--name", name, "--example", "[[2], 4]", "--example", "[[3], 6]"
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip() == f"admin/{name}:1"  # stdout stays the ref alone (scripts read it)
    err = p.stderr
    assert re.search(r"uploading 1 file \([\d.]+ (bytes|kB|MB)\)", err), err
    assert "verifying on endpoint local: loading, running 2 examples" in err, err
    assert re.search(rf"admin/{name}:1 ready: verified on local in [\d.]+ s", err), err


def test_map_progress_closes_when_the_caller_is_interrupted(ex, capsys):
    results = ex.map(sleep_then_return, [0, 0.5, 0.5, 0.5, 0.5], range(5), progress=True)
    with pytest.raises(KeyboardInterrupt):
        for value in results:
            assert value == 0
            raise KeyboardInterrupt  # Ctrl-C while the others still run
    results.close()  # what dropping the iterator does
    err = capsys.readouterr().err
    assert re.search(r"^map sleep_then_return: stopped at [1-4]/5 after", err, re.M), err
