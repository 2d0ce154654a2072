"""Endpoint configs mapped onto Parsl: every template loads, and each provider renders the submit
script and scheduler commands it should, through the dry-run seam (no scheduler is called)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from parsl.launchers import (
    AprunLauncher,
    MpiExecLauncher,
    SimpleLauncher,
    SingleNodeLauncher,
    SrunLauncher,
)

from dlhub.endpoint.cli import TEMPLATES
from dlhub.endpoint.config import ConfigError, EndpointConfig, load_config, parse_config, walltime_seconds
from dlhub.endpoint.engine import build_launcher, provider_kwargs, render_submit_script

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
POOL_CMD = "/opt/py/bin/python -m dlhub.endpoint.pool --config /run/pool-default.json --block-id default/0"


def endpoint(provider: dict, **extra) -> EndpointConfig:
    return parse_config(
        {"name": "t", "manager": {"address": "tcp://h:1", "token": "t"}, "provider": provider, **extra}
    )


def render(provider: dict, tmp_path: Path) -> tuple[str, list[str]]:
    return render_submit_script(endpoint(provider).provider, POOL_CMD, tmp_path / "scripts")


def directives(script: str, prefix: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if line.startswith(prefix)]


def submit_command(commands: list[str]) -> list[str]:
    """The sbatch/qsub command line, split into words."""
    (cmd,) = [c for c in commands if c.startswith(("sbatch", "qsub"))]
    return cmd.split()


# ---- templates -----------------------------------------------------------------------------------


def test_every_template_is_offered_by_configure_and_vice_versa():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(TEMPLATES)


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_loads_and_renders(template, tmp_path):
    cfg = load_config(CONFIGS / f"{template}.yaml")
    assert cfg.manager.token == "CHANGE-ME"  # templates never ship a real token
    for named in cfg.all_pools().values():
        if named.pool.accelerators:
            assert named.pool.workers_per_node == len(named.pool.accelerators)
        script, commands = render_submit_script(named.provider, POOL_CMD, tmp_path / template)
        assert POOL_CMD in script
        if named.provider.type == "local":
            assert commands == []
        else:
            assert submit_command(commands)[0] in ("sbatch", "qsub")
        if named.provider.worker_init.strip():  # strict: a failing line ends the block
            assert f"set -e\n{named.provider.worker_init}\nset +e" in script


# ---- Slurm ---------------------------------------------------------------------------------------


def test_slurm_directives_on_shared_nodes(tmp_path):
    script, commands = render(
        {
            "type": "slurm",
            "partition": "gpu-shared",
            "account": "proj42",
            "qos": "normal",
            "constraint": "a100",
            "walltime": "01:30:00",
            "cores_per_node": 16,
            "mem_per_node_gb": 64,
            "gpus_per_node": 2,
            "exclusive": False,
            "nodes_per_block": 2,
            "scheduler_options": "#SBATCH --reservation=dlhub",
            "launcher": {"type": "srun", "overrides": "--cpu-bind=none"},
        },
        tmp_path,
    )
    sb = directives(script, "#SBATCH")
    for expected in (
        "#SBATCH --partition=gpu-shared",
        "#SBATCH --account=proj42",
        "#SBATCH --qos=normal",
        "#SBATCH --constraint=a100",
        "#SBATCH --time=90",  # Parsl writes minutes
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --mem=64g",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --nodes=2",
        "#SBATCH --reservation=dlhub",
    ):
        assert expected in sb, (expected, sb)
    assert "#SBATCH --exclusive" not in sb  # shared nodes
    # the launcher starts one pool per node with srun, with the overrides
    (srun,) = [ln for ln in script.splitlines() if ln.startswith("srun ")]
    assert "--ntasks 2" in srun and "--cpu-bind=none" in srun
    # the scheduler commands Parsl would run, recorded by the seam: sbatch on the script
    sbatch = submit_command(commands)
    assert sbatch[0] == "sbatch" and Path(sbatch[-1]).read_text() == script
    assert Path(sbatch[-1]).parent == tmp_path / "scripts"


def test_slurm_exclusive_by_default_and_unset_keys_leave_no_directive(tmp_path):
    script, _ = render({"type": "slurm", "partition": "debug"}, tmp_path)
    sb = directives(script, "#SBATCH")
    assert "#SBATCH --exclusive" in sb
    assert "#SBATCH --time=30" in sb  # the default walltime, 00:30:00
    for absent in ("--account", "--qos", "--constraint", "--cpus-per-task", "--mem", "--gpus-per-node"):
        assert not any(absent in d for d in sb), (absent, sb)


def test_slurm_worker_init_is_strict_and_before_the_launcher(tmp_path):
    script, _ = render(
        {
            "type": "slurm",
            "worker_init": "module load python\nsource ~/env/bin/activate",
            "launcher": {"type": "srun"},
        },
        tmp_path,
    )
    lines = script.splitlines()
    start = lines.index("set -e")
    assert lines[start + 1 : start + 4] == ["module load python", "source ~/env/bin/activate", "set +e"]
    assert start < next(i for i, ln in enumerate(lines) if ln.startswith("srun "))


# ---- PBS Pro and Torque ------------------------------------------------------------------------


def test_pbspro_select_walltime_and_qsub(tmp_path):
    script, commands = render(
        {
            "type": "pbspro",
            "queue": "debug",
            "account": "MyProject",
            "cpus_per_node": 32,
            "select_options": ":ngpus=4",
            "nodes_per_block": 2,
            "walltime": "01:00:00",
            "scheduler_options": "#PBS -l filesystems=home:eagle",
            "worker_init": "module load conda",
            "launcher": {"type": "mpiexec", "bind_cmd": "--cpu-bind", "overrides": "--ppn 1"},
        },
        tmp_path,
    )
    pbs = directives(script, "#PBS")
    assert "#PBS -l select=2:ncpus=32:ngpus=4" in pbs
    assert "#PBS -l walltime=01:00:00" in pbs
    assert "#PBS -l filesystems=home:eagle" in pbs
    assert "set -e\nmodule load conda\nset +e" in script
    assert any(ln.startswith("mpiexec ") and "--ppn 1" in ln for ln in script.splitlines())
    qsub = submit_command(commands)
    assert qsub[0] == "qsub"
    assert qsub[qsub.index("-q") + 1] == "debug" and qsub[qsub.index("-A") + 1] == "MyProject"
    assert Path(qsub[-1]).read_text() == script


def test_pbspro_without_queue_or_account_passes_neither(tmp_path):
    script, commands = render({"type": "pbspro"}, tmp_path)
    assert "#PBS -l select=1:ncpus=1" in directives(script, "#PBS")
    qsub = submit_command(commands)
    assert "-q" not in qsub and "-A" not in qsub


def test_torque_nodes_walltime_and_qsub(tmp_path):
    script, commands = render(
        {
            "type": "torque",
            "queue": "batch",
            "account": "acct7",
            "walltime": "02:00:00",
            "worker_init": "source /opt/env",
        },
        tmp_path,
    )
    pbs = directives(script, "#PBS")
    assert "#PBS -l walltime=02:00:00" in pbs
    assert "#PBS -l nodes=1:ppn=1" in pbs
    assert "set -e\nsource /opt/env\nset +e" in script
    qsub = submit_command(commands)
    assert qsub[0] == "qsub"
    assert qsub[qsub.index("-q") + 1] == "batch" and qsub[qsub.index("-A") + 1] == "acct7"
    assert Path(qsub[-1]).read_text() == script


def test_the_seam_runs_no_real_scheduler_command(tmp_path, monkeypatch):
    """A fake sbatch/qsub first on PATH would leave a mark if anything ran it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marks = tmp_path / "ran"
    for tool in ("sbatch", "qsub", "sacct", "squeue", "qstat"):
        exe = bin_dir / tool
        exe.write_text(f"#!/bin/sh\necho {tool} >> {marks}\necho 'Submitted batch job 1'\n")
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for provider in ({"type": "slurm"}, {"type": "pbspro"}, {"type": "torque"}):
        _, commands = render(provider, tmp_path / provider["type"])
        assert commands  # recorded...
    assert not marks.exists()  # ...never run


