"""The code the manager keeps for endpoints: function blobs and servable packages, by digest.

    PutCode (a client) --> Router.put_code: stored (PersistCode) and kept here
    a task sent to an endpoint --> note_sent: its endpoint may fetch the code it names
    GetCode (an endpoint) --> in_memory (only digests its tasks named) --> load (off the loop,
    the store and the package files) --> remember

Apart from the Router because it is a cache with a byte budget and reads of its own (``load``
runs on the broker's I/O pool and touches nothing else), and because it decides which code an
endpoint may read. The Router composes one (``Router.code_book``) and keeps the methods the
broker and the tests call (``put_code``, ``code_for``, ``code_in_memory``, ``load_code``,
``remember_code``). No clock, socket or database import here either: the store comes in.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from dlhub.protocol import messages as m

log = logging.getLogger("dlhub.manager.routing")  # the Router's: its log lines read as before

MAX_CODE_PER_ENDPOINT = 100_000  # distinct code digests remembered per endpoint (what it may fetch)


class CodeBook:
    """Code blobs by digest, most recently used last, ``cache_bytes`` at most (always the newest
    one, however large). ``store`` reads function code (``get_code``), ``packages`` servable
    packages by their key."""

    def __init__(self, store: Any, packages: Callable[[str], bytes | None] | None = None):
        self.store = store
        self.packages = packages
        self.blobs: OrderedDict[str, bytes] = OrderedDict()
        self.bytes = 0
        self.cache_bytes = 256 * 1024 * 1024

    def __contains__(self, digest: str) -> bool:
        return digest in self.blobs

    def in_memory(
        self, digests: list[str], allowed: Any = None, asker: Any = None
    ) -> tuple[dict[str, bytes], list[str]]:
        """The blobs of ``digests`` held in memory, and the digests still to load. ``allowed``
        (asked by an endpoint, ``asker`` for the log): only those digests are looked up; the
        others are refused (logged) and in neither list: the endpoint is told they are missing."""
        if allowed is not None:
            refused = [d for d in digests if d not in allowed]
            if refused:
                log.warning(
                    "endpoint %r asked for %d code blob(s) none of its tasks named, refused: %s",
                    asker,
                    len(refused),
                    ", ".join(str(d)[:24] for d in refused[:3]),
                )
                digests = [d for d in digests if d in allowed]
        out, missing = {}, []
        for digest in digests:
            blob = self.blobs.get(digest)
            if blob is None:
                missing.append(digest)
            else:
                self.blobs.move_to_end(digest)
                out[digest] = blob
        return out, missing

    def load(self, digests: list[str]) -> dict[str, bytes]:
        """Read code blobs and servable packages from the store and the blob files. Touches no
        state (runs on the broker's I/O pool); :meth:`remember` keeps them after."""
        out = {}
        for digest in digests:
            if m.package_key(digest) is not None:
                blob = self.packages(m.package_key(digest)) if self.packages else None
            else:
                blob = self.store.get_code(digest)
            if blob is not None:
                out[digest] = blob
        return out

    def remember(self, blobs: dict[str, bytes]) -> None:
        for digest, blob in blobs.items():
            self.keep(digest, blob)

    def keep(self, digest: str, blob: bytes) -> None:
        if digest in self.blobs:
            self.blobs.move_to_end(digest)
            return
        self.blobs[digest] = blob
        self.bytes += len(blob)
        while self.bytes > self.cache_bytes and len(self.blobs) > 1:
            _, old = self.blobs.popitem(last=False)
            self.bytes -= len(old)


def note_sent(code_sent: OrderedDict, records: list[list]) -> None:
    """Add the code ``records`` name to ``code_sent`` (an endpoint's: the code it may fetch; most
    recent last, the oldest forgotten past MAX_CODE_PER_ENDPOINT)."""
    for rec in records:
        digest = rec[m.T_FUNCTION]
        if digest in code_sent:
            code_sent.move_to_end(digest)
        else:
            code_sent[digest] = None
            if len(code_sent) > MAX_CODE_PER_ENDPOINT:
                code_sent.popitem(last=False)


def code_matches(digest: str, blob: bytes) -> bool:
    """Whether ``digest`` is ``sha256:<hex>`` of ``blob``: code is stored and served only under
    its own digest, so nobody can plant a blob under the digest of another user's function."""
    return digest == "sha256:" + hashlib.sha256(blob).hexdigest()
