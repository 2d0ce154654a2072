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
# owner/name[:version]/path/in/the/data/set. The path's first character is neither whitespace nor
# a control character, spelled so every regex engine that reads this pattern agrees (Python's re,
# pydantic-core's Rust regex, the OpenAPI fuzzer's generator): Python counts U+0085 as whitespace,
# a generator that goes by Unicode categories (it is a control) did not, and the REST API then
# refused a reference its own schema allowed
DATAREF = re.compile(r"^(?P<owner>[A-Za-z0-9][A-Za-z0-9_.-]{0,127})/(?P<name>[a-z0-9][a-z0-9_.-]{0,79})"
                     r"(?::(?P<version>[1-9][0-9]{0,8}))?/(?P<path>[^\s\x00-\x1f\x7f-\x9f].*)$")  # fmt: skip


class File:
    """A local file passed by reference. As an argument (``ex.submit(f, File("scan.h5"))``) it is
    uploaded once by digest and staged once per endpoint; returned by a servable or function it
    is kept in the endpoint's data cache and stored in the manager's blob store for the caller
    (or only kept at the endpoint, by policy), and the caller gets an :class:`OutputFile` to
    ``download()`` or pass on (``dlhub.executor.File`` is this class: the worker recognizes it
    without importing the executor)."""

    def __init__(self, path: Any):
        from pathlib import Path

        self.path = Path(path)

    def __repr__(self) -> str:
        return f"File({str(self.path)!r})"


class OutputFile:
    """A file a call returned by reference (``File(path)``): ``sha256``, ``size``, ``name``,
    ``at`` (``"manager"``: stored in the manager's blob store, held by the caller; ``"endpoint"``:
    only in the data cache of the endpoint that ran the call, ``why`` says why).

    ``out.download()`` / ``out.download("dir/or/file")`` streams a manager-stored output to a
    local file (sha256 checked) and returns its path; pass ``out`` to the next call and nothing
    moves through the client (the endpoint that made it finds it by digest, another stages it
    from the manager)."""

    KEYS = (MARKER, "sha256", "size", "name", "ref", "at", "why")

    def __init__(self, marker: dict, refs: Any = None):
        self.marker = {k: marker[k] for k in self.KEYS if k in marker}
        self.sha256, self.size, self.name = marker.get("sha256"), marker.get("size"), marker.get("name")
        self.at = marker.get("at", "endpoint")
        self.why = marker.get("why")
        self._refs = refs  # the Executor's RefEncoder (its REST client): set by the future

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_refs": None}

    def __repr__(self) -> str:
        return f"OutputFile({self.name!r}, {self.size} bytes, {self.sha256}, at {self.at})"

    def download(self, path: Any = None) -> Any:
        """The output's bytes in a local file: ``path`` (a folder: the output's name in it;
        default the output's name in the current directory), streamed and checked against
        ``sha256`` (a mismatch leaves nothing behind). Returns its ``pathlib.Path``."""
        from pathlib import Path

        if self.at != "manager":
            raise OutputNotStored(
                f"output {self.name} ({self.sha256}) was left at the endpoint that made it, not stored "
                f"at the manager, so it cannot be downloaded: {self.why or 'the endpoint did not store it'}. "
                "Pass it to a next call on that endpoint, or return it by value"
            )
        if self._refs is None:
            raise OutputNotStored(
                f"output {self.name}: this OutputFile came from no Executor, which downloads through "
                "its REST client (use the one a future's result() gave)"
            )
        name = Path(str(self.name or "")).name  # the endpoint's name for it, never a path
        if name in ("", ".", ".."):
            name = str(self.sha256).removeprefix("sha256:")
        target = Path.cwd() / name if path is None else Path(path)
        if target.is_dir():
            target = target / name
        return self._refs.download(self, target)


class OutputNotStored(DLHubError):
    """``OutputFile.download()`` of an output left at the endpoint (not stored at the manager)."""

    code = "output-not-stored"


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