# ---- local -------------------------------------------------------------------------------------


def test_local_render_has_the_pool_command_and_no_scheduler(tmp_path):
    script, commands = render({"type": "local"}, tmp_path)
    assert commands == [] and POOL_CMD in script


def test_local_render_shows_worker_init_as_it_will_run(tmp_path):
    """LocalProvider runs worker_init wrapped strictly (provider_kwargs); `check` shows that."""
    script, _ = render({"type": "local", "worker_init": "source /opt/env"}, tmp_path)
    assert "set -e\nsource /opt/env\nset +e" in script
    assert script.index("set +e") < script.index(POOL_CMD)


# ---- provider_kwargs and launchers ---------------------------------------------------------------


def test_provider_kwargs_wrap_worker_init_strictly_and_leave_blank_alone():
    kw = provider_kwargs(endpoint({"type": "local", "worker_init": "exit 3"}).provider)
    assert kw["worker_init"] == "set -e\nexit 3\nset +e"
    assert provider_kwargs(endpoint({"type": "local", "worker_init": "  "}).provider)["worker_init"] == ""
    # local takes no batch keys
    assert "walltime" not in kw and "partition" not in kw


def test_provider_kwargs_map_every_slurm_key():
    kw = provider_kwargs(
        endpoint(
            {
                "type": "slurm",
                "partition": "p",
                "mem_per_node_gb": 8,
                "cmd_timeout_s": 45,
                "exclusive": False,
                "init_blocks": 0,
                "max_blocks": 3,
            }
        ).provider
    )
    assert kw["partition"] == "p" and kw["mem_per_node"] == 8 and kw["cmd_timeout"] == 45
    assert kw["exclusive"] is False and kw["init_blocks"] == 0 and kw["max_blocks"] == 3
    assert kw["walltime"] == "00:30:00"


