"""Staging inputs passed by reference (issue 16, item 3) into the endpoint's data cache.

    task args (deserialized on the worker) --stage_arguments--> markers / declared URLs
        |  DataCache.stage(digest, stager, source): one fetch per digest per endpoint
        v  (fcntl lock per entry; streamed into tmp/ with sha256 as it is written; renamed)
    entries/<hex of sha256>  -> the servable gets the path (or the object its input type loads)

The cache is ``endpoints/NAME/data/`` (``data_cache.budget_gb``, LRU), shared by every worker
of the endpoint. It is the image cache's machinery (:class:`dlhub.endpoint.images.ImageCache`:
``index.json``, entry locks, pins of live processes, ``_admit``'s LRU eviction, ``prune``) with
files as entries, keyed by their content digest, so a file already here (same sha256, whatever
reference brought it) is never transferred again. A staged file is pinned by the worker while
its task runs (never evicted under it), and is read-only.

Stagers are pluggable (:data:`STAGERS`, :func:`register_stager`): ``manager`` (the manager's blob
store: ``GET /api/v1/blobs/{sha256}?grant=``, the read grant the manager gave the submitting user
for that digest) and ``https``/``http`` (any URL; for a bare URL argument the cache also keeps the
URL's ``ETag``/``Last-Modified`` and asks again with ``If-None-Match``/``If-Modified-Since``, so
an unchanged file is not fetched twice). :class:`GlobusStager` documents the interface a Globus
Transfer stager implements; it is not built.

Every failure names the reference and leaves nothing half-written in the cache: a digest that
is not the one expected, an HTTP error (404 ...), a file over the cache budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

from dlhub.protocol.refs import MARKER, URL, StagingError

from .images import Entry, ImageCache, _host

DEFAULT_BUDGET_GB = 50.0
CHUNK_BYTES = 1 << 20
HTTP_TIMEOUT_S = 60.0  # connect/read, not the whole transfer
STRING_TYPES = (None, "string", "object", "file", "url")  # inputs a URL string may go to


class Stager(Protocol):
    """Fetches one object into ``dest`` (a new file in the cache's ``tmp/``), streaming and
    hashing as it writes; returns ``{"sha256": "sha256:<hex>"}`` of what it wrote with the
    response's validators (``etag``, ``last_modified``), or None when ``validators`` say the
    cached copy is current (HTTP 304)."""

    def fetch(self, source: dict[str, Any], dest: Path, validators: dict | None = None) -> dict | None: ...


class HttpStager:
    """``https://`` and ``http://``: a streamed GET (conditional when validators are given)."""

    def fetch(self, source: dict[str, Any], dest: Path, validators: dict | None = None) -> dict | None:
        import httpx

        url = source["url"]
        params = {"grant": source["grant"]} if source.get("grant") else None
        headers = {}
        if validators:
            if validators.get("etag"):
                headers["If-None-Match"] = validators["etag"]
            if validators.get("last_modified"):
                headers["If-Modified-Since"] = validators["last_modified"]
        what = source.get("ref") or url
        try:
            with httpx.stream(
                "GET", url, params=params, headers=headers, timeout=HTTP_TIMEOUT_S, follow_redirects=True
            ) as response:
                if response.status_code == 304 and validators:
                    return None
                if response.status_code == 404:
                    raise StagingError(f"{what}: not found (HTTP 404 from {_plain(url)})")
                if not response.is_success:
                    raise StagingError(f"{what}: HTTP {response.status_code} from {_plain(url)}")
                h = hashlib.sha256()
                with open(dest, "wb") as f:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        h.update(chunk)
                        f.write(chunk)
                headers = response.headers
                return {
                    "sha256": "sha256:" + h.hexdigest(),
                    "etag": headers.get("etag"),
                    "last_modified": headers.get("last-modified"),
                }
        except httpx.HTTPError as exc:
            raise StagingError(f"{what}: cannot fetch {_plain(url)}: {type(exc).__name__}: {exc}") from None


class ManagerStager(HttpStager):
    """The manager's blob store, with the read grant the manager issued for the digest."""


class GlobusStager:
    """Interface only (not built): a site with Globus Transfer would implement ``fetch`` for a
    data set file listed at a Globus collection (``source = {"collection", "path", "sha256",
    "size"}``) by submitting a transfer from that collection to the endpoint's own collection
    (``globus_sdk.TransferClient.submit_transfer`` with ``TransferData(source, dest)``, the
    destination being ``dest`` as that collection maps it), waiting for the task
    (``task_wait``), and returning ``{}``; the cache then checks the sha256 and renames the
    file into place exactly as for the other stagers. It needs the endpoint's collection id and
    a confidential client's credentials in the endpoint config, which dlhub does not model yet."""

    def fetch(self, source: dict[str, Any], dest: Path, validators: dict | None = None) -> dict | None:
        raise StagingError(
            f"{source.get('ref') or source.get('path')}: a Globus Transfer stager is not built "
            "on this endpoint"
        )


STAGERS: dict[str, Stager] = {"manager": ManagerStager(), "https": HttpStager(), "http": HttpStager()}


def register_stager(kind: str, stager: Stager) -> None:
    """Add or replace the stager for sources of ``kind`` (a site's own transfer service)."""
    STAGERS[kind] = stager


def _plain(url: str) -> str:
    return url.split("?", 1)[0]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class DataCache(ImageCache):
    """Files by content digest with a disk budget (LRU), shared by the endpoint's workers."""

    def __init__(
        self,
        root: str | os.PathLike,
        budget_bytes: int = int(DEFAULT_BUDGET_GB * 1e9),
        outputs: str = "manager",
    ):
        super().__init__(root, budget_bytes)
        self.outputs = outputs  # where a returned File's reference points: manager | endpoint
        (self.root / "urls").mkdir(mode=0o700, exist_ok=True)

    # ---- pins by key (a staged file in use by a running task) ----------------------------------

    def pin_key(self, key: str) -> Path:
        folder = self.root / "pins" / key
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        pin = folder / f"{os.getpid()}@{_host()}.{secrets.token_hex(4)}"
        pin.touch(mode=0o600)
        return pin

    def _cached(self, key: str) -> Path | None:
        """The entry's file when it is complete (its use recorded), else None."""
        final = self.root / "entries" / key
        with self._index_lock():
            index = self._read_index()
            entry = index.get(key)
            if entry is None or not final.exists():
                return None
            entry.last_used, entry.uses = time.time(), entry.uses + 1
            self._write_index(index)
        return final

    # ---- staging -------------------------------------------------------------------------------

    def stage(self, source: dict[str, Any], pins: list[Path]) -> Path:
        """A local, read-only path holding ``source`` (a marker: ``sha256``, ``size``, ``url``,
        ``grant``, ``ref``), fetched at most once per digest; the entry is pinned into ``pins``."""
        digest = source.get("sha256")
        what = source.get("ref") or source.get("url")
        if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
            raise StagingError(f"{what}: the reference carries no sha256 digest")
        key = digest.removeprefix("sha256:")
        pins.append(self.pin_key(key))
        found = self._cached(key)
        if found is not None:
            return found
        size = source.get("size")
        if isinstance(size, int) and size > self.budget_bytes:
            raise StagingError(
                f"{what}: {size:,} bytes is over this endpoint's whole data cache budget "
                f"({self.budget_bytes:,} bytes, data_cache.budget_gb)"
            )
        if not source.get("url"):  # an output left at the endpoint that made it
            raise StagingError(
                f"{what}: not in this endpoint's data cache (a file returned by reference stays at "
                "the endpoint that produced it: this is another endpoint, or it was evicted since)"
            )
        stager = STAGERS.get("manager" if source.get("grant") else _scheme(source.get("url")))
        if stager is None:
            raise StagingError(f"{what}: no stager for {source.get('url')!r} on this endpoint")
        with self._flock(self.root / "locks" / f"{key}.lock"):
            found = self._cached(key)  # another worker staged it while this one waited
            if found is not None:
                return found
            self._clean_key(key)
            tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
            try:
                got = stager.fetch(source, tmp) or {}
                self._admit_file(tmp, key, digest, what, got.get("sha256"))
            finally:
                tmp.unlink(missing_ok=True)
        return self.root / "entries" / key

    def stage_url(self, url: str, pins: list[Path]) -> Path:
        """A bare URL argument (an input declared ``file``/``url``): fetched once, kept by its
        content digest, revalidated with the server's ``ETag``/``Last-Modified`` on later calls."""
        ukey = "u" + hashlib.sha256(url.encode()).hexdigest()
        meta_path = self.root / "urls" / f"{ukey}.json"
        stager = STAGERS.get(_scheme(url))
        if stager is None:
            raise StagingError(f"{url}: no stager for this URL scheme on this endpoint")
        with self._flock(self.root / "locks" / f"{ukey}.lock"):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = None
            known = None
            if meta and (meta.get("etag") or meta.get("last_modified")):
                known = self.root / "entries" / meta["sha256"].removeprefix("sha256:")
                if not known.exists():
                    meta, known = None, None
            tmp = self.root / "tmp" / f"{ukey}.{os.getpid()}.{secrets.token_hex(4)}"
            try:
                validators = stager.fetch({"url": url, "ref": url}, tmp, meta if known else None)
                if validators is None:  # 304: the copy here is current
                    digest = meta["sha256"]
                else:
                    digest = validators.get("sha256") or _sha256_file(tmp)
                    key = digest.removeprefix("sha256:")
                    with self._flock(self.root / "locks" / f"{key}.lock"):
                        if self._cached(key) is None:
                            self._clean_key(key)
                            self._admit_file(tmp, key, digest, url, digest)
                    meta = {**validators, "url": url, "sha256": digest}
                    meta_path.write_text(json.dumps(meta))
            finally:
                tmp.unlink(missing_ok=True)
        key = digest.removeprefix("sha256:")
        pins.append(self.pin_key(key))
        found = self._cached(key)
        if found is None:
            raise StagingError(f"{url}: evicted from the data cache as soon as it was staged")
        return found

    def put_output(self, path: Path) -> dict[str, Any]:
        """A file a call returned by reference (``File(path)``): copied into the cache, hashed as
        it is copied (a file already here by digest is not kept twice); its marker."""
        path = Path(path)
        if not path.is_file():
            raise StagingError(
                f"output {path.name}: the call returned File({str(path)!r}), which is not a file "
                "on the endpoint"
            )
        tmp = self.root / "tmp" / f"out.{os.getpid()}.{secrets.token_hex(4)}"
        h = hashlib.sha256()
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK_BYTES):
                    h.update(chunk)
                    dst.write(chunk)
            digest = "sha256:" + h.hexdigest()
            key = digest.removeprefix("sha256:")
            with self._flock(self.root / "locks" / f"{key}.lock"):
                if self._cached(key) is None:
                    self._clean_key(key)
                    self._admit_file(tmp, key, digest, f"output {path.name}", digest)
        finally:
            tmp.unlink(missing_ok=True)
        size = (self.root / "entries" / key).stat().st_size
        return {MARKER: 1, "sha256": digest, "size": size, "name": path.name, "ref": f"output {path.name}"}

    def _admit_file(self, tmp: Path, key: str, digest: str, what: str, got: str | None) -> None:
        """Check ``tmp`` is ``digest`` (``got``: as hashed while it was written; a stager that
        cannot hash is read once more), then rename it into ``entries/`` and record it (LRU)."""
        got = got or _sha256_file(tmp)
        if got != digest:
            raise StagingError(
                f"{what}: the bytes received have digest {got}, not the expected {digest}; nothing was kept"
            )
        size = tmp.stat().st_size
        if size > self.budget_bytes:
            raise StagingError(
                f"{what}: {size:,} bytes is over this endpoint's whole data cache budget "
                f"({self.budget_bytes:,} bytes, data_cache.budget_gb)"
            )
        tmp.chmod(0o400)
        final = self.root / "entries" / key
        os.rename(tmp, final)
        now = time.time()
        self._admit(Entry(key, what, "data", size, now, now, str(final), digest, 1))
        self.fetches += 1


