"""The servable record: what a published model or function is, in one versioned schema.

A record describes one immutable version of ``owner/name``: who made it and how to cite it
(DataCite-like metadata), what goes in and comes out (types with shapes and dtypes), examples that
the endpoint runs to verify it before it becomes ``ready``, how to load it (``kind`` and
``entry_point``), its files (content-addressed by sha256), its requirements and the environment
it was built in. The manager stores records and routes calls by them; builders (executor) make
them; loaders (endpoint) run them.

The schema is versioned (``schema_version``). :func:`parse_record` upgrades older records through
``UPGRADES`` and refuses newer ones with a message that says to upgrade; every validation error
names the field path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import DLHubError

SCHEMA_VERSION = 2  # 2: vectorized + batching
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,79}$"


def check_name(name: str) -> str:
    """A servable's or data set's name, or ValueError saying what a name may be."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(
            f"{name!r} must be lowercase letters, digits, '.', '_' or '-' (up to 80), "
            "starting with a letter or digit"
        )
    return name


OWNER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")

KINDS = ("function", "method", "sklearn", "torch", "pipeline")
STATUSES = ("pending", "ready", "failed", "deleted")
VALUE_TYPES = (
    "string",
    "number",
    "integer",
    "boolean",
    "list",
    "tuple",
    "dict",
    "ndarray",
    "object",
    "file",
    "url",  # a file given by URL (or File/DataRef): staged by the endpoint, a local path to the servable
    "none",
)


class RecordError(DLHubError, ValueError):
    """A servable record is invalid; the message names each bad field."""

    code = "invalid-record"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Author(_Strict):
    name: str = Field(min_length=1, description='"Family, Given" as DataCite writes creators')
    affiliation: str | None = None
    orcid: str | None = Field(None, pattern=r"^\d{4}-\d{4}-\d{4}-\d{3}[\dX]$")


class RelatedIdentifier(_Strict):
    identifier: str = Field(min_length=1)
    type: Literal["DOI", "URL", "arXiv", "Handle", "other"] = "DOI"
    relation: str = Field("IsDescribedBy", description="DataCite relationType, e.g. IsDerivedFrom")


class TypeSpec(_Strict):
    """One input or output: its type, and for arrays the shape (None = any size) and dtype."""

    type: Literal[VALUE_TYPES]  # type: ignore[valid-type]
    description: str = ""
    shape: list[int | None] | None = None
    dtype: str | None = None
    item_type: TypeSpec | None = None  # for lists

    @model_validator(mode="after")
    def _array_fields_only_for_arrays(self):
        if (self.shape is not None or self.dtype is not None) and self.type != "ndarray":
            raise ValueError("shape and dtype apply to type ndarray only")
        return self


class Example(_Strict):
    """A call and the output it must give; floats and arrays compare with the tolerances."""

    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    output: Any = None
    rtol: Annotated[float, Field(ge=0)] = 1e-7
    atol: Annotated[float, Field(ge=0)] = 0.0


class BatchPolicy(_Strict):
    """How the endpoint groups queued calls of a vectorized servable into one call."""

    max_batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 64
    max_batch_delay_ms: Annotated[float, Field(ge=0, le=60_000)] = 0.0  # 0: batch what waits
    weight: Literal["count", "len"] = "count"  # len: the first argument's length counts


