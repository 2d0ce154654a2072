"""Endpoint config files: loaded into frozen models, bad ones fail naming key, value, expectation."""

from __future__ import annotations

import pydantic
import pytest
import yaml

from dlhub.endpoint.config import ConfigError, EndpointConfig, dump_config, load_config, parse_config

GOOD = {
    "name": "hpc-login_1",
    "manager": {"address": "tcp://127.0.0.1:5581", "token": "dlh_secret"},
    "provider": {"type": "local", "init_blocks": 1, "min_blocks": 0, "max_blocks": 2},
    "pool": {"workers_per_node": 4, "prefetch_target_ms": 5.0},
    "heartbeat_s": 0.5,
    "heartbeat_threshold_s": 2.0,
    "max_retries": 3,
}


def write(tmp_path, data, raw: str | None = None):
    path = tmp_path / "config.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(data))
    return path


def with_changes(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = data
        for p in parents:
            target = target.setdefault(p, {})
        target[key] = value
    return data


def error_for(tmp_path, data) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    return str(info.value)


def test_good_file_loads(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert isinstance(cfg, EndpointConfig)
    assert cfg.name == "hpc-login_1"
    assert cfg.manager.address == "tcp://127.0.0.1:5581"
    assert cfg.provider.max_blocks == 2 and cfg.pool.workers_per_node == 4
    assert cfg.heartbeat_s == 0.5 and cfg.max_retries == 3
    # defaults fill what the file leaves out
    assert cfg.pool.worker_port == 0 and cfg.pool.worker_address == "127.0.0.1"
    # frozen
    with pytest.raises(pydantic.ValidationError):
        cfg.name = "other"  # type: ignore[misc]


def test_minimal_file_loads_and_dump_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, {"name": "x", "manager": {"address": "tcp://h:1", "token": "t"}}))
    assert cfg.pool.workers_per_node >= 1
    out = tmp_path / "out" / "config.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    assert out.stat().st_mode & 0o777 == 0o600  # it holds a token


def test_typo_suggests_the_key(tmp_path):
    msg = error_for(tmp_path, with_changes(heartbeat_sec=1.0))
    assert "heartbeat_sec: unknown key" in msg
    assert "did you mean heartbeat_s?" in msg
    assert str(tmp_path / "config.yaml") in msg


def test_nested_typo_suggests_the_full_path(tmp_path):
    msg = error_for(tmp_path, with_changes(pool__workers_per_nod=2))
    assert "pool.workers_per_nod: unknown key" in msg
    assert "did you mean pool.workers_per_node?" in msg
    msg = error_for(tmp_path, with_changes(provider__max_block=3))
    assert "did you mean provider.max_blocks?" in msg


def test_unrelated_unknown_key_lists_the_valid_ones(tmp_path):
    msg = error_for(tmp_path, with_changes(zzzz=1))
    assert "zzzz: unknown key" in msg and "did you mean" not in msg
    assert "valid here:" in msg and "heartbeat_s" in msg


@pytest.mark.parametrize(
    "changes, path, value",
    [
        ({"pool__workers_per_node": 0}, "pool.workers_per_node", "0"),
        ({"pool__workers_per_node": "many"}, "pool.workers_per_node", "'many'"),
        ({"heartbeat_s": -1}, "heartbeat_s", "-1"),
        ({"provider__parallelism": 1.5}, "provider.parallelism", "1.5"),
        ({"pool__worker_port": 70000}, "pool.worker_port", "70000"),
        ({"name": "bad name!"}, "name", "'bad name!'"),
    ],
)
def test_bad_value_names_key_path_and_value(tmp_path, changes, path, value):
    msg = error_for(tmp_path, with_changes(**changes))
    line = next((ln for ln in msg.splitlines() if ln.strip().startswith(path + ":")), None)
    assert line is not None, msg
    assert f"(got {value})" in line
    # and says what was expected
    assert any(word in line for word in ("greater", "less", "valid", "match", "Input should")), line


def test_unknown_provider_type_lists_the_types_and_suggests_one(tmp_path):
    msg = error_for(tmp_path, with_changes(provider__type="slurmish"))
    assert "provider.type: 'slurmish' is not one of local, slurm, pbspro, torque" in msg
    assert "did you mean slurm?" in msg


def test_typo_inside_a_provider_and_its_launcher_suggests_the_key(tmp_path):
    data = with_changes()
    data["provider"] = {"type": "slurm", "partiton": "debug", "launcher": {"type": "srun", "overide": "x"}}
    msg = error_for(tmp_path, data)
    assert "provider.partiton: unknown key; did you mean provider.partition?" in msg
    assert "provider.launcher.overide: unknown key; did you mean provider.launcher.overrides?" in msg


