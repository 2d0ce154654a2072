"""Migrate a Globus Compute endpoint ``config.yaml`` to a dlhub endpoint config (issue 13, item 6).

``dlhub-endpoint configure NAME --from-globus-compute PATH`` calls :func:`migrate`. What maps is
written with a ``# from engine.provider.partition`` comment naming its source key; what does not
map is listed at the top of the written file (and printed), each with why. The result is checked
with dlhub's own validation (:func:`dlhub.endpoint.config.parse_config`) before anything is written.

Globus Compute keys (globus-compute-endpoint 4.x, engines built on Parsl's providers/launchers):

- top level: ``display_name``, ``engine``, ``heartbeat_period``, ``heartbeat_threshold``,
  ``idle_heartbeats_soft/hard``, ``endpoint_setup/teardown``, ``allowed_functions`` ...
- ``engine``: ``type`` (GlobusComputeEngine, HighThroughputEngine, ThreadPoolEngine,
  ProcessPoolEngine), ``max_workers_per_node`` / ``max_workers``, ``available_accelerators``,
  ``cores_per_worker``, ``mem_per_worker``, ``address``, ``strategy`` / ``job_status_kwargs``,
  ``container_type`` / ``container_uri`` / ``container_cmd_options``, ``provider``
- ``engine.provider``: ``type`` (LocalProvider, SlurmProvider, PBSProProvider, TorqueProvider),
  blocks (``init/min/max_blocks``, ``nodes_per_block``, ``parallelism``), ``walltime``,
  ``account``, ``partition``, ``qos``, ``queue``, ``scheduler_options``, ``worker_init``,
  ``cmd_timeout``, ``launcher`` ...

Example configs are often Jinja templates (``{{ COMMAND }}`` placeholders, ``user_config_template
.yaml.j2``): placeholders become ``CHANGE-ME-<NAME>`` values, listed as "fill in" at the top.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config import WALLTIME_PATTERN, ConfigError, parse_config


class MigrationError(ValueError):
    """The Globus Compute config cannot be read or has no dlhub equivalent; names the key."""


PLACEHOLDER = "CHANGE-ME"

ENGINES_POOL = {"GlobusComputeEngine", "HighThroughputEngine"}
ENGINES_LOCAL = {"ThreadPoolEngine", "ProcessPoolEngine"}

PROVIDERS = {
    "LocalProvider": "local",
    "SlurmProvider": "slurm",
    "PBSProProvider": "pbspro",
    "TorqueProvider": "torque",
}

LAUNCHERS = {
    "SingleNodeLauncher": "single-node",
    "SimpleLauncher": "simple",
    "SrunLauncher": "srun",
    "MpiExecLauncher": "mpiexec",
    "AprunLauncher": "aprun",
}

CONTAINERS = {"singularity": "singularity", "apptainer": "apptainer", "docker": "docker", "podman": "podman"}

# provider keys copied under the same dlhub name (or renamed), per dlhub provider type
_BLOCK_KEYS = {
    "init_blocks": "init_blocks",
    "min_blocks": "min_blocks",
    "max_blocks": "max_blocks",
    "parallelism": "parallelism",
    "worker_init": "worker_init",
    "cmd_timeout": "cmd_timeout_s",
}
_BATCH_KEYS = {
    **_BLOCK_KEYS,
    "nodes_per_block": "nodes_per_block",
    "account": "account",
    "scheduler_options": "scheduler_options",
    # walltime is converted, see _walltime
}
_PROVIDER_KEYS = {
    "local": _BLOCK_KEYS,
    "slurm": {
        **_BATCH_KEYS,
        "partition": "partition",
        "qos": "qos",
        "constraint": "constraint",
        "clusters": "clusters",
        "cores_per_node": "cores_per_node",
        "exclusive": "exclusive",
        # mem_per_node (GB) is renamed below
    },
    "pbspro": {**_BATCH_KEYS, "queue": "queue", "cpus_per_node": "cpus_per_node"},
    "torque": {**_BATCH_KEYS, "queue": "queue"},
}

_WHOLE_NUMBERS = {
    "init_blocks",
    "min_blocks",
    "max_blocks",
    "nodes_per_block",
    "cmd_timeout_s",
    "cores_per_node",
    "cpus_per_node",
}

# keys known to have no dlhub equivalent, with why (others get a generic line)
_NO_EQUIVALENT = {
    "display_name": "dlhub shows the endpoint by its name",
    "idle_heartbeats_soft": "a dlhub endpoint stays up when idle; idle blocks scale in after max_idletime_s",
    "idle_heartbeats_hard": "a dlhub endpoint stays up when idle; idle blocks scale in after max_idletime_s",
    "endpoint_setup": "dlhub runs no endpoint-level setup; put per-block setup in provider.worker_init",
    "endpoint_teardown": "dlhub runs no endpoint-level teardown",
    "allowed_functions": "dlhub restricts by policy (policy.functions_by_value, allowed_servable_owners), "
    "not by function id",
    "authentication_policy": "dlhub endpoints authenticate with the manager's tokens (policy.allowed_users)",
    "multi_user": "one dlhub endpoint serves every allowed user (policy.allowed_users / allowed_groups)",
    "public": "who may submit is policy.allowed_users / allowed_groups",
    "amqp_port": "dlhub endpoints dial the manager over ZeroMQ (manager.address)",
    "engine.worker_debug": "dlhub worker logs go to the endpoint's log directory",
    "engine.address": "set pool.worker_address to the login node's address as seen from compute nodes",
    "engine.encrypted": "pool <-> worker traffic stays on the site's network; manager link uses CURVE",
    "engine.label": "dlhub names pools by their key under pools:",
    "engine.worker_mode": "dlhub starts containers per worker (pool.container)",
    "engine.scheduler_mode": "dlhub routes by pool resources",
    "engine.heartbeat_period": "dlhub's pool heartbeats follow heartbeat_s",
    "engine.heartbeat_threshold": "dlhub's pool heartbeats follow heartbeat_threshold_s",
    "engine.worker_ports": "dlhub pools dial one port (pool.worker_port)",
    "engine.worker_port_range": "dlhub pools dial one port (pool.worker_port)",
    "engine.provider.channel": "dlhub submits with the scheduler's commands on the endpoint host",
    "engine.provider.move_files": "dlhub writes submit scripts on a shared file system",
}


@dataclass
class Migration:
    """One migration: the dlhub config (as commented YAML text) and what did not map."""

    text: str
    unmapped: list[str] = field(default_factory=list)  # "source.key: why"
    fill_in: list[str] = field(default_factory=list)  # "dlhub.key (source.key): template placeholder"


class _Out:
    """The dlhub config being built: each value with the source key it came from."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, tuple[Any, str]]] = {"top": {}, "provider": {}, "launcher": {}}
        self.values["pool"] = {}
        self.values["container"] = {}
        self.unmapped: list[str] = []
        self.fill_in: list[str] = []

    def put(self, section: str, key: str, value: Any, source: str) -> None:
        self.values[section][key] = (value, source)

    def skip(self, source: str, why: str | None = None) -> None:
        self.unmapped.append(f"{source}: {why or _NO_EQUIVALENT.get(source, 'no dlhub equivalent')}")

    def data(self) -> dict[str, Any]:
        def plain(section: str) -> dict[str, Any]:
            return {k: v for k, (v, _) in self.values[section].items()}

        provider = plain("provider")
        if self.values["launcher"]:
            provider["launcher"] = plain("launcher")
        pool = plain("pool")
        if self.values["container"]:
            pool["container"] = plain("container")
        return {**plain("top"), "provider": provider, "pool": pool}


