"""A hung scheduler status command is reported in `dlhub status` (issue 11, item 3: "the stall
is reported instead of felt"): the endpoint's heartbeat carries, per pool, how long its provider
query has been running and when it last answered; the manager passes it on and the CLI (a real
process) prints "provider query hanging for N s". The endpoint, its slurm pool (stand-in
commands on PATH, from test_provider_stall) and the hung ``sacct`` are real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import wait_until
from test_provider_stall import fake_slurm, stalled_endpoint_config

STALL_S = 6


def dlhub_status(cs, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DLHUB_MANAGER": cs.manager.client_url, "DLHUB_TOKEN": cs.token, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "dlhub.executor.cli", "status", "--home", str(cs.home), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def stuck_pool(cs) -> dict:
    """The manager's view (through `dlhub status --json`) of the ``stuck`` pool's provider."""
    out = dlhub_status(cs, "--json", "--endpoint", cs.endpoint_name)
    info = json.loads(out.stdout)["endpoints"][cs.endpoint_name]["info"]
    return (info.get("provider") or {}).get("stuck") or {}


def test_a_hung_provider_status_command_is_reported_in_dlhub_status(
    custom_stack_factory, tmp_path, monkeypatch
):
    state = tmp_path / "fake-slurm"
    state.mkdir()
    monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    cs = custom_stack_factory(endpoint=stalled_endpoint_config(), workers=1)
    wait_until(lambda: stuck_pool(cs).get("last_ok_age_s") is not None, 15, what="a first answer from sacct")
    (state / "stall").write_text(str(STALL_S))
    wait_until(lambda: (state / "stalled").exists(), 10, what="the endpoint to ask sacct about the block")
    wait_until(
        lambda: (stuck_pool(cs).get("query_running_for_s") or 0) > 1.5,
        STALL_S - 1,
        what="the manager's status to show the hung query",
    )
    assert not (state / "stall-over").exists(), "the stall ended before it was reported"
    human = dlhub_status(cs, "--endpoint", cs.endpoint_name)
    assert "pool stuck: provider query hanging for" in human.stdout, human.stdout
    (state / "stall").unlink()
    wait_until(lambda: (state / "stall-over").exists(), STALL_S + 5, what="the hung sacct to end")

    def answering_again() -> bool:
        pool = stuck_pool(cs)
        return pool.get("query_running_for_s") is None and (pool.get("last_ok_age_s") or 99) < 3

    wait_until(answering_again, 10, what="the status to show the provider answering again")
    assert "provider query hanging" not in dlhub_status(cs, "--endpoint", cs.endpoint_name).stdout
