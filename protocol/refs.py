"""Inputs by reference (issue 16, item 3): the marker a reference travels as inside a task's
arguments, shared by the client (which writes it) and the worker (which stages it).

A reference is a small plain dict among the call's top-level arguments (positional, or a keyword's
value), so it packs with msgpack like any plain data and the manager never has to look inside the
payload (it never unpickles one):

    {"__dlhub_ref__": 1, "sha256": "sha256:<hex>", "size": N, "name": "scan_0042.h5",
     "url": "https://hub/api/v1/blobs/sha256:<hex>", "grant": "<expires>.<user>.<hmac>",
     "ref": "alice/scans:3/scan_0042.h5" | "file:scan_0042.h5" | "https://..."}

``grant`` is the manager's short-lived read grant for exactly that digest (absent for a file at an
``https://`` location, which is fetched from there and checked against ``sha256``). A string
``https://...`` argument stays a string: the worker stages it only for an input its servable
declares ``file`` or ``url``.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import DLHubError

MARKER = "__dlhub_ref__"
URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")
# owner/name[:version]/path/in/the/data/set
DATAREF = re.compile(r"^(?P<owner>[A-Za-z0-9][A-Za-z0-9_.-]{0,127})/(?P<name>[a-z0-9][a-z0-9_.-]{0,79})"
                     r"(?::(?P<version>[1-9][0-9]{0,8}))?/(?P<path>\S.*)$")  # fmt: skip


class File:
    """A local file passed by reference. As an argument (``ex.submit(f, File("scan.h5"))``) it is
    uploaded once by digest and staged once per endpoint; returned by a servable or function it
    stays at the endpoint (its data cache) and the caller gets an :class:`OutputFile` to pass on
    (``dlhub.executor.File`` is this class: the worker recognizes it without importing the
    executor)."""

    def __init__(self, path: Any):
        from pathlib import Path

        self.path = Path(path)

    def __repr__(self) -> str:
        return f"File({str(self.path)!r})"


class OutputFile:
    """A file a call returned by reference: it lives in the data cache of the endpoint that ran
    the call. Pass it to the next call on that endpoint and nothing moves (the worker finds it by
    digest). ``sha256``, ``size``, ``name``."""

    def __init__(self, marker: dict):
        self.marker = {k: marker[k] for k in (MARKER, "sha256", "size", "name", "ref") if k in marker}
        self.sha256, self.size, self.name = marker.get("sha256"), marker.get("size"), marker.get("name")

    def __repr__(self) -> str:
        return f"OutputFile({self.name!r}, {self.size} bytes, {self.sha256})"


class StagingError(DLHubError):
    """An input passed by reference could not be staged at the endpoint (a 404, a digest that is
    not the one expected, a file over the cache budget, ...): the message names the reference."""

    code = "staging-failed"


def is_marker(value: Any) -> bool:
    return type(value) is dict and MARKER in value


def has_markers(args: Any, kwargs: dict) -> bool:
    """Whether any top-level argument is a reference marker (cheap: no walk below the top)."""
    for value in args:
        if type(value) is dict and MARKER in value:
            return True
    return any(type(value) is dict and MARKER in value for value in kwargs.values())


def parse_dataref(text: str) -> tuple[str, str, int | None, str]:
    """``owner/name[:version]/path`` -> (owner, name, version or None, path), else ValueError."""
    found = DATAREF.match(text) if isinstance(text, str) else None
    if found is None:
        raise ValueError(
            f"{text!r} is not a data set file reference: expected owner/name[:version]/path "
            "(e.g. alice/scans:3/scan_0042.h5)"
        )
    path = found["path"]
    if path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"{text!r}: the file path must be relative and stay inside the data set")
    version = int(found["version"]) if found["version"] else None
    return found["owner"], found["name"], version, path


def needs_staging(args: Any, kwargs: dict, fn: Any) -> bool:
    """Cheap test on the worker's hot path: a marker among the top-level arguments, or a URL
    string for a servable that declares its inputs (staged if declared ``file``/``url``)."""
    if args:
        for value in args:
            if type(value) is dict and MARKER in value:
                return True
    if kwargs and has_markers((), kwargs):
        return True
    record = getattr(fn, "record", None)
    if record is None or not args or not record.inputs:
        return False
    return any(type(a) is str and a[:4] == "http" for a in args)
