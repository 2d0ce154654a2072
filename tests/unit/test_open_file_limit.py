"""The manager raises its soft open-file limit (one descriptor per connected endpoint/client)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _in_child(soft: int, hard: int, wanted: int = 65536) -> str:
    """Run raise_open_file_limit in a child whose limits start at (soft, hard); its report."""
    code = textwrap.dedent(
        f"""
        import logging, resource
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
        from dlhub.manager.connections import raise_open_file_limit
        returned = raise_open_file_limit({wanted})
        print("result", returned, *resource.getrlimit(resource.RLIMIT_NOFILE))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_soft_limit_is_raised_to_the_hard_limit():
    out = _in_child(512, 8192)
    assert "result 8192 8192 8192" in out
    assert "raised from 512 to 8192" in out
    assert "WARNING" not in out


def test_soft_limit_is_raised_at_most_to_the_wanted_ceiling():
    out = _in_child(1024, 8192, wanted=6000)
    assert "result 6000 6000 8192" in out


def test_a_low_hard_limit_is_kept_and_named_in_a_warning():
    out = _in_child(1024, 1024)
    assert "result 1024 1024 1024" in out
    assert "WARNING open-file limit is 1024" in out
    assert "LimitNOFILE" in out