class ServableRecord(_Strict):
    schema_version: int = SCHEMA_VERSION
    # identity: owner and version are set by the manager at publish time
    owner: str | None = Field(None, pattern=OWNER_PATTERN)
    name: str
    version: Annotated[int, Field(ge=1)] | None = None
    # metadata
    title: str = Field(min_length=1, max_length=300)
    description: str = ""
    authors: list[Author] = Field(min_length=1)
    domains: list[str] = Field(default_factory=list)
    keywords: list[str] = Field(default_factory=list)
    license: str | None = None
    related_identifiers: list[RelatedIdentifier] = Field(default_factory=list)
    # interface
    inputs: list[TypeSpec] = Field(default_factory=list)
    output: TypeSpec = TypeSpec(type="object")
    examples: list[Example] = Field(default_factory=list)
    # how to run it (kind and files come first: the fields after them are checked against them)
    kind: Literal[KINDS]  # type: ignore[valid-type]
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256:<hex>")
    entry_point: str = Field(
        min_length=1,
        description="function: a code digest or module:function in the files; method: "
        "file.pkl:method; sklearn: file.joblib:predict|predict_proba; torch: file.pt; "
        "pipeline: unused (see steps)",
    )
    steps: list[str] = Field(
        default_factory=list, validate_default=True, description="pipeline: owner/name[:version] in order"
    )
    requirements: list[str] = Field(default_factory=list, description="pip requirement specifiers")
    environment: dict[str, str] = Field(default_factory=dict, description="python, package versions")
    deterministic: bool = False  # same inputs, same output: results may be cached
    vectorized: bool = False  # takes a list of inputs, returns a list of outputs
    batching: BatchPolicy | None = None  # for vectorized servables (endpoint config may override)
    # the environment it runs in: a site image name (site:NAME, mapped by the endpoint's ``images:``
    # catalogue), an image URI (docker://, oras://, library://, file://) or an absolute path on the
    # endpoint; None: the pool's own container (or none). Left out of the digest when None, so
    # records without a container keep their digest (and schema version 2: the field has a default).
    container: str | None = Field(
        None, description="site:NAME, docker://, oras://, library://, file:///path or /path"
    )
    # data sets it was trained and validated on (owner/name[:version]; pinned to a version at
    # publish). Left out of the digest when empty, like ``container``.
    trained_on: list[str] = Field(default_factory=list, description="data sets: owner/name[:version]")
    validated_on: list[str] = Field(default_factory=list, description="data sets: owner/name[:version]")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return check_name(name)

    @field_validator("files")
    @classmethod
    def _files_are_relative_and_hashed(cls, files: dict[str, str]) -> dict[str, str]:
        for path, digest in files.items():
            if path.startswith("/") or ".." in path.split("/") or not path:
                raise ValueError(f"file path {path!r} must be relative and stay inside the package")
            if not SHA256.match(digest):
                raise ValueError(f"file {path!r} needs a digest like sha256:<64 hex>, got {digest!r}")
        return files

    @field_validator("entry_point")
    @classmethod
    def _entry_point_is_shipped(cls, entry_point: str, info: ValidationInfo) -> str:
        if info.data.get("kind") in ("sklearn", "torch", "method"):
            target = entry_point.split(":", 1)[0]
            if target not in info.data.get("files", {}):
                raise ValueError(f"names {target!r}, which is not among the files")
        return entry_point

    @field_validator("steps")
    @classmethod
    def _steps_for_pipelines(cls, steps: list[str], info: ValidationInfo) -> list[str]:
        kind = info.data.get("kind")
        if kind == "pipeline" and len(steps) < 2:
            raise ValueError("a pipeline needs at least two steps")
        if kind != "pipeline" and steps:
            raise ValueError(f"apply to kind pipeline only, not {kind}")
        for step in steps:
            try:
                parse_ref(step)
            except RecordError as exc:
                raise ValueError(str(exc)) from None
        return steps

    @field_validator("requirements")
    @classmethod
    def _requirements_parse(cls, requirements: list[str]) -> list[str]:
        from packaging.requirements import InvalidRequirement, Requirement

        for text in requirements:
            try:
                Requirement(text)
            except InvalidRequirement as exc:
                raise ValueError(f"{text!r} is not a pip requirement specifier ({exc})") from None
        return requirements

    @field_validator("container")
    @classmethod
    def _container(cls, container: str | None) -> str | None:
        if container is not None:
            check_container(container)
        return container

    @field_validator("trained_on", "validated_on")
    @classmethod
    def _dataset_refs(cls, refs: list[str]) -> list[str]:
        for ref in refs:
            try:
                parse_ref(ref)
            except RecordError:
                raise ValueError(f"{ref!r} is not a data set reference (owner/name[:version])") from None
        if len(set(refs)) != len(refs):
            raise ValueError("names a data set twice")
        return refs

    @model_validator(mode="after")
    def _batching_needs_vectorized(self):
        if self.batching is not None and not self.vectorized:
            raise ValueError("batching applies to vectorized servables (set vectorized=True)")
        return self

    @property
    def ref(self) -> str:
        """``owner/name:version`` once published, else ``name``."""
        base = f"{self.owner}/{self.name}" if self.owner else self.name
        return f"{base}:{self.version}" if self.version else base


