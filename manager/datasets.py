"""Data sets in the repository: published like servables (same table, name space, versions,
visibility, shares and search index; ``record_type = 'dataset'``), but ready at once: there is
nothing to verify, only that every stored file was uploaded (``files.FileStore``) with its size.

    REST publish (JSON record) --> publish_dataset: stored files present in the blob store?
        --> Repository._insert_version(record_type="dataset", status="ready")
    describe dataset  --> linked_servables (servables trained/validated on it, that the viewer sees)
    describe servable --> linked_datasets (its pinned data sets, that the viewer sees)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from dlhub.protocol.dataset import DatasetRecord, dataset_digest, parse_dataset
from dlhub.protocol.servable import ServableRecord, check_visibility, parse_ref

from .repository import PUBLISH_ATTEMPTS, NotFound, Repository, RepositoryError, Viewer, no_servable
from .schema import links_table, versions_table


def publish_dataset(
    repo: Repository,
    owner: str,
    record: DatasetRecord | dict,
    *,
    visibility: str | None = None,
    holds: Callable[[str], bool] | None = None,
) -> DatasetRecord:
    """Store a new version of a data set (ready at once); its stored files must be uploaded
    (``holds``: by the publisher, a digest alone not being the bytes; see ``FileStore.holds``)."""
    rec = record if isinstance(record, DatasetRecord) else parse_dataset(record)
    if visibility is not None:
        check_visibility(visibility)
    for path, f in sorted(rec.stored().items()):
        blob = repo.blobs.path(f.sha256)
        if not blob.exists() or (holds is not None and not holds(f.sha256)):
            raise RepositoryError(f"file {path!r} ({f.sha256}) was not uploaded: upload it, then publish")
        if blob.stat().st_size != f.size:
            raise RepositoryError(
                f"file {path!r} is {blob.stat().st_size:,} bytes as stored, the record says {f.size:,}"
            )
    for attempt in range(PUBLISH_ATTEMPTS):
        try:
            return repo._insert_version(
                owner, rec, visibility, record_type="dataset", status="ready", digest_of=dataset_digest
            )
        except sa.exc.IntegrityError:
            if attempt == PUBLISH_ATTEMPTS - 1:
                raise RepositoryError(f"could not allocate a version of {owner}/{rec.name}") from None
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


def get_dataset(repo: Repository, ref: str, viewer: Viewer | None) -> DatasetRecord:
    """The data set version ``owner/name[:version]`` (latest ready when no version) that
    ``viewer`` may see; else NotFound in the same words whether it exists or not."""
    owner, name, version = parse_ref(ref)
    if viewer is not None and not repo.access(owner, name).allows(owner, viewer):
        raise NotFound(no_servable(owner, name, version, "dataset"))
    try:
        rec, status, _ = repo.get(owner, name, version, kind="dataset")
    except NotFound:
        raise NotFound(no_servable(owner, name, version, "dataset")) from None
    if status == "deleted":
        raise NotFound(no_servable(owner, name, version, "dataset"))
    return rec


def linked_servables(repo: Repository, rec: DatasetRecord, viewer: Viewer | None) -> list[dict[str, Any]]:
    """Servable versions (not deleted) that name this data set version, which ``viewer`` may see."""
    lk, t = links_table, versions_table
    query = (
        sa.select(lk.c.owner, lk.c.name, lk.c.version, lk.c.relation, t.c.status)
        .join(t, sa.and_(t.c.owner == lk.c.owner, t.c.name == lk.c.name, t.c.version == lk.c.version))
        .where(
            lk.c.dataset_owner == rec.owner,
            lk.c.dataset_name == rec.name,
            lk.c.dataset_version == rec.version,
            t.c.status != "deleted",
        )
        .order_by(lk.c.owner, lk.c.name, lk.c.version, lk.c.relation)
    )
    with repo.engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        {"ref": f"{r.owner}/{r.name}:{r.version}", "relation": r.relation, "status": r.status}
        for r in rows
        if viewer is None or repo.access(r.owner, r.name).allows(r.owner, viewer)
    ]


def linked_datasets(repo: Repository, rec: ServableRecord, viewer: Viewer | None) -> list[dict[str, Any]]:
    """The data sets a servable version names (pinned), with their titles, which ``viewer`` may see."""
    found = []
    for relation in ("trained_on", "validated_on"):
        for ref in getattr(rec, relation, []):
            try:
                ds = get_dataset(repo, ref, viewer)
            except NotFound:
                continue
            found.append({"ref": ref, "relation": relation, "title": ds.title})
    return found