def test_walltime_format_is_explained(tmp_path):
    data = with_changes()
    data["provider"] = {"type": "slurm", "walltime": "5min"}
    msg = error_for(tmp_path, data)
    assert "provider.walltime: expected HH:MM:SS or D-HH:MM:SS, got '5min'" in msg


def test_missing_required_key(tmp_path):
    data = with_changes()
    del data["manager"]["token"]
    msg = error_for(tmp_path, data)
    assert "manager.token: required key is missing" in msg
    data = with_changes()
    del data["name"]
    assert "name: required key is missing" in error_for(tmp_path, data)


def test_min_blocks_above_max_blocks(tmp_path):
    msg = error_for(tmp_path, with_changes(provider__min_blocks=3, provider__max_blocks=1))
    assert "provider" in msg and "min_blocks (3) > max_blocks (1)" in msg


def test_init_blocks_above_max_blocks(tmp_path):
    msg = error_for(tmp_path, with_changes(provider__init_blocks=5, provider__max_blocks=2))
    assert "init_blocks (5) > max_blocks (2)" in msg


def test_threshold_must_cover_two_heartbeats(tmp_path):
    msg = error_for(tmp_path, with_changes(heartbeat_s=2.0, heartbeat_threshold_s=3.0))
    assert "heartbeat_threshold_s: must be at least twice heartbeat_s (2.0)" in msg


