"""Globus Compute endpoint config -> dlhub endpoint config (issue 13, item 6): every vendored
example migrates to a file dlhub's own validation loads; what maps keeps its source key in a
comment, what does not is listed; bad input fails naming the key and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dlhub.endpoint.cli import main
from dlhub.endpoint.config import load_config, parse_config
from dlhub.endpoint.gc_migrate import MigrationError, migrate

DATA = Path(__file__).resolve().parents[1] / "data" / "globus_compute_configs"
MIGRATABLE = sorted(
    p
    for p in DATA.iterdir()
    if p.name not in ("README.md", "package_default_config.yaml", "theta_cobalt.yaml")
)


def run(name: str):
    path = DATA / name
    return migrate(path.read_text(), "ep", source=str(path))


def loaded(name: str):
    return parse_config(yaml.safe_load(run(name).text))


@pytest.mark.parametrize("path", MIGRATABLE, ids=lambda p: p.name)
def test_every_example_migrates_to_a_valid_dlhub_config(path, tmp_path):
    migration = migrate(path.read_text(), "ep", source=str(path))
    out = tmp_path / "config.yaml"
    out.write_text(migration.text)
    config = load_config(out)  # dlhub's own validation, from the file as written
    assert config.name == "ep"
    for line in migration.text.splitlines():
        if (
            line.startswith("  ")
            and not line.lstrip().startswith(("address:", "token:", "#"))
            and not line.endswith(":")
        ):
            if "workers_per_node: 2   # dlhub's default" not in line:
                assert "# from " in line, line  # every migrated value names its source key


def test_polaris_pbspro_mpiexec_accelerators():
    config = loaded("polaris.yaml")
    p = config.provider
    assert (p.type, p.queue, p.cpus_per_node, p.select_options) == ("pbspro", "debug", 32, ":ngpus=4")
    assert p.walltime == "01:00:00"  # YAML 1.1 read the unquoted 01:00:00 as 3600
    assert (p.launcher.type, p.launcher.bind_cmd, p.launcher.overrides) == (
        "mpiexec",
        "--cpu-bind",
        "--depth=64 --ppn 1",
    )
    assert p.scheduler_options == "#PBS -l filesystems=home:eagle"
    assert (p.init_blocks, p.min_blocks, p.max_blocks, p.nodes_per_block) == (0, 0, 2, 1)
    assert config.pool.accelerators == ["0", "1", "2", "3"] and config.pool.workers_per_node == 4
    assert config.max_idletime_s == 300.0
    text = run("polaris.yaml").text
    assert 'queue: "debug"   # from engine.provider.queue' in text


def test_template_placeholders_are_listed_to_fill_in():
    migration = run("polaris.yaml")
    assert migration.fill_in == [
        "provider.account (from engine.provider.account): CHANGE-ME-YOUR_POLARIS_ACCOUNT",
        "provider.worker_init (from engine.provider.worker_init): CHANGE-ME-COMMAND",
    ]
    assert "# FILL IN before starting" in migration.text


def test_unmapped_keys_are_listed_with_why():
    migration = run("perlmutter.yaml")
    assert [u.split(":")[0] for u in migration.unmapped] == ["engine.worker_debug", "engine.address"]
    assert "interface nmn0" in migration.unmapped[1]
    header = migration.text.split("\nname:")[0]
    assert "#   engine.address: set pool.worker_address" in header
    config = parse_config(yaml.safe_load(migration.text))
    assert (config.provider.cmd_timeout_s, config.provider.launcher.overrides) == (120, "-c 128")


def test_slurm_keys_and_top_level_settings():
    config = loaded("frontier.yaml")
    p = config.provider
    assert (p.type, p.account, p.partition, p.qos, p.exclusive, p.mem_per_node_gb) == (
        "slurm",
        "ABC123",
        "batch",
        "normal",
        True,
        500,
    )
    assert p.worker_init == "module load cray-python\nsource $HOME/gce/bin/activate"
    assert config.pool.accelerators == [str(i) for i in range(8)] and config.pool.cores_per_worker == 7
    assert (config.heartbeat_s, config.heartbeat_threshold_s, config.max_retries) == (30.0, 120.0, 3)
    assert run("frontier.yaml").unmapped == []


def test_container_maps_onto_pool_container():
    migration = run("midway_singularity.yaml")
    c = parse_config(yaml.safe_load(migration.text)).pool.container
    assert (c.type, c.image, c.options) == (
        "singularity",
        "/project/images/gce.sif",
        ["-H", "/home/$USER", "--cleanenv"],
    )
    assert {u.split(":")[0] for u in migration.unmapped} == {"engine.scheduler_mode", "engine.worker_mode"}


def test_container_without_uri_is_a_placeholder_to_fill_in():
    text = (
        (DATA / "midway_singularity.yaml")
        .read_text()
        .replace("    container_uri: /project/images/gce.sif\n", "")
    )
    migration = migrate(text, "ep")
    assert any(
        item.startswith("pool.container.image (from engine.container_uri)") for item in migration.fill_in
    )


def test_package_template_and_threadpool_and_torque():
    config = loaded("package_user_config_template.yaml.j2")
    assert (config.provider.type, config.pool.workers_per_node, config.provider.init_blocks) == (
        "local",
        1,
        1,
    )
    unmapped = [u.split(":")[0] for u in run("package_user_config_template.yaml.j2").unmapped]
    assert unmapped == ["idle_heartbeats_soft", "idle_heartbeats_hard", "endpoint_setup"]
    threads = loaded("threadpool.yaml")
    assert (threads.provider.type, threads.pool.workers_per_node) == ("local", 4)
    torque = loaded("torque_local.yaml")
    assert (torque.provider.type, torque.provider.queue, torque.provider.walltime) == (
        "torque",
        "batch",
        "1-00:00:00",
    )


@pytest.mark.parametrize(
    "name, text, message",
    [
        (
            "cobalt",
            (DATA / "theta_cobalt.yaml").read_text(),
            "engine.provider.type: CobaltProvider has no dlhub",
        ),
        ("mep", (DATA / "package_default_config.yaml").read_text(), "engine: is missing"),
        (
            "walltime",
            "engine:\n  provider:\n    type: SlurmProvider\n    walltime: soon\n",
            "engine.provider.walltime",
        ),
        (
            "blocks",
            "engine:\n  provider:\n    type: SlurmProvider\n    max_blocks: many\n",
            "engine.provider.max_blocks",
        ),
        ("engine", "engine:\n  type: KubernetesEngine\n", "engine.type: KubernetesEngine"),
        ("launcher", "engine:\n  provider:\n    launcher: [srun]\n", "engine.provider.launcher"),
        ("yaml", "engine: [\n", "not valid YAML"),
        ("list", "- engine\n", "must hold a mapping"),
        ("old", "executors: []\n", "pre-2.0"),
        (
            "order",
            "engine:\n  provider:\n    type: LocalProvider\n    min_blocks: 3\n    max_blocks: 1\n",
            "min_blocks",
        ),
    ],
)
def test_bad_input_names_the_key(name, text, message):
    with pytest.raises(MigrationError, match=None) as info:
        migrate(text, "ep")
    assert message in str(info.value)


def test_cli_writes_the_migrated_config_and_prints_what_did_not_map(tmp_path):
    home = tmp_path / "home"
    result = CliRunner().invoke(
        main,
        [
            "configure",
            "pm",
            "--from-globus-compute",
            str(DATA / "perlmutter.yaml"),
            "--home",
            str(home),
            "--manager",
            "tcp://10.1.2.3:5581",
            "--token",
            "tok-123",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "not migrated: engine.address" in result.output
    config = load_config(home / "endpoints" / "pm" / "config.yaml")
    assert (config.name, config.manager.address, config.manager.token) == (
        "pm",
        "tcp://10.1.2.3:5581",
        "tok-123",
    )
    assert config.provider.partition == "GPU"
    assert "# from engine.provider.partition" in (home / "endpoints" / "pm" / "config.yaml").read_text()


@pytest.mark.parametrize("source", ["theta_cobalt.yaml", "missing.yaml"])
def test_cli_bad_input_exits_1_and_writes_nothing(tmp_path, source):
    home = tmp_path / "home"
    result = CliRunner().invoke(
        main, ["configure", "x", "--from-globus-compute", str(DATA / source), "--home", str(home)]
    )
    assert result.exit_code == 1
    assert ("engine.provider.type" if source == "theta_cobalt.yaml" else "cannot read") in result.output
    assert not (home / "endpoints" / "x" / "config.yaml").exists()
