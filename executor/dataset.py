"""``Dataset``: a data set ready to publish, and the transfers behind ``Client.publish_dataset``
and ``Client.download``.

    Dataset(name, title=..., authors=..., files=DIR | [paths] | {path: local file},
            external={path: {"url"|"endpoint"+"path"|"collection"+"path", "size", "sha256"}})
    publish: sha256 + size of each local file (streamed) -> POST /uploads -> PUT chunks at their
             offsets (a 409 says where to resume) -> POST /uploads/{id}/complete (sha256 checked
             by the manager) -> POST /datasets {record}
    download: GET /datasets/{owner}/{name}/files/{path} streamed into a temporary file beside the
              target, hashed on the way, renamed only when the sha256 is the record's

Interrupted uploads resume: the upload id of each file (by manager URL and digest) is kept in
``$DLHUB_HOME/uploads.json`` until it completes, and a new publish asks the manager how many
bytes it has. Nothing is held in memory whole: chunks are ``CHUNK_BYTES``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from dlhub.protocol import DLHubError

CHUNK_BYTES = 8 * 1024 * 1024  # per PUT (the manager takes up to 32 MiB a request)
READ_BYTES = 1024 * 1024


def file_digest(path: Path) -> tuple[str, int]:
    """(``sha256:<hex>``, size) of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def _location(path: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    spec = dict(spec)
    entry = {"sha256": spec.pop("sha256", None), "size": spec.pop("size", None)}
    if "url" in spec:
        spec.setdefault("type", "https")
    elif "collection" in spec:
        spec.setdefault("type", "globus")
    elif "endpoint" in spec:
        spec.setdefault("type", "endpoint")
    entry["location"] = spec
    return entry


class Dataset:
    """A data set to publish: metadata (DataCite-like), local files the manager will store, and
    files listed where they live (``external``). ``visibility``: public (default for a new data
    set) or private (its owner, admins, and whom it is shared with: ``Client.share``)."""

    def __init__(
        self,
        name: str,
        *,
        title: str,
        authors: Sequence[Any],
        files: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike] = (),
        external: Mapping[str, Mapping[str, Any]] | None = None,
        description: str = "",
        domains: Sequence[str] = (),
        keywords: Sequence[str] = (),
        license: str | None = None,
        doi: str | None = None,
        related_identifiers: Sequence[Any] = (),
        visibility: str | None = None,
    ):
        self.local: dict[str, Path] = _local_files(files)
        self.external = {path: _location(path, spec) for path, spec in (external or {}).items()}
        overlap = sorted(set(self.local) & set(self.external))
        if overlap:
            raise ValueError(f"files listed both as local and external: {', '.join(overlap)}")
        self.metadata: dict[str, Any] = {
            "name": name,
            "title": title,
            "authors": [{"name": a} if isinstance(a, str) else dict(a) for a in authors],
            "description": description,
            "domains": list(domains),
            "keywords": list(keywords),
            "license": license,
            "doi": doi,
            "related_identifiers": [
                {"identifier": r} if isinstance(r, str) else dict(r) for r in related_identifiers
            ],
        }
        self.visibility = visibility
        self._digests: dict[str, tuple[str, int]] = {}

    def __repr__(self) -> str:
        return f"Dataset({self.metadata['name']!r}, files={len(self.local) + len(self.external)})"

    def digests(self) -> dict[str, tuple[str, int]]:
        """(sha256, size) of each local file, computed once."""
        for path, local in self.local.items():
            if path not in self._digests:
                self._digests[path] = file_digest(local)
        return self._digests

    @property
    def record(self) -> dict[str, Any]:
        files = {path: {"sha256": d, "size": n} for path, (d, n) in self.digests().items()}
        files.update(self.external)
        return {**self.metadata, "files": dict(sorted(files.items()))}

    def validate(self):
        """The checked record, or ``RecordError`` naming each bad field (before any upload)."""
        from dlhub.protocol.dataset import parse_dataset
        from dlhub.protocol.servable import check_visibility

        if self.visibility is not None:
            check_visibility(self.visibility)
        return parse_dataset(self.record)