@pytest.mark.parametrize("raw, kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("", "NoneType")])
def test_non_mapping_yaml(tmp_path, raw, kind):
    with pytest.raises(ConfigError, match=rf"must hold a mapping of keys, got {kind}"):
        load_config(write(tmp_path, None, raw))


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write(tmp_path, None, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="no endpoint config at"):
        load_config(tmp_path / "absent.yaml")


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        parse_config(with_changes(heartbeat_sec=1, pool__workers_per_node=0), "<test>")
    msg = str(info.value)
    assert msg.startswith("invalid endpoint config <test>:")
    assert "heartbeat_sec" in msg and "pool.workers_per_node" in msg


# ---- named pools and accelerators ----------------------------------------------------------------


def test_named_pools_load_default_first():
    data = with_changes()
    data["pools"] = {
        "gpu": {"provider": {"type": "slurm", "partition": "gpu"}, "pool": {"accelerators": ["0", "1"]}},
        "big-mem": {"pool": {"workers_per_node": 1, "memory_per_worker_gb": 512}},
    }
    cfg = parse_config(data)
    pools = cfg.all_pools()
    assert list(pools) == ["default", "gpu", "big-mem"]
    assert pools["default"].provider == cfg.provider and pools["default"].pool == cfg.pool
    assert pools["gpu"].provider.type == "slurm" and pools["gpu"].provider.partition == "gpu"
    assert pools["big-mem"].provider.type == "local"  # a named pool's provider defaults to local
    assert pools["gpu"].pool.offers() == {"cores": None, "memory_gb": None, "gpus": 1}
    assert pools["big-mem"].pool.offers() == {"cores": None, "memory_gb": 512, "gpus": 0}
    assert cfg.pool.offers()["gpus"] == 0


@pytest.mark.parametrize("name", ["default", "bad name", "-starts-with-dash", "a" * 33, "dot.ted"])
def test_bad_pool_names_are_refused(name):
    data = with_changes()
    data["pools"] = {name: {}}
    with pytest.raises(ConfigError) as info:
        parse_config(data, "<test>")
    msg = str(info.value)
    assert f"pool name {name!r} must be letters, digits, - or _ (up to 32) and not 'default'" in msg


def test_good_pool_names_are_accepted():
    data = with_changes()
    data["pools"] = {"gpu_A100-x": {}, "a" * 32: {}, "9": {}}
    assert list(parse_config(data).all_pools()) == ["default", "gpu_A100-x", "a" * 32, "9"]


def test_cross_key_errors_name_the_key_and_never_echo_the_token():
    data = with_changes()
    data["pools"] = {"default": {}}
    with pytest.raises(ConfigError) as info:
        parse_config(data, "<test>")
    msg = str(info.value)
    assert "dlh_secret" not in msg
    assert "\n  pools: pool name 'default' must be" in msg
    with pytest.raises(ConfigError) as info:
        parse_config(with_changes(heartbeat_s=2.0, heartbeat_threshold_s=3.0), "<test>")
    msg = str(info.value)
    assert "dlh_secret" not in msg
    assert "heartbeat_threshold_s: must be at least twice heartbeat_s (2.0) (got 3.0)" in msg


def test_accelerators_fill_workers_per_node():
    data = with_changes()
    data["pool"] = {"accelerators": ["0", "1", "2"]}
    cfg = parse_config(data)
    assert cfg.pool.workers_per_node == 3 and cfg.pool.accelerators == ["0", "1", "2"]
    data["pools"] = {"gpu": {"pool": {"accelerators": ["0.0", "0.1"]}}}
    assert parse_config(data).pools["gpu"].pool.workers_per_node == 2


def test_accelerators_must_match_workers_per_node():
    data = with_changes()
    data["pool"] = {"accelerators": ["0", "1"], "workers_per_node": 3}
    with pytest.raises(ConfigError) as info:
        parse_config(data, "<test>")
    assert "pool: " in str(info.value)
    assert "workers_per_node (3) must equal the number of accelerators (2)" in str(info.value)
    data = with_changes()
    data["pools"] = {"gpu": {"pool": {"accelerators": ["0"], "workers_per_node": 2}}}
    with pytest.raises(ConfigError) as info:
        parse_config(data, "<test>")
    assert "pools.gpu" in str(info.value)
    assert "workers_per_node (2) must equal the number of accelerators (1)" in str(info.value)


def test_matching_explicit_workers_per_node_is_fine():
    data = with_changes()
    data["pool"] = {"accelerators": ["0", "1"], "workers_per_node": 2}
    assert parse_config(data).pool.workers_per_node == 2


def test_walltime_with_days_is_accepted_and_counted():
    from dlhub.endpoint.config import walltime_seconds

    data = with_changes()
    data["provider"] = {"type": "pbspro", "walltime": "1-02:03:04"}
    cfg = parse_config(data)
    assert cfg.provider.walltime == "1-02:03:04"
    assert walltime_seconds(cfg.provider.walltime) == 93784
    assert walltime_seconds("0-00:00:59") == 59


def _with_batching(batching: dict) -> EndpointConfig:
    return parse_config(
        {"name": "ep", "manager": {"address": "tcp://127.0.0.1:5000", "token": "t"}, "batching": batching}
    )


def test_batching_defaults_fill_what_the_record_leaves_out_and_admins_override_per_servable():
    cfg = _with_batching(
        {
            "max_batch_size": 32,
            "max_batch_delay_ms": 5,
            "servables": {"jane/model": {"max_batch_size": 512}, "jane/off": {"enabled": False}},
        }
    )
    assert cfg.batching.policy_for("bob/x:1", None) == {
        "max_batch_size": 32,
        "max_batch_delay_ms": 5.0,
        "weight": "count",
    }
    record = {"max_batch_size": 128, "max_batch_delay_ms": 0.0, "weight": "len"}
    assert cfg.batching.policy_for("bob/x:1", record) == record  # the record's own policy
    assert cfg.batching.policy_for("jane/model:3", record)["max_batch_size"] == 512  # the admin's
    assert cfg.batching.policy_for("jane/model:3", record)["weight"] == "len"
    assert cfg.batching.policy_for("jane/off:1", record) is None  # switched off here


def test_batching_and_worker_cache_settings_are_checked():
    with pytest.raises(ConfigError, match="max_batch_size"):
        _with_batching({"max_batch_size": 0})
    with pytest.raises(ConfigError, match="weight"):
        _with_batching({"servables": {"jane/model": {"weight": "atoms"}}})
    with pytest.raises(ConfigError, match="memory_budget_mb"):
        parse_config(
            {
                "name": "ep",
                "manager": {"address": "tcp://127.0.0.1:5000", "token": "t"},
                "worker_cache": {"memory_budget_mb": -1},
            }
        )


def test_a_plain_worker_link_needs_workers_on_this_host(tmp_path):
    """worker_link: plain (no encryption to pools and workers) only where every pool dials a
    loopback address; the error names the pool and its address."""
    local = parse_config(with_changes(worker_link="plain", pool__worker_address="127.0.0.1"))
    assert local.worker_link == "plain" and parse_config(with_changes()).worker_link == "curve"
    text = error_for(tmp_path, with_changes(worker_link="plain", pool__worker_address="10.1.2.3"))
    assert "worker_link: plain" in text and "'default'" in text and "10.1.2.3" in text
    assert "worker_link" in error_for(tmp_path, with_changes(worker_link="none"))
