"""The data set record: a published, versioned, immutable collection of files with DataCite-like
metadata, the sibling of the servable record (:mod:`dlhub.protocol.servable`).

A data set shares the servables' name space (``owner/name[:version]``), their metadata fields
(title, authors, description, domains, keywords, licence, related identifiers) and their
visibility and shares (per ``owner/name``). Each file is either stored by the manager
(content-addressed: ``sha256`` and ``size``, uploaded in chunks over REST) or listed where it
lives (``location``): an ``https://`` URL, a path on a named endpoint's file system, or a path in
a Globus collection, with its size and checksum all the same.

Servables name what they were trained and validated on (``trained_on``/``validated_on`` in the
servable record), pinned to ``owner/name:version`` at publish.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from .servable import (
    OWNER_PATTERN,
    SHA256,
    Author,
    RecordError,
    RelatedIdentifier,
    _explain,
    _Strict,
    check_name,
)

DATASET_SCHEMA_VERSION = 1
LOCATION_TYPES = ("https", "endpoint", "globus")
MAX_FILES = 100_000


class Location(_Strict):
    """Where a file the manager does not store lives: ``https`` (``url``), ``endpoint`` (``endpoint``
    and an absolute ``path`` on its file system) or ``globus`` (``collection`` id and ``path``)."""

    type: Literal[LOCATION_TYPES]  # type: ignore[valid-type]
    url: str | None = None
    endpoint: str | None = None
    collection: str | None = None
    path: str | None = None

    @field_validator("url")
    @classmethod
    def _https(cls, url: str | None) -> str | None:
        if url is not None and not re.fullmatch(r"https://[^\s/]+(/\S*)?", url):
            raise ValueError(f"{url!r} is not an https:// URL")
        return url

    @model_validator(mode="after")
    def _fields_of_its_type(self):
        needs = {"https": ("url",), "endpoint": ("endpoint", "path"), "globus": ("collection", "path")}
        wanted = needs[self.type]
        for key in ("url", "endpoint", "collection", "path"):
            given = getattr(self, key) is not None
            if key in wanted and not given:
                raise ValueError(f"a {self.type} location needs {' and '.join(wanted)}")
            if key not in wanted and given:
                raise ValueError(f"{key!r} does not apply to a {self.type} location")
        if self.path is not None and not self.path.startswith("/"):
            raise ValueError(f"path {self.path!r} must be absolute")
        return self

    def describe(self) -> str:
        if self.type == "https":
            return str(self.url)
        if self.type == "endpoint":
            return f"endpoint {self.endpoint}:{self.path}"
        return f"globus {self.collection}:{self.path}"


class DatasetFile(_Strict):
    sha256: str = Field(description="sha256:<hex> of the content")
    size: Annotated[int, Field(ge=0)]
    location: Location | None = Field(None, description="None: stored by the manager")

    @field_validator("sha256")
    @classmethod
    def _digest(cls, digest: str) -> str:
        if not SHA256.match(digest):
            raise ValueError(f"needs a digest like sha256:<64 hex>, got {digest!r}")
        return digest


class DatasetRecord(_Strict):
    schema_version: int = DATASET_SCHEMA_VERSION
    type: Literal["dataset"] = "dataset"
    owner: str | None = Field(None, pattern=OWNER_PATTERN)
    name: str
    version: Annotated[int, Field(ge=1)] | None = None
    title: str = Field(min_length=1, max_length=300)
    description: str = ""
    authors: list[Author] = Field(min_length=1)
    domains: list[str] = Field(default_factory=list)
    keywords: list[str] = Field(default_factory=list)
    license: str | None = None
    doi: str | None = Field(None, pattern=r"^10\.\d{4,9}/\S+$")
    related_identifiers: list[RelatedIdentifier] = Field(default_factory=list)
    files: dict[str, DatasetFile] = Field(description="relative path -> digest, size, location")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return check_name(name)

    @field_validator("files")
    @classmethod
    def _paths(cls, files: dict[str, DatasetFile]) -> dict[str, DatasetFile]:
        if not files:
            raise ValueError("a data set needs at least one file")
        if len(files) > MAX_FILES:
            raise ValueError(f"at most {MAX_FILES:,} files, got {len(files):,}")
        for path in files:
            parts = path.split("/")
            if not path or path.startswith("/") or ".." in parts or "" in parts or "\\" in path:
                raise ValueError(f"file path {path!r} must be relative and stay inside the data set")
        return files

    @property
    def ref(self) -> str:
        base = f"{self.owner}/{self.name}" if self.owner else self.name
        return f"{base}:{self.version}" if self.version else base

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    def stored(self) -> dict[str, DatasetFile]:
        """The files the manager keeps (no location)."""
        return {p: f for p, f in self.files.items() if f.location is None}


def parse_dataset(data: Any) -> DatasetRecord:
    """Validate a data set record, or raise :class:`RecordError` naming each bad field."""
    if not isinstance(data, dict):
        raise RecordError(f"a data set record must be a mapping, got {type(data).__name__}")
    version = data.get("schema_version", DATASET_SCHEMA_VERSION)
    if isinstance(version, int) and version > DATASET_SCHEMA_VERSION:
        raise RecordError(
            f"data set schema version {version} is newer than this dlhub understands "
            f"({DATASET_SCHEMA_VERSION}); upgrade dlhub"
        )
    try:
        return DatasetRecord.model_validate(data)
    except ValidationError as exc:
        text = _explain(exc).replace("invalid servable record", "invalid data set record")
        raise RecordError(text) from None


def dataset_digest(record: DatasetRecord) -> str:
    canonical = json.dumps(record.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
