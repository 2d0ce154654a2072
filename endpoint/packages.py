"""Servable packages at the endpoint: fetched from the manager once, kept on disk by record
digest (``<run_dir>/servables/<digest>.pkg``), and read from there after restarts. Each package's
record tells the scheduler the version's label and, for vectorized servables, its batching policy
(the record's, merged with the endpoint's ``batching:`` config)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dlhub.protocol import messages as m

if TYPE_CHECKING:
    from .config import BatchingConfig
    from .scheduler import Scheduler

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
    def __init__(self, root: Path, scheduler: Scheduler, batching: BatchingConfig):
        self.root, self.scheduler, self.batching = root, scheduler, batching

    def path(self, function: str) -> Path | None:
        digest = m.package_key(function)
        if digest is None or not all(c in "0123456789abcdef" for c in digest):
            return None
        return self.root / f"{digest}.pkg"

    def keep(self, blobs: dict[str, bytes]) -> None:
        """Packages the manager sent (other code blobs are ignored): learn and store them."""
        for function, blob in blobs.items():
            path = self.path(function)
            if path is None:
                continue
            self._learn(function, blob)
            try:
                write_atomically(path, blob)
            except OSError as exc:  # a full disk costs a refetch, nothing else
                log.warning("cannot cache servable package %s: %s", path.name, exc)

    def serve_from_disk(self) -> None:
        """Packages fetched before (by this or an earlier run of the endpoint) need no request."""
        s, found = self.scheduler, {}
        for function in s.code_requests:
            path = self.path(function)
            if path is not None and path.exists():
                found[function] = path.read_bytes()
                self._learn(function, found[function])
        if found:
            s.code_requests = [d for d in s.code_requests if d not in found]
            s.add_code(found)

    def _learn(self, function: str, blob: bytes) -> None:
        """Batching policy and label of a servable, from its package's record."""
        function = m.RUN_PREFIX + m.package_key(function)  # verify: and servable: name one version
        try:
            from dlhub.protocol.servable import unpack_package

            record, _, _ = unpack_package(blob)
        except Exception as exc:  # a bad package fails its tasks at the worker, with the reason
            log.warning("cannot read servable package %s: %s", function, exc)
            return
        policy = None
        if record.vectorized:
            record_policy = record.batching.model_dump() if record.batching else None
            policy = self.batching.policy_for(record.ref, record_policy)
        self.scheduler.set_batching(function, policy, record.ref)