@pytest.mark.parametrize(
    "launcher, cls",
    [
        ({"type": "single-node"}, SingleNodeLauncher),
        ({"type": "simple"}, SimpleLauncher),
        ({"type": "srun", "overrides": "--exclusive"}, SrunLauncher),
        ({"type": "mpiexec", "bind_cmd": "--cpu-bind", "overrides": "--ppn 1"}, MpiExecLauncher),
        ({"type": "aprun", "overrides": "-cc none"}, AprunLauncher),
    ],
)
def test_build_launcher(launcher, cls):
    built = build_launcher(endpoint({"type": "local", "launcher": launcher}).provider.launcher)
    assert type(built) is cls
    if "overrides" in launcher:
        assert built.overrides == launcher["overrides"]
    if launcher["type"] == "mpiexec":
        assert built.bind_cmd == "--cpu-bind"


# ---- walltime with days --------------------------------------------------------------------------


def test_walltime_seconds():
    assert walltime_seconds("1-02:03:04") == 86400 + 2 * 3600 + 3 * 60 + 4
    assert walltime_seconds("00:30:00") == 1800
    assert walltime_seconds("100:00:00") == 360000


def test_slurm_walltime_with_days_renders(tmp_path):
    """Parsl's Slurm provider reads HH:MM:SS only: a D-HH:MM:SS walltime reaches it in hours."""
    assert provider_kwargs(endpoint({"type": "slurm", "walltime": "1-02:03:04"}).provider)["walltime"] == (
        "26:03:04"
    )
    script, _ = render({"type": "slurm", "walltime": "1-02:03:04"}, tmp_path)
    times = [d for d in directives(script, "#SBATCH") if d.startswith("#SBATCH --time=")]
    assert times == ["#SBATCH --time=1563"]  # minutes (Parsl drops the seconds)


def test_pbs_walltime_with_days_is_in_hours(tmp_path):
    for kind in ("pbspro", "torque"):
        script, _ = render({"type": kind, "walltime": "1-02:03:04"}, tmp_path / kind)
        assert "#PBS -l walltime=26:03:04" in directives(script, "#PBS"), kind
    # plain HH:MM:SS passes through unchanged, even past 99 hours
    script, _ = render({"type": "pbspro", "walltime": "120:00:00"}, tmp_path / "long")
    assert "#PBS -l walltime=120:00:00" in directives(script, "#PBS")


def test_walltime_pattern_rejects_minutes_only():
    with pytest.raises(ConfigError, match=re.escape("provider.walltime: expected HH:MM:SS or D-HH:MM:SS")):
        endpoint({"type": "slurm", "walltime": "90"})