def _local_files(files: Any) -> dict[str, Path]:
    if isinstance(files, (str, os.PathLike)):
        root = Path(files)
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory (give a directory, a list of files or a mapping)")
        found = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        return {p.relative_to(root).as_posix(): p for p in found}
    if isinstance(files, Mapping):
        out = {str(k): Path(v) for k, v in files.items()}
    else:
        out = {Path(p).name: Path(p) for p in files}
        if len(out) != len(files):
            raise ValueError("two files have the same name; pass a mapping {path in the data set: file}")
    for path, local in out.items():
        if not local.is_file():
            raise ValueError(f"{local} (for {path!r}) is not a file")
    return out


# ---- transfers (used by Client) -----------------------------------------------------------------


class UploadState:
    """Upload ids of unfinished uploads by (manager URL, digest), so a new run resumes them."""

    def __init__(self, path: Path | None):
        self.path = path

    def _read(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text()) if self.path else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> str | None:
        return self._read().get(key)

    def set(self, key: str, upload_id: str | None) -> None:
        if self.path is None:
            return
        state = self._read()
        if upload_id is None:
            state.pop(key, None)
        else:
            state[key] = upload_id
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(state))
        except OSError:
            pass  # resuming is a convenience


def upload(
    call: Callable[..., Any],
    request: Callable[..., httpx.Response],
    raise_for: Callable[[httpx.Response], None],
    local: Path,
    digest: str,
    size: int,
    state: UploadState,
    key: str,
) -> dict[str, Any]:
    """One file into the manager's blob store; resumes an upload this home started before."""
    status = None
    upload_id = state.get(key)
    if upload_id:
        response = request("GET", f"/uploads/{upload_id}")
        status = response.json() if response.is_success else None
    if status is None:
        status = call("POST", "/uploads", json={"size": size, "sha256": digest})
        if status["complete"]:
            return status
        upload_id = status["upload_id"]
        state.set(key, upload_id)
    offset = status["offset"]
    with open(local, "rb") as f:
        while offset < size:
            length = min(CHUNK_BYTES, size - offset)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
            response = request(
                "PUT",
                f"/uploads/{upload_id}",
                params={"offset": offset},
                content=_pieces(f, offset, length, local),
                headers=headers,
            )
            if response.status_code == 409 and response.json().get("code") == "offset-mismatch":
                offset = int(response.json()["expected"])  # the manager says where to resume
                continue
            if not response.is_success:
                raise_for(response)
            offset = response.json()["offset"]
    response = request("POST", f"/uploads/{upload_id}/complete")
    if response.status_code == 422 or response.status_code == 404:
        state.set(key, None)  # discarded by the manager: a new run starts again
    if not response.is_success:
        raise_for(response)
    state.set(key, None)
    return response.json()


def _pieces(f, offset: int, length: int, local: Path) -> Iterator[bytes]:
    """One chunk of the file as pieces of ``READ_BYTES`` (the request never holds it whole)."""
    f.seek(offset)
    left = length
    while left:
        piece = f.read(min(READ_BYTES, left))
        if not piece:
            at = offset + length - left
            raise DLHubError(f"{local} is shorter than when it was hashed (at byte {at:,})")
        left -= len(piece)
        yield piece


def stream_to(chunks: Iterable[bytes], target: Path, sha256: str, what: str) -> Path:
    """Write ``chunks`` to a temporary file beside ``target``, hashing them; rename it to
    ``target`` only when the digest is ``sha256`` (else remove it and raise)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
        got = "sha256:" + h.hexdigest()
        if got != sha256:
            raise DLHubError(f"{what}: the bytes received have digest {got}, the record says {sha256}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
