"""The search parameters, defined once, for every front end of the repository's search.

    dlhub search WORDS --owner ... (executor/repo_cli.py) --.
    Client.search(query, owner=...) (executor/client.py) ---+--> SearchQuery --to_params()--> HTTP
    GET /api/v1/servables?q=...&owner=... (manager/api.py) <-- SearchQuery.from_params(query string)
                                                               '--> Repository.search(SearchQuery) --> SQL

:class:`SearchQuery` holds the parameters and checks them (a bad one is a :class:`SearchParameterError`,
a ``ValueError`` that names it). Each field's :class:`Param` says how the front ends spell it: its
HTTP query parameter (``q`` for ``query``), its CLI option (``--all-versions``, the inverse of
``only_latest``), its bounds and its help. The REST route and the CLI build their parameters from
:data:`PARAMS`; the Client keeps an explicit signature (for editors and ``help()``), which
``tests/unit/test_search_params.py`` holds to the same names and defaults. Adding a filter (e.g.
``kind``) means a field here, marked ``filter=True``, its SQL in ``Repository.search``, and its
keyword in ``Client.search``. ``kind`` picks servables (default) or data sets; ``dataset`` and
``servable`` filter each by the links between them (``trained_on``/``validated_on``).

Standard library only: the client imports it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["FILTERS", "LIMIT_MAX", "LIMIT_MIN", "PARAMS", "Param", "SearchParameterError", "SearchQuery"]

LIMIT_MIN, LIMIT_MAX, LIMIT_DEFAULT = 1, 500, 20
KINDS = ("servable", "dataset")
REF_PATTERN = r"^$|^[A-Za-z0-9][A-Za-z0-9_.-]*/[a-z0-9][a-z0-9_.-]*(?::\d{1,9})?$"  # empty: no filter


class SearchParameterError(ValueError):
    """A search parameter out of its type or bounds; ``parameter`` is its name (the field's)."""

    def __init__(self, parameter: str, message: str):
        super().__init__(f"search parameter {parameter!r}: {message}")
        self.parameter = parameter


class Param(NamedTuple):
    """How one search parameter is spelled and bounded at each front end."""

    name: str  # the SearchQuery field, the Client's and Repository's keyword
    type: type  # str, bool or int; a filter is ``str | None``
    default: Any
    help: str
    filter: bool = False  # narrows the hits by one metadata field (Repository's SQL names it)
    http: str | None = None  # the HTTP query parameter, when not ``name``
    cli: str | None = None  # the CLI option's Python name, when not ``name``
    cli_argument: bool = False  # a CLI argument (the words), not an option
    cli_inverted: bool = False  # a CLI flag that sets the field to False (``--all-versions``)
    cli_help: str | None = None  # the CLI's help, when not ``help`` (an inverted flag's)
    minimum: int | None = None
    maximum: int | None = None
    pattern: str | None = None  # a string's regular expression (the REST schema says it too)

    @property
    def http_name(self) -> str:
        return self.http or self.name

    @property
    def cli_name(self) -> str:
        return self.cli or self.name


def _param(type_: type, default: Any, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"param": (type_, help, spec)})


@dataclass(frozen=True)
class SearchQuery:
    """One search: words, filters, and how many hits. Filters left ``None`` (or empty) match all."""

    query: str = _param(
        str, "", "words in the metadata, each a prefix; all must match", http="q", cli_argument=True
    )
    owner: str | None = _param(str, None, "the owner's user name", filter=True)
    domain: str | None = _param(str, None, "a scientific domain, e.g. materials science", filter=True)
    author: str | None = _param(str, None, 'an author, "Family, Given"', filter=True)
    related: str | None = _param(str, None, "a related identifier, e.g. a DOI", filter=True)
    dataset: str | None = _param(
        str,
        None,
        "servables trained or validated on this data set, owner/name[:version]",
        filter=True,
        pattern=REF_PATTERN,
    )
    servable: str | None = _param(
        str,
        None,
        "data sets this servable was trained or validated on, owner/name[:version]",
        filter=True,
        pattern=REF_PATTERN,
    )
    only_latest: bool = _param(
        bool,
        True,
        "only the latest ready version of each servable",
        cli="all_versions",
        cli_inverted=True,
        cli_help="every ready version, not only the latest",
    )
    limit: int = _param(int, LIMIT_DEFAULT, "at most this many hits", minimum=LIMIT_MIN, maximum=LIMIT_MAX)
    kind: str = _param(str, "servable", "what to find: servable or dataset", pattern="^(servable|dataset)$")

    def __post_init__(self) -> None:
        for p in PARAMS:
            value = getattr(self, p.name)
            if p.filter:
                if value is not None and not isinstance(value, str):
                    raise SearchParameterError(
                        p.name, f"must be a string or None, not {type(value).__name__}"
                    )
                if value == "":
                    object.__setattr__(self, p.name, None)  # empty: no filter, as the CLI and HTTP mean it
            elif p.type is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise SearchParameterError(p.name, f"must be an integer, not {type(value).__name__}")
            elif not isinstance(value, p.type):
                raise SearchParameterError(p.name, f"must be a {p.type.__name__}, not {type(value).__name__}")
            if p.pattern is not None and isinstance(value, str) and not re.search(p.pattern, value):
                wanted = (
                    f"one of {', '.join(KINDS)}" if p.name == "kind" else "owner/name or owner/name:version"
                )
                raise SearchParameterError(p.name, f"must be {wanted}, not {value!r}")
            if (p.minimum is not None and value < p.minimum) or (p.maximum is not None and value > p.maximum):
                raise SearchParameterError(
                    p.name, f"must be between {p.minimum} and {p.maximum}, not {value}"
                )

    # ---- to and from the front ends -------------------------------------------------------------

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> SearchQuery:
        """From HTTP query parameters (``q``, ``owner``, ...; already typed, as FastAPI gives them)."""
        by_http = {p.http_name: p.name for p in PARAMS}
        unknown = sorted(set(params) - set(by_http))
        if unknown:
            raise SearchParameterError(unknown[0], f"is not a search parameter (known: {', '.join(by_http)})")
        return cls(**{by_http[key]: value for key, value in params.items()})

    def to_params(self) -> dict[str, Any]:
        """HTTP query parameters: the words, ``only_latest``, ``limit``, the filters set, and
        ``kind`` unless it is the default (servable)."""
        return {
            p.http_name: getattr(self, p.name)
            for p in PARAMS
            if (not p.filter or getattr(self, p.name) is not None)
            and not (p.name == "kind" and self.kind == p.default)
        }

    @classmethod
    def from_cli(cls, options: dict[str, Any]) -> SearchQuery:
        """From the ``dlhub search`` command's values (keyed by :attr:`Param.cli_name`)."""
        values = {}
        for p in PARAMS:
            if p.cli_name in options:
                value = options[p.cli_name]
                values[p.name] = (not value) if p.cli_inverted else value
        return cls(**values)

    def keywords(self) -> dict[str, Any]:
        """The fields as keywords (``Client.search(**q.keywords())``)."""
        return {p.name: getattr(self, p.name) for p in PARAMS}

    def filters(self) -> dict[str, str]:
        """The filters set: field name -> value."""
        return {name: getattr(self, name) for name in FILTERS if getattr(self, name) is not None}


PARAMS: tuple[Param, ...] = tuple(
    Param(f.name, f.metadata["param"][0], f.default, f.metadata["param"][1], **f.metadata["param"][2])
    for f in dataclasses.fields(SearchQuery)
)
FILTERS: tuple[str, ...] = tuple(p.name for p in PARAMS if p.filter)