def _strip_jinja(text: str) -> str:
    """A Jinja config template as YAML: comments, ``{% set %}`` blocks and tags dropped,
    ``{{ NAME ... }}`` -> ``CHANGE-ME-NAME``."""
    text = re.sub(r"\{#.*?#\}", "", text, flags=re.S)
    text = re.sub(r"\{%-?\s*set\s+\w+\s*-?%\}.*?\{%-?\s*endset\s*-?%\}", "", text, flags=re.S)
    text = re.sub(r"\{%.*?%\}", "", text, flags=re.S)
    return re.sub(
        r"\{\{-?\s*([A-Za-z_][\w.]*)?[^}]*?-?\}\}",
        lambda m: f"{PLACEHOLDER}-{m.group(1) or 'VALUE'}",
        text,
        flags=re.S,
    )


def _walltime(value: Any, source: str) -> str:
    """GC walltimes as dlhub's ``[D-]HH:MM:SS``; YAML 1.1 reads an unquoted 01:00:00 as 3600."""
    if isinstance(value, bool):
        raise MigrationError(f"{source}: expected a walltime HH:MM:SS, got {value!r}")
    if isinstance(value, int):
        h, rest = divmod(value, 3600)
        return f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}"
    if isinstance(value, str) and re.fullmatch(WALLTIME_PATTERN, value.strip()):
        return value.strip()
    if isinstance(value, str) and re.fullmatch(r"\d{1,3}:\d{2}", value.strip()):
        return f"{value.strip()}:00"  # Slurm's MM:SS-less HH:MM
    raise MigrationError(f"{source}: expected a walltime HH:MM:SS, got {value!r}")