CONTAINER_SCHEMES = ("docker://", "oras://", "library://", "file://")
_SITE_IMAGE = re.compile(r"^site:[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def check_container(container: Any) -> str:
    """A servable's container reference, or ValueError saying what forms are accepted."""
    if not isinstance(container, str) or not container.strip() or container != container.strip():
        raise ValueError(f"container must be a non-empty string without spaces around, got {container!r}")
    if container.startswith("site:"):
        if not _SITE_IMAGE.match(container):
            raise ValueError(
                f"{container!r}: a site image is site:NAME (letters, digits, '.', '_', ':', '-')"
            )
        return container
    for scheme in CONTAINER_SCHEMES:
        if container.startswith(scheme):
            rest = container[len(scheme) :]
            if not rest or (scheme == "file://" and not rest.startswith("/")):
                needs = "an absolute path" if scheme == "file://" else "an image after it"
                raise ValueError(f"{container!r}: {scheme} needs {needs}")
            return container
    if container.startswith("/"):
        return container
    raise ValueError(
        f"{container!r} is not a container: use site:NAME, docker://, oras://, library://, "
        "file:///path or an absolute path"
    )


# schema version -> function that turns a record dict of the version before into this one
UPGRADES: dict[int, Any] = {2: lambda record: record}  # 2 only added fields with defaults


def parse_record(data: Any) -> ServableRecord:
    """Validate a record (upgrading an older schema), or raise :class:`RecordError`."""
    if not isinstance(data, dict):
        raise RecordError(f"a servable record must be a mapping, got {type(data).__name__}")
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version < 1:
        raise RecordError(f"schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise RecordError(
            f"record schema version {version} is newer than this dlhub understands "
            f"({SCHEMA_VERSION}); upgrade dlhub"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        data = {**UPGRADES[target](data), "schema_version": target}
    try:
        return ServableRecord.model_validate(data)
    except ValidationError as exc:
        raise RecordError(_explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    lines = ["invalid servable record:"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(record)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = "required field is missing"
        elif err["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


VISIBILITIES = ("public", "private")


def check_visibility(visibility: Any) -> str:
    """``public`` (anyone may find and run it) or ``private`` (its owner, admins, and the users and
    groups it is shared with). Not a record field: it belongs to ``owner/name`` and can change
    after publish, while a record (and its digest, which names the package) never changes."""
    if visibility not in VISIBILITIES:
        raise RecordError(f"visibility must be 'public' or 'private', got {visibility!r}")
    return visibility


def parse_ref(ref: str) -> tuple[str, str, int | None]:
    """``owner/name[:version]`` -> (owner, name, version or None for the latest ready one)."""
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]*)/([a-z0-9][a-z0-9_.-]*)(?::(\d+|latest))?", ref)
    if match is None:
        raise RecordError(f"{ref!r} is not a servable reference (owner/name or owner/name:version)")
    owner, name, version = match.groups()
    return owner, name, int(version) if version and version != "latest" else None


# ---- packages: how a published version travels to endpoints --------------------------------
#
# A package is one blob: a header byte, then msgpack {"record": dict, "files": {path: bytes},
# "steps": [package, ...]} (steps: the pinned packages of a pipeline's steps, so the whole chain
# reaches the endpoint in one fetch). Endpoints and workers cache it by the record's digest; tasks
# name it as ``servable:<digest>`` (run it) or ``verify:<digest>`` (run its examples).

PACKAGE_HEADER = 0x20
from .messages import REF_PREFIX, RUN_PREFIX, VERIFY_PREFIX, package_key  # noqa: E402, F401


def record_digest(record: ServableRecord) -> str:
    """sha256 hex of the published record's canonical JSON (it names every file by digest)."""
    import hashlib
    import json

    data = record.model_dump(mode="json")
    if data.get("container") is None:  # added later: records without one keep their digest
        data.pop("container", None)
    for key in ("trained_on", "validated_on"):  # the same for links to data sets
        if not data.get(key):
            data.pop(key, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def pack_package(record: dict, files: dict[str, bytes], steps: list[bytes]) -> bytes:
    import msgpack

    body = msgpack.packb({"record": record, "files": files, "steps": steps}, use_bin_type=True)
    return bytes([PACKAGE_HEADER]) + body


def unpack_package(blob: bytes) -> tuple[ServableRecord, dict[str, bytes], list[bytes]]:
    import msgpack

    if not blob or blob[0] != PACKAGE_HEADER:
        raise RecordError("not a servable package")
    try:
        data = msgpack.unpackb(blob[1:], raw=False)
    except Exception as exc:  # msgpack raises several types for truncated or malformed input
        raise RecordError(f"malformed servable package: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or not {"record", "files", "steps"} <= data.keys():
        raise RecordError("malformed servable package: expected a mapping of record, files and steps")
    files, steps = data["files"], data["steps"]
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, bytes) for k, v in files.items()
    ):
        raise RecordError("malformed servable package: files must map paths to bytes")
    if not isinstance(steps, list) or not all(isinstance(s, bytes) for s in steps):
        raise RecordError("malformed servable package: steps must be a list of packages")
    return parse_record(data["record"]), files, steps