# why an output stayed at the endpoint, by the task's ``out`` option (None: the task had none)
LEFT_WHY = {
    None: "no upload grant came with the call (the caller's Executor knows no REST URL of the "
    "manager: rest_url, $DLHUB_REST_URL or Executor(rest_url=...); or the manager's REST API "
    "could not be reached when it asked for one; or the call came from the web interface)",
    "endpoint": "the call asked for it (with_options(outputs='endpoint'))",
    "config": "this endpoint's data_cache.outputs is endpoint",
}


def store_output(cache: DataCache, path: Any, out: Any) -> dict[str, Any]:
    """A ``File(path)`` a call returned: copied into the data cache (its marker), then stored at
    the manager when the task's ``out`` option is ``[upload URL, grant]`` and the endpoint's
    policy (``data_cache.outputs``) is ``manager``; else left here, the marker says why."""
    marker = cache.put_output(path)
    if cache.outputs == "endpoint":
        out = "config"
    if type(out) is list and len(out) == 2 and all(type(v) is str for v in out):
        upload_output(cache.root / "entries" / marker["sha256"].removeprefix("sha256:"), marker, *out)
        marker["at"] = "manager"
    else:
        marker["at"], marker["why"] = (
            "endpoint",
            LEFT_WHY.get(out if type(out) is str else None, LEFT_WHY[None]),
        )
    return marker


