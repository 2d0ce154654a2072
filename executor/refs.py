"""Inputs by reference (issue 16, item 3): ``File`` and ``DataRef`` arguments.

    ex.submit("alice/segmenter", File("scan_0042.h5"))   # hashed (streamed), uploaded once by digest
    ex.submit("alice/segmenter", DataRef("alice/scans:3/scan_0042.h5"))

At submit, each top-level ``File``/``DataRef`` argument becomes a marker
(:mod:`dlhub.protocol.refs`): a ``File`` is hashed (once per path, size and mtime while this
process lives) and uploaded through the manager's resumable upload unless the manager says this
user already sent those bytes; then ``POST /api/v1/refs`` answers the digest, the blob URL and a
read grant (a data set this user may not see: ``NotFoundError``, "there is no data set ..."). The
endpoint stages the bytes once into its cache and the servable gets a local path (or the loaded
object, as its input type declares). The result cache key counts a reference by its digest.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from dlhub.protocol.refs import MARKER, File, OutputFile, OutputNotStored, parse_dataref

__all__ = ["DataRef", "File", "OutputFile", "OutputNotStored", "RefEncoder", "has_refs"]


class DataRef:
    """A file of a published data set, ``owner/name[:version]/path``: never moves through the
    client; the endpoint stages it (latest version when none is given)."""

    def __init__(self, ref: str):
        parse_dataref(ref)  # a malformed reference fails here, not remotely
        self.ref = ref

    def __repr__(self) -> str:
        return f"DataRef({self.ref!r})"


REF_TYPES = (File, DataRef, OutputFile)
REUSE_GRANT_S = 3600.0  # a File's grant (valid 24 h) is reused this long by one Executor
RETRY_GRANT_S = 60.0  # an upload grant the manager did not give is asked again after this
log = logging.getLogger("dlhub.executor")


def has_refs(args: tuple, kwargs: dict) -> bool:
    for value in args:
        if isinstance(value, REF_TYPES):
            return True
    return any(isinstance(v, REF_TYPES) for v in kwargs.values()) if kwargs else False


class RefEncoder:
    """Turns ``File``/``DataRef`` arguments into markers for one Executor (REST client made on
    first use; digests of local files remembered by (path, size, mtime, inode))."""

    def __init__(self, rest_url: str | None, token: str, home: Path):
        self.rest_url, self.token, self.home = rest_url, token, home
        self._client = None
        self._digests: dict[tuple, tuple[str, int]] = {}
        self._granted: dict[str, tuple[float, dict]] = {}  # File digests: answer of /refs, when
        self._output: tuple[float, list | None] | None = None  # (when, out option) for outputs
        self._lock = threading.Lock()

    def client(self):
        if self._client is None:
            if not self.rest_url:
                raise ValueError(
                    "File and DataRef arguments need the manager's REST URL: rest_url in "
                    f"{self.home / 'config.json'} (dlhub up writes it), $DLHUB_REST_URL, or "
                    "Executor(rest_url=...)"
                )
            from .client import Client

            self._client = Client(self.rest_url, self.token, home=str(self.home))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def encode(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, tuple, dict]:
        """(args, kwargs) with markers for the payload, and the same with digest-only markers
        for the result-cache key (a grant changes with time, the bytes do not)."""
        out_args, key_args = [], []
        for value in args:
            marker = self._marker(value)
            out_args.append(marker)
            key_args.append({MARKER: marker["sha256"]} if marker is not value else value)
        out_kwargs, key_kwargs = {}, {}
        for name, value in kwargs.items():
            marker = self._marker(value)
            out_kwargs[name] = marker
            key_kwargs[name] = {MARKER: marker["sha256"]} if marker is not value else value
        return tuple(out_args), out_kwargs, tuple(key_args), key_kwargs

    def _marker(self, value: Any) -> Any:
        if isinstance(value, File):
            digest, answer = self._upload(value.path)
            if answer is None:
                answer = self.client()._call("POST", "/refs", json={"sha256": digest})
                with self._lock:
                    self._granted[digest] = (time.monotonic(), answer)
            answer = {**answer, "name": value.path.name, "ref": f"file:{value.path}"}
        elif isinstance(value, DataRef):
            answer = self.client()._call("POST", "/refs", json={"ref": value.ref})
        elif isinstance(value, OutputFile):
            if value.at != "manager":  # only at the endpoint that made it: found there by digest
                return dict(value.marker)
            # stored at the manager: found by digest at the endpoint that made it, which never
            # fetches it; another endpoint stages it from the manager with this read grant
            answer = {**self._read_grant(value.sha256), "name": value.name, "ref": f"output {value.name}"}
        else:
            return value
        return {MARKER: 1, **answer}

    def _read_grant(self, digest: str) -> dict:
        """``POST /refs {sha256}`` for a digest this user holds (reused ``REUSE_GRANT_S``)."""
        with self._lock:
            granted = self._granted.get(digest)
        if granted is not None and time.monotonic() - granted[0] < REUSE_GRANT_S:
            return granted[1]
        answer = self.client()._call("POST", "/refs", json={"sha256": digest})
        with self._lock:
            self._granted[digest] = (time.monotonic(), answer)
        return answer

    # ---- outputs by reference (issue 16 item 4) ------------------------------------------------

    def output_option(self, policy: str) -> list | str | None:
        """A task's ``out`` option: ``[upload URL, grant]`` (asked of the manager once, reused
        ``REUSE_GRANT_S``) so the endpoint stores a returned ``File`` at the manager; ``"endpoint"``
        when the call asks to leave it there; None without a REST URL (or when the manager could
        not give a grant: retried after ``RETRY_GRANT_S``): left at the endpoint."""
        if policy == "endpoint":
            return "endpoint"
        if not self.rest_url:
            return None
        known = self._output
        now = time.monotonic()
        if known is not None and now - known[0] < (REUSE_GRANT_S if known[1] else RETRY_GRANT_S):
            return known[1]
        try:
            answer = self.client()._call("POST", "/outputs/grant")
            value = [answer["url"], answer["grant"]]
        except Exception as exc:  # noqa: BLE001 - outputs are then left at the endpoint
            log.warning(
                "no upload grant from %s (outputs by reference stay at the endpoint): %s", self.rest_url, exc
            )
            value = None
        self._output = (now, value)
        return value

    def download(self, out: OutputFile, target: Path) -> Path:
        """Stream a manager-stored output into ``target`` (through a temporary file beside it,
        renamed once its sha256 is checked)."""
        from .dataset import stream_to

        answer = self._read_grant(out.sha256)
        client = self.client()
        what = f"output {out.name}"
        with client._http.stream("GET", answer["url"], params={"grant": answer["grant"]}) as response:
            if not response.is_success:
                response.read()
                client._raise(response)
            return stream_to(response.iter_bytes(1 << 20), target, out.sha256, what)

    def _upload(self, path: Path) -> tuple[str, dict | None]:
        """The file's digest (hashed once while it is unchanged), uploaded unless the manager
        has it for us; with the grant answered for it within the last ``REUSE_GRANT_S``."""
        from .dataset import UploadState, file_digest, upload

        try:
            st = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"File({str(path)!r}): no such file") from None
        if not path.is_file():
            raise ValueError(f"File({str(path)!r}) is not a regular file")
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            known = self._digests.get(key)
        if known is None:
            known = file_digest(path)
        digest, size = known
        with self._lock:
            granted = self._granted.get(digest)
        if granted is not None and time.monotonic() - granted[0] < REUSE_GRANT_S:
            return digest, granted[1]
        client = self.client()
        state = UploadState(self.home / "uploads.json")
        key_ = f"{client.url} {digest}"
        upload(client._call, client._request, client._raise, path, digest, size, state, key_)
        with self._lock:
            self._digests[key] = known
        return digest, None
