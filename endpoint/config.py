"""Endpoint configuration: one YAML file per endpoint, validated at load into frozen models.

A bad file fails at start with the key path, the bad value and what was expected, and suggests
the right key for a typo. Units are in the names (``heartbeat_s``, ``prefetch_target_ms``).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dlhub.protocol.curve import is_loopback


class ConfigError(ValueError):
    """A config file could not be loaded; the message names the key and the problem."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ManagerLink(_Frozen):
    address: str = Field(
        pattern=r"^tcp://[^\s:/]+:\d{1,5}$",
        description="the manager's endpoint URL, e.g. tcp://hub.example.org:5581",
    )
    token: str = Field(min_length=1, description="the endpoint's token on that manager")
    key: str | None = Field(
        default=None,
        pattern=r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$",
        description="the manager's CURVE public key (curve_public_key in its manager.json); "
        "default: the key a manager of this user on this host publishes",
    )


WALLTIME_PATTERN = r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$"


def walltime_seconds(walltime: str) -> int:
    """``[D-]HH:MM:SS`` -> seconds."""
    days, _, clock = walltime.rpartition("-")
    h, mi, sec = (int(x) for x in clock.split(":"))
    return (int(days) if days else 0) * 86400 + h * 3600 + mi * 60 + sec


class SingleNodeLauncherConfig(_Frozen):
    type: Literal["single-node"] = "single-node"


class SimpleLauncherConfig(_Frozen):
    type: Literal["simple"]


class SrunLauncherConfig(_Frozen):
    type: Literal["srun"]
    overrides: str = ""


class MpiExecLauncherConfig(_Frozen):
    type: Literal["mpiexec"]
    bind_cmd: str = "--bind-to"
    overrides: str = ""


class AprunLauncherConfig(_Frozen):
    type: Literal["aprun"]
    overrides: str = ""


LauncherConfig = Annotated[
    SingleNodeLauncherConfig
    | SimpleLauncherConfig
    | SrunLauncherConfig
    | MpiExecLauncherConfig
    | AprunLauncherConfig,
    Field(discriminator="type"),
]


class _BlockKeys(_Frozen):
    """What every provider shares: how many blocks, and what runs before the pool starts."""

    init_blocks: Annotated[int, Field(ge=0)] = 1
    min_blocks: Annotated[int, Field(ge=0)] = 0
    max_blocks: Annotated[int, Field(ge=1)] = 1
    parallelism: Annotated[float, Field(gt=0, le=1)] = 1.0
    worker_init: str = ""
    cmd_timeout_s: Annotated[int, Field(ge=1)] = 30
    launcher: LauncherConfig = SingleNodeLauncherConfig()

    @model_validator(mode="after")
    def _blocks_in_order(self):
        if not self.min_blocks <= self.max_blocks:
            raise ValueError(f"min_blocks ({self.min_blocks}) > max_blocks ({self.max_blocks})")
        if self.init_blocks > self.max_blocks:
            raise ValueError(f"init_blocks ({self.init_blocks}) > max_blocks ({self.max_blocks})")
        return self


class LocalProviderConfig(_BlockKeys):
    type: Literal["local"] = "local"


class _BatchKeys(_BlockKeys):
    nodes_per_block: Annotated[int, Field(ge=1)] = 1
    walltime: str = Field("00:30:00", pattern=WALLTIME_PATTERN)
    account: str | None = None
    scheduler_options: str = ""  # extra lines for the submit script ("#SBATCH ...", "#PBS ...")


class SlurmProviderConfig(_BatchKeys):
    type: Literal["slurm"]
    partition: str | None = None
    qos: str | None = None
    constraint: str | None = None
    clusters: str | None = None
    cores_per_node: Annotated[int, Field(ge=1)] | None = None
    mem_per_node_gb: Annotated[int, Field(ge=1)] | None = None
    gpus_per_node: Annotated[int, Field(ge=0)] | None = None
    gres: str | None = None
    exclusive: bool = True


class PBSProProviderConfig(_BatchKeys):
    type: Literal["pbspro"]
    queue: str | None = None
    select_options: str = ""  # appended to "#PBS -l select=N:ncpus=C" (e.g. ":ngpus=4")
    cpus_per_node: Annotated[int, Field(ge=1)] = 1


class TorqueProviderConfig(_BatchKeys):
    type: Literal["torque"]
    queue: str | None = None


ProviderConfig = Annotated[
    LocalProviderConfig | SlurmProviderConfig | PBSProProviderConfig | TorqueProviderConfig,
    Field(discriminator="type"),
]


