"""The manager's file store: chunked, resumable uploads into the content-addressed blob store,
and streamed reads out of it.

    POST   /uploads {size, sha256}      begin(user, size, sha256) -> id (or done at once: the blob
                                        is already stored, nothing to send)
    PUT    /uploads/{id}?offset=N       append(user, id, N, chunks): N must be the bytes received
                                        so far (resume: GET says how many), else OffsetMismatch
    GET    /uploads/{id}                status(user, id): offset, size, sha256
    POST   /uploads/{id}/complete       finish(user, id): sha256 of what was received must be
                                        the one declared, then moved into the blob store

An upload is a ``<id>.part`` file and a ``<id>.json`` with its owner, declared size and digest,
under ``<blobs>/uploads/``: it survives a manager restart, and only its user may see or extend
it (another user's id is "no upload", as for one that never existed). A digest mismatch or a
size overrun discards the part (nothing half-written reaches the blob store: blobs appear by an
atomic rename of a checked file; the digest is computed as the chunks arrive, or by reading the
file again after a restart). Data sets use it for their stored files; inputs by reference
(issue 16, item 3) use the same ``begin``/``append``/``finish`` and ``open_blob``.

Holders: a user who completed an upload of a digest *holds* it (``<blobs>/holders/<hex>``, one
user per line). ``begin`` answers "complete, nothing to send" only to a holder: another user must
send the bytes once (a digest alone, read in some record, proves nothing). Read grants: a holder
(or, through a data set they may see, any viewer) gets ``grant(user, digest)``, an HMAC over
(digest, expiry, user) with the manager's ``grant.key`` (0600, beside the blobs), which the
endpoint presents to ``GET /api/v1/blobs/{digest}?grant=...``; nothing else opens a blob there.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dlhub.protocol.servable import SHA256

from .repository import BlobStore, NotFound, RepositoryError

MAX_FILE_BYTES = 1 << 40  # 1 TiB per file
UPLOAD_TTL_S = 7 * 24 * 3600.0  # an upload untouched this long is removed (at the next start)
READ_CHUNK = 1 << 20
UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
GRANT_TTL_S = 24 * 3600.0  # a task that waits longer for its endpoint fails its staging (re-submit)


class UploadError(RepositoryError):
    """An upload request that cannot be met (400/422); the message says why."""


class OffsetMismatch(UploadError):
    """A chunk sent at another offset than the bytes received so far (409)."""

    def __init__(self, upload_id: str, offset: int, expected: int):
        super().__init__(
            f"upload {upload_id}: a chunk at offset {offset:,}, but {expected:,} bytes were received "
            f"so far; resume at offset {expected:,}"
        )
        self.expected = expected


class DigestMismatch(UploadError):
    """The received bytes are not the declared digest (the upload is discarded)."""


class FileStore:
    def __init__(self, blobs: BlobStore, clock=time.time, ttl_s: float = UPLOAD_TTL_S):
        self.blobs = blobs
        self.root = blobs.root / "uploads"
        self.root.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        # upload id -> (bytes hashed, sha256 so far): hashed as the chunks arrive, so ``finish``
        # reads the file again only after a restart or a refused chunk (then it hashes it whole)
        self._hashers: dict[str, tuple[int, Any]] = {}
        self.expire(ttl_s)

    def expire(self, ttl_s: float) -> int:
        """Remove uploads not written to for ``ttl_s`` (abandoned); returns how many."""
        removed = 0
        for part in self.root.glob("*.part"):
            try:
                stale = self.clock() - part.stat().st_mtime > ttl_s
            except FileNotFoundError:
                continue
            if stale:
                self._discard(part.stem)
                removed += 1
        return removed

    # ---- uploads ---------------------------------------------------------------------------

    def begin(self, user: str, size: Any, sha256: Any) -> dict[str, Any]:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
            raise UploadError(f"size must be an integer from 0 to {MAX_FILE_BYTES:,}, got {size!r}")
        if not isinstance(sha256, str) or not SHA256.match(sha256):
            raise UploadError(f"sha256 must look like sha256:<64 hex>, got {sha256!r}")
        stored = self.blobs.has(sha256) and self.blobs.path(sha256).stat().st_size == size
        if stored and self.holds(user, sha256):  # only a holder is spared the transfer
            return {"upload_id": None, "sha256": sha256, "size": size, "offset": size, "complete": True}
        upload_id = secrets.token_hex(16)
        meta = {"user": user, "size": size, "sha256": sha256, "created": self.clock()}
        self._part(upload_id).touch()
        self._meta_path(upload_id).write_text(json.dumps(meta))
        return {"upload_id": upload_id, "sha256": sha256, "size": size, "offset": 0, "complete": False}

    def status(self, user: str, upload_id: str) -> dict[str, Any]:
        meta = self._meta(user, upload_id)
        offset = self._part(upload_id).stat().st_size
        return {"upload_id": upload_id, "sha256": meta["sha256"], "size": meta["size"], "offset": offset,
                "complete": False}  # fmt: skip

    def append(self, user: str, upload_id: str, offset: int, chunks: Iterable[bytes]) -> dict[str, Any]:
        """Write ``chunks`` at ``offset`` (which must be the end of what was received)."""
        meta = self._meta(user, upload_id)
        with self._lock(upload_id):
            part = self._part(upload_id)
            have = part.stat().st_size
            if offset != have:
                raise OffsetMismatch(upload_id, offset, have)
            hashed = self._hashers.pop(upload_id, None)
            h = hashed[1] if hashed is not None and hashed[0] == have else None
            if h is None and have == 0:
                h = hashlib.sha256()
            with part.open("ab") as f:
                for chunk in chunks:
                    have += len(chunk)
                    if have > meta["size"]:
                        f.truncate(offset)  # the chunk is refused whole: resume at its start
                        raise UploadError(
                            f"upload {upload_id}: more bytes than the declared size {meta['size']:,}"
                        )
                    f.write(chunk)
                    if h is not None:
                        h.update(chunk)
            if h is not None:
                self._hashers[upload_id] = (have, h)
        return self.status(user, upload_id)

    def finish(self, user: str, upload_id: str) -> dict[str, Any]:
        """Check the whole file against its declared digest, then move it into the blob store."""
        meta = self._meta(user, upload_id)
        with self._lock(upload_id):
            part = self._part(upload_id)
            have = part.stat().st_size
            if have != meta["size"]:
                raise UploadError(
                    f"upload {upload_id} has {have:,} of {meta['size']:,} bytes; send the rest "
                    f"from offset {have:,}"
                )
            hashed = self._hashers.pop(upload_id, None)
            whole = hashed[1].hexdigest() if hashed is not None and hashed[0] == have else file_sha256(part)
            digest = "sha256:" + whole
            if digest != meta["sha256"]:
                self._discard(upload_id)
                raise DigestMismatch(
                    f"upload {upload_id}: the bytes received have digest {digest}, not the declared "
                    f"{meta['sha256']}; the upload was discarded, start again"
                )
            self.blobs.put_file(part, digest)
            self._meta_path(upload_id).unlink(missing_ok=True)
            self.hold(user, digest)
        with self._guard:
            self._locks.pop(upload_id, None)
        return {"upload_id": upload_id, "sha256": digest, "size": have, "offset": have, "complete": True}

    # ---- reading -----------------------------------------------------------------------------

    def open_blob(self, digest: str) -> Path:
        path = self.blobs.path(digest)
        if not SHA256.match(digest) or not path.exists():
            raise NotFound(f"no stored file {digest}")
        return path

    # ---- holders and read grants -----------------------------------------------------------

    def _holders_path(self, digest: str) -> Path:
        return self.blobs.root / "holders" / digest.removeprefix("sha256:")

    def holds(self, user: str, digest: str) -> bool:
        """Whether ``user`` uploaded these bytes (completed an upload of ``digest``)."""
        try:
            return user in self._holders_path(digest).read_text().split("\n")
        except (FileNotFoundError, ValueError):
            return False

    def hold(self, user: str, digest: str) -> None:
        if not SHA256.match(digest) or self.holds(user, digest):
            return
        path = self._holders_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._guard, open(path, "a") as f:
            f.write(user + "\n")

    def _grant_key(self) -> bytes:
        key = getattr(self, "_key", None)
        if key is None:
            path = self.blobs.root.parent / "grant.key"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
            key = self._key = bytes.fromhex(path.read_text().strip())
        return key

    def grant(self, user: str, digest: str, ttl_s: float = GRANT_TTL_S) -> str:
        """A read grant for ``digest`` on behalf of ``user`` (who may read it: checked by the
        caller), valid ``ttl_s``: ``<expires>.<user>.<hmac>``."""
        expires = int(self.clock() + ttl_s)
        mac = hmac.new(self._grant_key(), f"{digest}|{expires}|{user}".encode(), "sha256").hexdigest()
        return f"{expires}.{user}.{mac}"

    def check_grant(self, digest: str, grant: str) -> str:
        """The user a valid, unexpired grant for ``digest`` was issued to, else ``NotFound``
        (a wrong or expired grant says no more than a missing blob)."""
        expires, _, rest = (grant or "").partition(".")
        user, _, mac = rest.rpartition(".")
        missing = NotFound(f"no stored file {digest} for this grant (wrong, or expired: submit again)")
        if not expires.isdigit() or not user or not SHA256.match(digest):
            raise missing
        want = hmac.new(self._grant_key(), f"{digest}|{expires}|{user}".encode(), "sha256").hexdigest()
        if not hmac.compare_digest(want, mac) or int(expires) < self.clock():
            raise missing
        return user

    # ---- upload grants (outputs by reference, issue 16 item 4) -------------------------------

    def upload_grant(self, user: str, ttl_s: float = GRANT_TTL_S) -> str:
        """A grant to store files for ``user`` (a call's outputs, sent by the endpoint that ran
        it), valid ``ttl_s``: ``<expires>.<user>.<hmac>``, its HMAC apart from read grants'."""
        expires = int(self.clock() + ttl_s)
        mac = hmac.new(self._grant_key(), f"upload|{expires}|{user}".encode(), "sha256").hexdigest()
        return f"{expires}.{user}.{mac}"

    def check_upload_grant(self, grant: Any) -> str | None:
        """The user a valid, unexpired upload grant was issued to, else None."""
        expires, _, rest = (grant if isinstance(grant, str) else "").partition(".")
        user, _, mac = rest.rpartition(".")
        if not expires.isdigit() or not user:
            return None
        want = hmac.new(self._grant_key(), f"upload|{expires}|{user}".encode(), "sha256").hexdigest()
        if not hmac.compare_digest(want, mac) or int(expires) < self.clock():
            return None
        return user

    def discard(self, user: str, upload_id: str) -> None:
        """Remove an unfinished upload of ``user`` (an output upload that failed half way)."""
        try:
            self._meta(user, upload_id)
        except NotFound:
            return
        with self._lock(upload_id):
            self._discard(upload_id)

    # ---- internals ---------------------------------------------------------------------------

    def _part(self, upload_id: str) -> Path:
        return self.root / f"{upload_id}.part"

    def _meta_path(self, upload_id: str) -> Path:
        return self.root / f"{upload_id}.json"

    def _meta(self, user: str, upload_id: str) -> dict[str, Any]:
        missing = NotFound(f"there is no upload {upload_id}")
        if not isinstance(upload_id, str) or not UPLOAD_ID.match(upload_id):
            raise missing
        try:
            meta = json.loads(self._meta_path(upload_id).read_text())
        except (FileNotFoundError, ValueError):
            raise missing from None
        if meta.get("user") != user or not self._part(upload_id).exists():
            raise missing
        return meta

    def _discard(self, upload_id: str) -> None:
        self._hashers.pop(upload_id, None)
        self._part(upload_id).unlink(missing_ok=True)
        self._meta_path(upload_id).unlink(missing_ok=True)

    def _lock(self, upload_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(upload_id, threading.Lock())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_chunks(path: Path, start: int = 0) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(READ_CHUNK):
            yield chunk