def upload_output(path: Path, marker: dict[str, Any], url: str, grant: str) -> None:
    """Stream ``path`` (a cache entry, ``marker``'s bytes) to the manager's blob store for the
    grant's user: ``POST {url}?grant&sha256&size&name`` then ``PUT {url}/{id}`` (the manager
    hashes it as it arrives and keeps it only when the digest is the one declared)."""
    import httpx

    name = marker["name"]
    what = f"output {name}"
    params = {"grant": grant, "sha256": marker["sha256"], "size": marker["size"], "name": name}

    def refused(response: httpx.Response) -> StagingError:
        try:
            message = response.json().get("message") or response.text
        except ValueError:
            message = response.text
        return StagingError(
            f"{what}: the manager refused to store it "
            f"(HTTP {response.status_code} from {_plain(url)}): {message}"
        )

    def pieces():
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk

    try:
        begun = httpx.post(url, params=params, timeout=HTTP_TIMEOUT_S)
        if not begun.is_success:
            raise refused(begun)
        answer = begun.json()
        if answer.get("complete"):  # the caller holds these bytes already
            return
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(marker["size"])}
        done = httpx.put(
            f"{url}/{answer['upload_id']}",
            params={"grant": grant, "name": name},
            content=pieces(),
            headers=headers,
            timeout=HTTP_TIMEOUT_S,
        )
        if not done.is_success:
            raise refused(done)
    except httpx.HTTPError as exc:
        raise StagingError(
            f"{what}: cannot store it at the manager ({_plain(url)}): {type(exc).__name__}: {exc}"
        ) from None