CONTAINER_TYPES = Literal["none", "apptainer", "singularity", "charliecloud", "podman", "docker"]


class ContainerConfig(_Frozen):
    """Run the pool's workers inside an image (``endpoint/containers.py``); ``type: none``: not."""

    type: CONTAINER_TYPES = "none"
    image: str = ""  # a .sif file or directory image, a ch-run image, a podman/docker image name
    options: list[str] = Field(default_factory=list)  # extra runtime options, before the image
    binds: list[str] = Field(default_factory=list)  # "/host/path[:/path/in/image[:ro]]"
    python: str = Field("python3", min_length=1)  # the image's interpreter
    workdir: Annotated[str, Field(pattern=r"^/")] | None = None
    binary: str | None = None  # the runtime executable (default: apptainer, singularity, ch-run ...)
    gpu: Literal["none", "nvidia", "rocm"] = "none"  # --nv / --rocm; CDI devices for podman/docker
    mount: str = Field("/opt", pattern=r"^/")  # where the endpoint's dlhub is bound in the image
    dlhub: Literal["bind", "installed"] = "bind"  # installed: the image has dlhub and its deps

    @field_validator("binds")
    @classmethod
    def _absolute_binds(cls, binds: list[str]) -> list[str]:
        import re

        for bind in binds:
            if not re.fullmatch(r"/[^:]*(:/[^:]*)?(:[a-z,]+)?", bind):
                raise ValueError(f"{bind!r}: expected /host/path[:/path/in/image[:ro]] (absolute paths)")
        return binds

    @model_validator(mode="after")
    def _image_given(self):
        if self.type != "none" and not self.image:
            raise ValueError(f"type {self.type} needs an image")
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
    # one worker per listed device, each seeing only its own (CUDA_VISIBLE_DEVICES etc.)
    accelerators: list[str] = Field(default_factory=list)
    cores_per_worker: Annotated[float, Field(gt=0)] | None = None
    memory_per_worker_gb: Annotated[float, Field(gt=0)] | None = None
    # stop giving work to a block this long before its walltime ends, so it drains
    drain_before_walltime_s: Annotated[float, Field(ge=0)] = 60.0
    # run the workers inside an image: apptainer | singularity | charliecloud | podman | docker
    container: ContainerConfig = ContainerConfig()

    def offers(self) -> dict[str, Any]:
        """What one worker of this pool offers a task (None: not declared, any request fits)."""
        return {
            "cores": self.cores_per_worker,
            "memory_gb": self.memory_per_worker_gb,
            "gpus": 1 if self.accelerators else 0,
        }

    @model_validator(mode="before")
    @classmethod
    def _one_worker_per_accelerator(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("accelerators") and "workers_per_node" not in data:
            data = {**data, "workers_per_node": len(data["accelerators"])}
        return data

    @model_validator(mode="after")
    def _accelerators_match_workers(self):
        if self.accelerators and len(self.accelerators) != self.workers_per_node:
            raise ValueError(
                f"workers_per_node ({self.workers_per_node}) must equal the number of accelerators "
                f"({len(self.accelerators)}): each worker gets one device"
            )
        return self


class NamedPoolConfig(_Frozen):
    """An extra pool: its own provider (e.g. a GPU partition) and worker shape."""

    provider: ProviderConfig = LocalProviderConfig()
    pool: PoolConfig = PoolConfig()


DEFAULT_POOL = "default"


class BatchOverride(_Frozen):
    """An admin's batching settings for one servable (``owner/name``), over its record's."""

    enabled: bool = True
    max_batch_size: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    max_batch_delay_ms: Annotated[float, Field(ge=0, le=60_000)] | None = None
    weight: Literal["count", "len"] | None = None


class BatchingConfig(_Frozen):
    """Defaults for vectorized servables whose record sets no batching policy, and overrides."""

    max_batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 64
    max_batch_delay_ms: Annotated[float, Field(ge=0, le=60_000)] = 0.0  # 0: no added latency
    servables: dict[str, BatchOverride] = Field(default_factory=dict)

    def policy_for(self, ref: str, record_policy: dict[str, Any] | None) -> dict[str, Any] | None:
        """The effective policy of a vectorized servable ``owner/name[:version]``."""
        base = {"max_batch_size": self.max_batch_size, "max_batch_delay_ms": self.max_batch_delay_ms}
        base["weight"] = "count"
        base.update(record_policy or {})
        override = self.servables.get(ref) or self.servables.get(ref.rsplit(":", 1)[0])
        if override is not None:
            if not override.enabled:
                return None
            base.update(override.model_dump(exclude_none=True, exclude={"enabled"}))
        return base


class WorkerCacheConfig(_Frozen):
    """What each worker keeps: warm servables (LRU by count and memory) and an output cache."""

    max_warm_servables: Annotated[int, Field(ge=1, le=10_000)] = 16
    memory_budget_mb: Annotated[float, Field(gt=0)] | None = None  # RSS above it evicts (LRU)
    output_cache_mb: Annotated[float, Field(ge=0)] = 64.0  # deterministic servables; 0: off


_NAME = r"^[^\s,]{1,128}$"  # user, group and owner names: no spaces or commas; "*": anyone


class PolicyConfig(_Frozen):
    """Who may submit here and what may run (``protocol/policy.py`` says how it is applied).
    ``allowed_users`` unset: only the endpoint's owner (the user whose token registered it);
    admins always pass that rule; ``"*"``: anyone with a token."""

    allowed_users: list[Annotated[str, Field(pattern=_NAME)]] | None = None
    allowed_groups: list[Annotated[str, Field(pattern=_NAME)]] = Field(default_factory=list)
    functions_by_value: bool = True  # false: only published servables run here
    allowed_servable_owners: list[Annotated[str, Field(pattern=_NAME)]] | None = None  # None: any

    @field_validator("functions_by_value", mode="before")
    @classmethod
    def _strict_bool(cls, value: Any) -> Any:
        if not isinstance(value, bool):  # "no", 0 or "false" must not pass for a security switch
            raise ValueError("must be true or false")
        return value

    def to_policy(self, endpoint: str, owner: str | None = None):
        """The rules as :class:`dlhub.protocol.policy.Policy` (owner known after registering)."""
        from dlhub.protocol.policy import Policy

        return Policy(endpoint, owner, **self.model_dump())


class ImageCacheConfig(_Frozen):
    """The endpoint's image cache (``endpoint/images.py``, under ``endpoints/NAME/images/``):
    a disk budget with LRU eviction of entries no running pool uses. (``images:`` is the site
    catalogue of image names.) ``allow_pull``: a servable's ``docker://``/``oras://``/
    ``library://`` container may be fetched into the cache (false: only catalogue entries and
    local images; a servable naming a registry image fails its verification). ``build``: a
    servable with requirements and no container runs in an image the endpoint builds FROM
    ``build.base`` with them installed (``endpoint/image_build.py``)."""

    budget_gb: Annotated[float, Field(gt=0, le=1_000_000)] = 20.0
    allow_pull: bool = True
    # build an image for a servable that has requirements and no container (the build: keys)
    build: bool = False

    @field_validator("allow_pull", "build", mode="before")
    @classmethod
    def _strict_bool(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value


class DataCacheConfig(_Frozen):
    """Inputs passed by reference (``File``, ``DataRef``, URLs) are staged once into
    ``endpoints/NAME/data/`` (``endpoint/staging.py``), shared by the endpoint's workers: a disk
    budget with LRU eviction of files no running task uses. A ``File(path)`` a call returns is
    copied here too; ``outputs`` says where the caller's reference points: ``manager`` (also
    stored in the manager's blob store, held by the caller, who can ``.download()`` it) or
    ``endpoint`` (only here: passed to the next call on this endpoint, not downloadable)."""

    budget_gb: Annotated[float, Field(gt=0, le=1_000_000)] = 50.0
    outputs: Literal["manager", "endpoint"] = "manager"


BUILD_RUNTIMES = ("apptainer", "singularity", "podman", "docker")


class BuildConfig(_Frozen):
    """Images the endpoint builds from a servable's requirements (``image_cache.build: true``):
    FROM ``base`` (one image for every runtime, or one per runtime: ``{podman: ..., apptainer:
    ...}``; a podman/docker image name, or for apptainer/singularity a ``docker://``/``oras://``/
    ``library://`` URI or a local .sif/sandbox path), the requirements fetched as wheels by the
    endpoint host's pip (``pip_options``: extra ``pip wheel`` options, e.g. ``["--index-url",
    URL]``) and installed in the build with no network; ``options``: extra builder options
    (``podman build ...``, ``apptainer build --fakeroot``)."""

    base: str | dict[str, str] = ""
    options: list[str] = Field(default_factory=list)
    pip_options: list[str] = Field(default_factory=list)
    timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 1800.0

    @field_validator("base")
    @classmethod
    def _bases(cls, base: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(base, dict):
            for runtime, image in base.items():
                if runtime not in BUILD_RUNTIMES:
                    raise ValueError(
                        f"base key {runtime!r} is not a runtime dlhub builds with "
                        f"({', '.join(BUILD_RUNTIMES)})"
                    )
                if not isinstance(image, str) or not image.strip():
                    raise ValueError(f"base[{runtime!r}]: needs an image")
        return base

    def base_for(self, runtime: str) -> str | None:
        if isinstance(self.base, dict):
            return self.base.get(runtime) or None
        return self.base.strip() or None


class EndpointConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    manager: ManagerLink
    provider: ProviderConfig = LocalProviderConfig()  # the "default" pool's provider
    pool: PoolConfig = PoolConfig()  # the "default" pool's workers
    # more pools by name; tasks choose one by resources ({"pool": name, "gpus": 1, ...})
    pools: dict[str, NamedPoolConfig] = Field(default_factory=dict)
    heartbeat_s: Annotated[float, Field(gt=0)] = 2.0
    heartbeat_threshold_s: Annotated[float, Field(gt=0)] = 10.0
    max_retries: Annotated[int, Field(ge=0)] = 2
    strategy_period_s: Annotated[float, Field(gt=0)] = 5.0
    max_idletime_s: Annotated[float, Field(ge=0)] = 120.0
    drain_timeout_s: Annotated[float, Field(ge=0)] = 300.0  # `stop` waits this long for running tasks
    payload_limit_bytes: Annotated[int, Field(gt=0)] = 256 * 1024 * 1024
    output_limit_bytes: Annotated[int, Field(ge=0)] = 64 * 1024
    log_max_bytes: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024
    log_backups: Annotated[int, Field(ge=0)] = 3
    batching: BatchingConfig = BatchingConfig()
    worker_cache: WorkerCacheConfig = WorkerCacheConfig()
    policy: PolicyConfig = PolicyConfig()
    image_cache: ImageCacheConfig = ImageCacheConfig()
    data_cache: DataCacheConfig = DataCacheConfig()
    # the site catalogue: a servable's container (site:NAME, or an image URI) -> a local image
    # (an absolute path) or an image reference the pool's runtime runs (URI, podman/docker name)
    images: dict[str, str] = Field(default_factory=dict)
    build: BuildConfig = BuildConfig()  # images built from requirements (image_cache.build)
    # the links to pools and workers: CURVE-encrypted (default), or "plain": ZeroMQ PLAIN with a
    # per-session password, not encrypted, only where every pool dials a loopback address (each
    # encrypted hop costs ~0.3 s per 100 MB each way; `dlhub up --insecure-loopback` sets it)
    worker_link: Literal["curve", "plain"] = "curve"

    @model_validator(mode="after")
    def _plain_links_stay_on_this_host(self):
        if self.worker_link == "plain":
            for name, named in self.all_pools().items():
                if not is_loopback(named.pool.worker_address):
                    raise ValueError(
                        f"worker_link: plain sends tasks unencrypted, so it needs workers on this host; "
                        f"pool {name!r} has worker_address {named.pool.worker_address!r} "
                        "(use 127.0.0.1, or drop worker_link for CURVE)"
                    )
        return self

    @model_validator(mode="after")
    def _build_needs_a_builder(self):
        if not self.image_cache.build:
            return self
        runtime = self.pool.container.type
        if runtime == "none":
            raise ValueError(
                "image_cache.build: true needs a container runtime for the default pool "
                "(pool.container.type is none): servable images run with that pool's runtime"
            )
        if runtime == "charliecloud":
            raise ValueError(
                "image_cache.build: charliecloud cannot build images here: ch-image comes with "
                "charliecloud-builders (it needs docker.io and buildah, not installed); build with "
                "podman, docker, apptainer or singularity, or build the image elsewhere and name it "
                "in images:"
            )
        if self.build.base_for(runtime) is None:
            raise ValueError(
                f"build.base: no base image for {runtime} (pool.container.type), which "
                f"image_cache.build: true builds with; set build.base: IMAGE or build.base: "
                f"{{{runtime}: IMAGE}}"
            )
        return self

    @field_validator("images")
    @classmethod
    def _catalogue(cls, images: dict[str, str]) -> dict[str, str]:
        from dlhub.protocol.servable import check_container

        for name, image in images.items():
            try:
                check_container(name)
            except ValueError as exc:
                hint = ""
                if ":" not in name and "/" not in name:
                    hint = f" (did you mean 'site:{name}'?)"
                raise ValueError(f"images key {name!r}: {exc}{hint}") from None
            if not isinstance(image, str) or not image.strip():
                raise ValueError(f"images[{name!r}]: needs an image (an absolute path or an image URI)")
        return images

    def all_pools(self) -> dict[str, NamedPoolConfig]:
        """Every pool, the default one first."""
        return {DEFAULT_POOL: NamedPoolConfig(provider=self.provider, pool=self.pool), **self.pools}

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, pools: dict[str, NamedPoolConfig]) -> dict[str, NamedPoolConfig]:
        import re

        for name in pools:
            if name == DEFAULT_POOL or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}", name):
                raise ValueError(
                    f"pool name {name!r} must be letters, digits, - or _ (up to 32) and not 'default'"
                )
        return pools

    @field_validator("heartbeat_threshold_s")
    @classmethod
    def _threshold_covers_heartbeats(cls, threshold: float, info: ValidationInfo) -> float:
        beat = info.data.get("heartbeat_s")
        if beat is not None and threshold < 2 * beat:
            raise ValueError(f"must be at least twice heartbeat_s ({beat})")
        return threshold


def _members(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation may hold: itself, or each member of a (tagged) union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    args = [a for a in get_args(annotation) if a is not type(None)]
    out: list[type[BaseModel]] = []
    for arg in args:
        out.extend(_members(arg))
    return out


def _tag_of(model: type[BaseModel]) -> str | None:
    """The value of a union member's ``type: Literal[...]`` field."""
    field = model.model_fields.get("type")
    literal = get_args(field.annotation) if field is not None else ()
    return str(literal[0]) if literal else None


def _resolve(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """Walk an error location: the path a user would write (union tags dropped) and the model
    that holds its last key."""
    model: type[BaseModel] | None = EndpointConfig
    path: list[str] = []
    parts = list(loc)
    while parts and model is not None:
        part = str(parts.pop(0))
        path.append(part)
        if not parts:
            break
        field = model.model_fields.get(part)
        members = _members(field.annotation) if field is not None else []
        if field is not None and get_origin(field.annotation) is dict and parts:
            path.append(str(parts.pop(0)))  # a mapping's key (e.g. a servable's name), then its value
        if len(members) > 1 and parts and str(parts[0]) in {_tag_of(mm) for mm in members}:
            tag = str(parts.pop(0))
            model = next(mm for mm in members if _tag_of(mm) == tag)
        else:
            model = members[0] if len(members) == 1 else None
    return path, model


def _explain(exc: ValidationError, source: str) -> str:
    lines = [f"invalid endpoint config {source}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            path, parent = _resolve(loc)
            known = list(parent.model_fields) if parent is not None else []
            hint = difflib.get_close_matches(path[-1], known, n=1)
            where = ".".join(path)
            suggestion = f"; did you mean {'.'.join([*path[:-1], hint[0]])}?" if hint else ""
            lines.append(f"  {where}: unknown key{suggestion} (valid here: {', '.join(known)})")
            continue
        path, _ = _resolve(loc)
        where = ".".join(path) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        if not path and err["type"] == "value_error" and re.match(r"^[a-z_]+(\.[a-z_]+)*: ", message):
            lines.append(f"  {message}")  # a rule across keys, which its message names
            continue
        if err["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        elif err["type"] == "union_tag_invalid":
            tags = err["ctx"]["expected_tags"].replace("'", "")
            got = err["ctx"]["tag"]
            hint = difflib.get_close_matches(str(got), [t.strip() for t in tags.split(",")], n=1)
            more = f"; did you mean {hint[0]}?" if hint else ""
            lines.append(f"  {where}.type: {got!r} is not one of {tags}{more}")
        elif path[-1] == "walltime" and err["type"] in ("string_pattern_mismatch", "string_type"):
            hint = ' (quote it in YAML: walltime: "01:00:00")' if isinstance(err.get("input"), int) else ""
            lines.append(f"  {where}: expected HH:MM:SS or D-HH:MM:SS, got {err.get('input')!r}{hint}")
        elif path[-1] == "address" and err["type"] == "string_pattern_mismatch":
            lines.append(f"  {where}: expected tcp://host:port, got {err.get('input')!r}")
        elif path[0] == "policy" and err["type"] in ("list_type", "string_type", "string_pattern_mismatch"):
            lines.append(
                f"  {where}: expected a list of user, group or owner names like [alice, bob] "
                f"(no spaces or commas; '*' for anyone), got {err.get('input')!r}"
            )
        elif path[-1] == "name" and err["type"] == "string_pattern_mismatch":
            lines.append(
                f"  {where}: a valid name uses letters, digits, '_', '.' or '-' (up to 64) "
                f"(got {err.get('input')!r})"
            )
        else:
            value = err.get("input")
            got = "" if isinstance(value, (dict, list)) else f" (got {value!r})"  # never echo tokens
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {message}{got}")
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
