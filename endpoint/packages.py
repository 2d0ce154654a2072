"""Servable packages at the endpoint: fetched from the manager once, kept on disk by record
digest (``<run_dir>/servables/<digest>.pkg``), and read from there after restarts. Each package's
record tells the scheduler the version's label and, for vectorized servables, its batching policy
(the record's, merged with the endpoint's ``batching:`` config), as :class:`ServableLearned`
events the daemon hands to the Scheduler (the cache never touches it).

    Code from the manager --keep()--> disk, ServableLearned events
    RequestCode(digests) --from_disk()--> blobs found (CodeFound), ServableLearned events"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dlhub.protocol import messages as m

from .events import ServableLearned

if TYPE_CHECKING:
    from .config import BatchingConfig

log = logging.getLogger("dlhub.endpoint")


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` once (tmp + rename); concurrent writers agree, errors raise."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


class PackageCache:
    def __init__(self, root: Path, batching: BatchingConfig):
        self.root, self.batching = root, batching

    def path(self, function: str) -> Path | None:
        digest = m.package_key(function)
        if digest is None or not all(c in "0123456789abcdef" for c in digest):
            return None
        return self.root / f"{digest}.pkg"

    def keep(self, blobs: dict[str, bytes], now: float) -> list[ServableLearned]:
        """Packages the manager sent (other code blobs are ignored): store them, and say what
        their records tell."""
        learned = []
        for function, blob in blobs.items():
            path = self.path(function)
            if path is None:
                continue
            learned += self._learn(function, blob, now)
            try:
                write_atomically(path, blob)
            except OSError as exc:  # a full disk costs a refetch, nothing else
                log.warning("cannot cache servable package %s: %s", path.name, exc)
        return learned

    def from_disk(self, digests: list[str], now: float) -> tuple[dict[str, bytes], list[ServableLearned]]:
        """Packages fetched before (by this or an earlier run of the endpoint) need no request:
        the ones of ``digests`` found on disk, and what their records tell."""
        found: dict[str, bytes] = {}
        learned: list[ServableLearned] = []
        for function in digests:
            path = self.path(function)
            if path is not None and path.exists():
                found[function] = path.read_bytes()
                learned += self._learn(function, found[function], now)
        return found, learned

    def _learn(self, function: str, blob: bytes, now: float) -> list[ServableLearned]:
        """Batching policy and label of a servable, from its package's record."""
        function = m.RUN_PREFIX + m.package_key(function)  # verify: and servable: name one version
        try:
            from dlhub.protocol.servable import unpack_package

            record, _, _ = unpack_package(blob)
        except Exception as exc:  # a bad package fails its tasks at the worker, with the reason
            log.warning("cannot read servable package %s: %s", function, exc)
            return []
        policy = None
        if record.vectorized:
            record_policy = record.batching.model_dump() if record.batching else None
            policy = self.batching.policy_for(record.ref, record_policy)
        return [ServableLearned(now, function, policy, record.ref)]