def _check(value: Any, kinds: type | tuple[type, ...], source: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise MigrationError(f"{source}: expected {what}, got {value!r}")
    if not isinstance(value, kinds):
        raise MigrationError(f"{source}: expected {what}, got {value!r}")
    return value


def _type_of(section: dict[str, Any], source: str, default: str | None = None) -> str:
    kind = section.get("type", default)
    if not isinstance(kind, str) or not kind:
        raise MigrationError(f"{source}.type: expected a class name, got {kind!r}")
    return kind.rsplit(".", 1)[-1]  # parsl.providers.SlurmProvider -> SlurmProvider


def _launcher(out: _Out, launcher: Any, source: str) -> None:
    if isinstance(launcher, str):
        launcher = {"type": launcher}
    _check(launcher, dict, source, "a mapping with a type")
    kind = _type_of(launcher, source)
    if kind not in LAUNCHERS:
        out.skip(
            f"{source}.type", f"{kind} has no dlhub launcher ({', '.join(LAUNCHERS)}); using single-node"
        )
        return
    out.put("launcher", "type", LAUNCHERS[kind], f"{source}.type")
    for key, value in launcher.items():
        where = f"{source}.{key}"
        if key == "type":
            continue
        if key == "overrides" and kind in ("SrunLauncher", "MpiExecLauncher", "AprunLauncher"):
            out.put("launcher", "overrides", str(_check(value, str, where, "a string")), where)
        elif key == "bind_cmd" and kind == "MpiExecLauncher":
            out.put("launcher", "bind_cmd", str(_check(value, str, where, "a string")), where)
        else:
            out.skip(where, None if where in _NO_EQUIVALENT else f"{kind}'s {key} has no dlhub equivalent")


def _provider(out: _Out, provider: Any, source: str) -> None:
    _check(provider, dict, source, "a mapping with a type")
    kind = _type_of(provider, source, "LocalProvider")
    if kind not in PROVIDERS:
        raise MigrationError(
            f"{source}.type: {kind} has no dlhub equivalent (dlhub providers: {', '.join(PROVIDERS)})"
        )
    dl = PROVIDERS[kind]
    out.put("provider", "type", dl, f"{source}.type")
    keys = _PROVIDER_KEYS[dl]
    for key, value in provider.items():
        where = f"{source}.{key}"
        if key == "type":
            continue
        if key == "launcher":
            _launcher(out, value, where)
        elif key == "walltime" and dl != "local":
            out.put("provider", "walltime", _walltime(value, where), where)
        elif key == "mem_per_node" and dl == "slurm":
            if value is not None:
                gb = _check(value, (int, float), where, "a number of GB")
                out.put("provider", "mem_per_node_gb", max(1, int(gb)), where)
        elif key == "select_options" and dl == "pbspro":
            text = str(_check(value, str, where, "a string")).strip()
            # parsl: "#PBS -l select=N:ncpus=C:<select_options>"; dlhub appends it with its colon
            out.put(
                "provider", "select_options", text if not text or text.startswith(":") else f":{text}", where
            )
        elif key in keys:
            dl_key = keys[key]
            if value is None:
                continue  # parsl's "unset" is dlhub's default
            if dl_key in _WHOLE_NUMBERS:
                value = _check(value, int, where, "a whole number")
            elif dl_key == "parallelism":
                value = _check(value, (int, float), where, "a number between 0 and 1")
            elif dl_key == "exclusive":
                value = _check(value, bool, where, "true or false")
            elif isinstance(value, (dict, list)):
                raise MigrationError(f"{where}: expected a single value, got {value!r}")
            else:
                value = str(value)
            out.put("provider", dl_key, value, where)
        else:
            out.skip(where, None if where in _NO_EQUIVALENT else f"{kind}'s {key} has no dlhub equivalent")


def _accelerators(value: Any, source: str) -> list[str]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [str(i) for i in range(value)]
    if isinstance(value, list) and value:
        return [str(v) for v in value]
    raise MigrationError(f"{source}: expected a count or a list of device ids, got {value!r}")


def _engine(out: _Out, engine: Any) -> None:
    _check(engine, dict, "engine", "a mapping")
    kind = _type_of(engine, "engine", "GlobusComputeEngine")
    if kind not in ENGINES_POOL | ENGINES_LOCAL:
        raise MigrationError(
            f"engine.type: {kind} has no dlhub equivalent "
            f"(known: {', '.join(sorted(ENGINES_POOL | ENGINES_LOCAL))})"
        )
    if kind in ENGINES_LOCAL:
        out.put("provider", "type", "local", "engine.type")
        for key, value in engine.items():
            where = f"engine.{key}"
            if key == "max_workers" and value is not None:
                out.put("pool", "workers_per_node", _check(value, int, where, "a whole number"), where)
            elif key != "type":
                out.skip(where)
        return
    if "provider" in engine:
        _provider(out, engine["provider"], "engine.provider")
    else:
        out.put("provider", "type", "local", "engine (no provider: LocalProvider)")
    container: dict[str, Any] = {}
    for key, value in engine.items():
        where = f"engine.{key}"
        if key in ("type", "provider"):
            continue
        if key in ("max_workers_per_node", "max_workers"):
            if value is not None and value != float("inf"):
                workers = _check(value, (int, float), where, "a number of workers")
                out.put("pool", "workers_per_node", max(1, int(workers)), where)
        elif key == "available_accelerators":
            out.put("pool", "accelerators", _accelerators(value, where), where)
        elif key == "cores_per_worker":
            out.put("pool", "cores_per_worker", _check(value, (int, float), where, "a number"), where)
        elif key == "mem_per_worker":
            if value is not None:
                out.put(
                    "pool",
                    "memory_per_worker_gb",
                    _check(value, (int, float), where, "a number of GB"),
                    where,
                )
        elif key == "address" and isinstance(value, str):
            out.put("pool", "worker_address", value, where)
        elif key == "address":
            ifname = value.get("ifname") if isinstance(value, dict) else None
            why = _NO_EQUIVALENT["engine.address"] + (
                f" (the address of interface {ifname})" if ifname else ""
            )
            out.skip(where, why)
        elif key == "max_retries_on_system_failure":
            out.put("top", "max_retries", _check(value, int, where, "a whole number"), where)
        elif key == "prefetch_capacity":
            out.put("pool", "max_prefetch", _check(value, int, where, "a whole number"), where)
        elif key in ("strategy", "job_status_kwargs"):
            _strategy(out, value, where)
        elif key == "container_type":
            container["type"] = (value, where)
        elif key == "container_uri":
            container["image"] = (value, where)
        elif key == "container_cmd_options":
            container["options"] = (value, where)
        else:
            out.skip(where)
    _container(out, container)


def _strategy(out: _Out, value: Any, source: str) -> None:
    if value is None or isinstance(value, str):
        out.skip(source, f"strategy {value!r}: dlhub always scales blocks between min_blocks and max_blocks")
        return
    _check(value, dict, source, "a mapping")
    for key, item in value.items():
        where = f"{source}.{key}"
        if key == "max_idletime":
            out.put("top", "max_idletime_s", float(_check(item, (int, float), where, "seconds")), where)
        elif key == "strategy_period":
            out.put("top", "strategy_period_s", float(_check(item, (int, float), where, "seconds")), where)
        elif key == "type" and item in ("SimpleStrategy", "simple", "htex_auto_scale"):
            continue  # dlhub's scaling is the simple strategy
        else:
            out.skip(where)


def _container(out: _Out, container: dict[str, tuple[Any, str]]) -> None:
    if not container:
        return
    kind, kind_src = container.get("type", (None, "engine.container_type"))
    if kind is None or kind == "none":
        for _, src in container.values():
            if src != kind_src:
                out.skip(src, "no container_type: the workers run without a container")
        return
    if not isinstance(kind, str) or kind.lower() not in CONTAINERS:
        if kind == "custom":
            out.skip(
                kind_src,
                "container_type custom: dlhub runs apptainer, singularity, charliecloud, "
                "podman or docker (pool.container); the workers run without a container",
            )
            for key in ("image", "options"):
                if key in container:
                    out.skip(container[key][1], "container_type custom has no dlhub equivalent")
            return
        raise MigrationError(f"{kind_src}: expected one of {', '.join(CONTAINERS)} or custom, got {kind!r}")
    out.put("container", "type", CONTAINERS[kind.lower()], kind_src)
    image, image_src = container.get("image", (None, "engine.container_uri"))
    if image:
        out.put("container", "image", str(_check(image, str, image_src, "an image name or path")), image_src)
    else:
        out.put("container", "image", f"{PLACEHOLDER}-container_uri", image_src)
    if "options" in container:
        options, src = container["options"]
        if options:
            out.put("container", "options", shlex.split(str(_check(options, str, src, "a string"))), src)


def _heartbeats(out: _Out, data: dict[str, Any]) -> None:
    period = data.get("heartbeat_period")
    threshold = data.get("heartbeat_threshold")
    if period is not None:
        out.put(
            "top",
            "heartbeat_s",
            float(_check(period, (int, float), "heartbeat_period", "seconds")),
            "heartbeat_period",
        )
    if threshold is not None:
        value = float(_check(threshold, (int, float), "heartbeat_threshold", "seconds"))
        beat = float(period) if period is not None else 2.0
        if value < 2 * beat:
            out.skip(
                "heartbeat_threshold",
                f"{value} s is under twice the heartbeat ({beat} s), "
                "which dlhub refuses; kept dlhub's default",
            )
        else:
            out.put("top", "heartbeat_threshold_s", value, "heartbeat_threshold")


def parse_gc(text: str, source: str = "<config>") -> dict[str, Any]:
    """A Globus Compute config (plain YAML or a Jinja template) as a mapping."""
    if "{{" in text or "{%" in text or "{#" in text:
        text = _strip_jinja(text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MigrationError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise MigrationError(f"{source} must hold a mapping of keys, got {type(data).__name__}")
    if "engine" not in data:
        if "executors" in data:
            raise MigrationError(
                f"{source}: executors: is the pre-2.0 Globus Compute config; migrate it to engine: first"
            )
        raise MigrationError(
            f"{source}: engine: is missing (a multi-user endpoint's config.yaml has none: migrate "
            "its user_config_template.yaml.j2 instead)"
        )
    return data


def migrate(
    text: str,
    name: str,
    address: str | None = None,
    token: str | None = None,
    source: str = "<config>",
) -> Migration:
    """The dlhub endpoint config equivalent to the Globus Compute config ``text``."""
    data = parse_gc(text, source)
    out = _Out()
    _engine(out, data["engine"])
    _heartbeats(out, data)
    for key in data:
        if key not in ("engine", "heartbeat_period", "heartbeat_threshold"):
            out.skip(key)
    if "accelerators" in out.values["pool"]:
        count = len(out.values["pool"]["accelerators"][0])
        workers = out.values["pool"].get("workers_per_node")
        if workers is not None and workers[0] != count:
            out.skip(
                workers[1], f"{workers[0]} workers per node: dlhub runs one worker per accelerator ({count})"
            )
        out.put("pool", "workers_per_node", count, out.values["pool"]["accelerators"][1])
    paths = {
        "provider": "provider",
        "launcher": "provider.launcher",
        "pool": "pool",
        "container": "pool.container",
    }
    for section, path in paths.items():
        for key, (value, src) in out.values[section].items():
            if isinstance(value, str) and f"{PLACEHOLDER}-" in value:
                out.fill_in.append(f"{path}.{key} (from {src}): {value}")
    text_out = _render(out, name, address or "tcp://hub.example.org:5581", token or PLACEHOLDER, source)
    try:
        parse_config(yaml.safe_load(text_out), f"(migrated from {source})")
    except ConfigError as exc:
        raise MigrationError(str(exc)) from None
    return Migration(text_out, out.unmapped, out.fill_in)


def _yaml(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and flow lists are valid YAML


def _render(out: _Out, name: str, address: str, token: str, source: str) -> str:
    lines = [f"# dlhub endpoint config migrated from the Globus Compute config {source}", "#"]
    if out.fill_in:
        lines.append("# FILL IN before starting (placeholders in the source template):")
        lines += [f"#   {item}" for item in out.fill_in]
    if out.unmapped:
        lines.append("# Not migrated (no dlhub equivalent):")
        lines += [f"#   {item}" for item in out.unmapped]
    else:
        lines.append("# Every key of the source was migrated.")
    lines += [
        f"name: {_yaml(name)}",
        "manager:",
        f"  address: {address}",
        f"  token: {token}",
    ]

    def section(name_: str, indent: str) -> list[str]:
        return [f"{indent}{k}: {_yaml(v)}   # from {src}" for k, (v, src) in out.values[name_].items()]

    lines.append("provider:")
    lines += section("provider", "  ")
    if out.values["launcher"]:
        lines.append("  launcher:")
        lines += section("launcher", "    ")
    lines.append("pool:")
    pool = section("pool", "  ")
    lines += pool
    if out.values["container"]:
        lines.append("  container:")
        lines += section("container", "    ")
    elif not pool:
        lines.append("  workers_per_node: 2   # dlhub's default (the source sets no workers)")
    for key, (value, src) in out.values["top"].items():
        lines.append(f"{key}: {_yaml(value)}   # from {src}")
    return "\n".join(lines) + "\n"