def _scheme(url: Any) -> str | None:
    if isinstance(url, str) and "://" in url:
        return url.split("://", 1)[0].lower()
    return None


# ---- arguments ----------------------------------------------------------------------------------


def stage_arguments(cache: DataCache, args: Any, kwargs: dict, fn: Any) -> tuple[list, dict, list[Path]]:
    """Markers become local paths (or the object an input declared ``ndarray`` loads), and URL
    strings given to inputs declared ``file``/``url`` are staged too. Returns the pins to drop
    when the task ends."""
    record = getattr(fn, "record", None)
    specs = list(record.inputs) if record is not None else []
    servable = record.ref if record is not None else "this function"
    pins: list[Path] = []
    try:
        out = []
        for i, value in enumerate(args):
            declared = specs[i].type if i < len(specs) else None
            out.append(_stage_one(cache, value, declared, f"input {i} of {servable}", pins))
        out_kwargs = {
            k: _stage_one(cache, v, None, f"input {k!r} of {servable}", pins) for k, v in kwargs.items()
        }
    except BaseException:
        for pin in pins:
            pin.unlink(missing_ok=True)
        raise
    return out, out_kwargs, pins


def _stage_one(cache: DataCache, value: Any, declared: str | None, where: str, pins: list[Path]) -> Any:
    if type(value) is dict and MARKER in value:
        if declared not in (None, "string", "object", "file", "url", "ndarray"):
            raise StagingError(
                f"{where} is declared {declared}: a file reference ({value.get('ref')}) goes only to "
                "inputs declared file, url, ndarray (loaded with numpy.load), string or object"
            )
        path = cache.stage(value, pins)
        return _as_declared(path, declared)
    if type(value) is str and URL.match(value) and declared is not None:
        if declared in ("file", "url"):
            return str(cache.stage_url(value, pins))
        if declared not in STRING_TYPES:
            raise StagingError(
                f"{where} is declared {declared}, not file or url: a URL ({value}) is staged only "
                "for inputs declared file or url"
            )
    return value


def _as_declared(path: Path, declared: str | None) -> Any:
    if declared == "ndarray":
        import numpy as np

        return np.load(path, allow_pickle=False)
    return str(path)


def unpin(pins: list[Path]) -> None:
    for pin in pins:
        pin.unlink(missing_ok=True)


def cache_for(config: dict[str, Any]) -> DataCache:
    """The data cache a worker's pool config names (``data_cache``), else one under the
    system's temporary directory (a worker started by hand)."""
    spec = config.get("data_cache") or {}
    root = spec.get("root") or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dlhub-data-{os.getuid()}")
    return DataCache(
        root, int(spec.get("budget_bytes") or DEFAULT_BUDGET_GB * 1e9), spec.get("outputs") or "manager"
    )


__all__ = [
    "STAGERS",
    "DataCache",
    "GlobusStager",
    "HttpStager",
    "StagingError",
    "register_stager",
    "stage_arguments",
    "store_output",
]
