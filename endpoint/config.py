"""Endpoint configuration: one YAML file per endpoint, validated at load into frozen models.

A bad file fails at start with the key path, the bad value and what was expected, and suggests
the right key for a typo. Units are in the names (``heartbeat_s``, ``prefetch_target_ms``).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file could not be loaded; the message names the key and the problem."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ManagerLink(_Frozen):
    address: str = Field(description="the manager's endpoint URL, e.g. tcp://hub.example.org:5581")
    token: str = Field(min_length=1, description="the endpoint's token on that manager")


class LocalProviderConfig(_Frozen):
    type: Literal["local"] = "local"
    init_blocks: Annotated[int, Field(ge=0)] = 1
    min_blocks: Annotated[int, Field(ge=0)] = 0
    max_blocks: Annotated[int, Field(ge=1)] = 1
    parallelism: Annotated[float, Field(gt=0, le=1)] = 1.0
    worker_init: str = ""
    cmd_timeout_s: Annotated[int, Field(ge=1)] = 30

    @model_validator(mode="after")
    def _blocks_in_order(self):
        if not self.min_blocks <= self.max_blocks:
            raise ValueError(f"min_blocks ({self.min_blocks}) > max_blocks ({self.max_blocks})")
        if self.init_blocks > self.max_blocks:
            raise ValueError(f"init_blocks ({self.init_blocks}) > max_blocks ({self.max_blocks})")
        return self


class PoolConfig(_Frozen):
    workers_per_node: Annotated[int, Field(ge=1, le=4096)] = 2
    # keep about this much work queued at each worker so it never idles for a round trip
    prefetch_target_ms: Annotated[float, Field(ge=0)] = 2.0
    max_prefetch: Annotated[int, Field(ge=0, le=10_000)] = 64
    # prefetch for functions not yet measured (0: wait for the first result to learn its run time)
    min_prefetch: Annotated[int, Field(ge=0)] = 0
    # tasks longer than this are never prefetched: they wait at the endpoint for an idle worker
    no_prefetch_above_ms: Annotated[float, Field(ge=0)] = 100.0
    # address the workers dial back to (the endpoint host as seen from compute nodes)
    worker_address: str = "127.0.0.1"
    worker_port: Annotated[int, Field(ge=0, lt=65536)] = 0
    python: str = ""  # interpreter for pools; default: the endpoint's own


class EndpointConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    manager: ManagerLink
    provider: LocalProviderConfig = LocalProviderConfig()
    pool: PoolConfig = PoolConfig()
    heartbeat_s: Annotated[float, Field(gt=0)] = 2.0
    heartbeat_threshold_s: Annotated[float, Field(gt=0)] = 10.0
    max_retries: Annotated[int, Field(ge=0)] = 2
    strategy_period_s: Annotated[float, Field(gt=0)] = 5.0
    max_idletime_s: Annotated[float, Field(ge=0)] = 120.0
    payload_limit_bytes: Annotated[int, Field(gt=0)] = 256 * 1024 * 1024
    output_limit_bytes: Annotated[int, Field(ge=0)] = 64 * 1024
    log_max_bytes: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024
    log_backups: Annotated[int, Field(ge=0)] = 3

    @model_validator(mode="after")
    def _threshold_covers_heartbeats(self):
        if self.heartbeat_threshold_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"heartbeat_threshold_s ({self.heartbeat_threshold_s}) must be at least twice "
                f"heartbeat_s ({self.heartbeat_s})"
            )
        return self


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at ``loc`` (the parent of a bad key), for typo suggestions."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


def _explain(exc: ValidationError, source: str) -> str:
    lines = [f"invalid endpoint config {source}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _known_keys(EndpointConfig, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            suggestion = ""
            if hint:
                suggestion = "; did you mean " + ".".join([*map(str, loc[:-1]), hint[0]]) + "?"
            lines.append(f"  {path}: unknown key{suggestion} (valid: {', '.join(known)})")
        elif err["type"] == "missing":
            lines.append(f"  {path}: required key is missing")
        else:
            lines.append(f"  {path}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path) -> EndpointConfig:
    """Load and validate an endpoint config file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no endpoint config at {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
    return parse_config(data, str(path))


def parse_config(data: dict[str, Any], source: str = "<dict>") -> EndpointConfig:
    try:
        return EndpointConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def dump_config(config: EndpointConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    path.chmod(0o600)
