"""The servable repository: versioned records in SQL, files as content-addressed blobs on disk.

    publish: check the files against the record's digests -> write blobs (idempotent) ->
             one transaction: next version number, row with status ``pending``, search entry
    verify (on an endpoint, elsewhere) -> mark_ready | mark_failed(error)
    route:   get(owner, name, None) = the latest *ready* version; failed/pending never route

Versions count up per ``owner/name`` and are never reused (failed and deleted ones keep their
number). A manager killed between the blob writes and the commit leaves only unreferenced blobs
(content-addressed, harmless); one killed after the commit leaves a ``pending`` version that
:meth:`Repository.fail_interrupted` marks ``failed`` at the next start, so nothing is ever
half-published. Search is full text (SQLite FTS5 with bm25 ranking, or PostgreSQL's tsvector with
ts_rank), with filters by owner, domain, author and related identifier.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dlhub.protocol.search import SearchQuery
from dlhub.protocol.servable import (
    ServableRecord,
    check_visibility,
    pack_package,
    parse_record,
    parse_ref,
    record_digest,
)

from .schema import FTS_DDL, access_table, links_table, shares_table, versions_table  # noqa: F401 - re-exported


def _like_literal(value: str) -> str:
    """``value`` matched literally by LIKE ... ESCAPE '\\' (``%`` and ``_`` are not wildcards)."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


PUBLISH_ATTEMPTS = 20  # version numbers are max+1: concurrent publishes of one name retry
SQLITE_RANK = "bm25(servable_fts, 0, 0, 0, 10.0, 4.0, 1.0)"  # weights by column, lower is better
# each search filter (dlhub.protocol.search.FILTERS) as SQL: (column of servable_versions, match);
# "equals": the column is the value; "listed": the value is one of the column's |a|b| list, any case
SEARCH_FILTER_SQL = {
    "owner": ("owner", "equals"),
    "domain": ("domains", "listed"),
    "author": ("authors", "listed"),
    "related": ("related", "listed"),
    "dataset": ("dataset", "links"),  # servables linked to this data set (dataset_links)
    "servable": ("servable", "links"),  # data sets this servable is linked to
}
RECORD_TYPES = ("servable", "dataset")
LINK_RELATIONS = ("trained_on", "validated_on")


class RepositoryError(ValueError):
    """A repository request cannot be met; the message says why."""


class NotFound(RepositoryError):
    pass


def no_servable(owner: str, name: str, version: int | None = None, kind: str = "servable") -> str:
    """The one message for a servable (or data set) that does not exist *or that the caller may
    not see*: the same words either way, so a private servable's existence never leaks."""
    what = "data set" if kind == "dataset" else "servable"
    return f"there is no {what} {owner}/{name}" + (f":{version}" if version else "")


def parse_any(record: dict[str, Any], kind: str) -> Any:
    """A stored record of either kind, validated."""
    if kind == "dataset":
        from dlhub.protocol.dataset import parse_dataset

        return parse_dataset(record)
    return parse_record(record)


@dataclass(frozen=True)
class Viewer:
    """Who is asking: a user, whether an admin, and the groups the user is in."""

    user: str
    admin: bool = False
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Access:
    """A servable's visibility and shares (one per owner/name; no row: public, no shares)."""

    visibility: str = "public"
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    def allows(self, owner: str, viewer: Viewer) -> bool:
        """The owner, admins, and (when private) the users and groups it is shared with."""
        return (
            self.visibility == "public"
            or viewer.admin
            or viewer.user == owner
            or viewer.user in self.users
            or not self.groups.isdisjoint(viewer.groups)
        )

    def as_dict(self) -> dict[str, Any]:
        return {"visibility": self.visibility, "users": sorted(self.users), "groups": sorted(self.groups)}


class BlobStore:
    """Files by sha256 under ``root/ab/cdef...``; writes are atomic and idempotent."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.root / hexd[:2] / hexd[2:]

    def put(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        return digest

    def put_file(self, source: Path, digest: str) -> str:
        """Move a file already checked to have ``digest`` into the store (atomic rename)."""
        target = self.path(digest)
        if target.exists():
            Path(source).unlink(missing_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        return digest

    def get(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no blob {digest}") from None

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()


def _bars(values: list[str]) -> str:
    return "|" + "".join(f"{v.lower()}|" for v in values)


def _search_texts(rec: ServableRecord) -> dict[str, str]:
    return {
        "title": f"{rec.name.replace('-', ' ').replace('_', ' ')}\n{rec.title}",
        "tags": "\n".join([*rec.keywords, *rec.domains]),
        "body": "\n".join([rec.description, *(a.name for a in rec.authors)]),
    }


class Repository:
    def __init__(self, engine: sa.Engine, blob_root: Path, clock=time.time):
        if engine.dialect.name not in FTS_DDL:
            raise RepositoryError(f"the repository supports SQLite and PostgreSQL, not {engine.dialect.name}")
        self.engine = engine
        self.dialect = engine.dialect.name
        self.blobs = BlobStore(blob_root)
        self.clock = clock
        self.generation = 0  # bumped on every status change: routing caches compare it
        with engine.begin() as conn:
            for statement in FTS_DDL[self.dialect]:
                conn.exec_driver_sql(statement)
        self._backfill_digests()

    def _backfill_digests(self) -> None:
        """Rows from before the digest column (schema 3) get theirs, so their packages resolve."""
        t = versions_table
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(t.c.owner, t.c.name, t.c.version, t.c.record).where(t.c.digest.is_(None))
            )
            for row in rows.all():
                digest = record_digest(parse_record(json.loads(row.record)))
                conn.execute(
                    t.update()
                    .where(t.c.owner == row.owner, t.c.name == row.name, t.c.version == row.version)
                    .values(digest=digest)
                )

    # ---- publishing ----------------------------------------------------------------------------

    def publish(
        self,
        owner: str,
        record: ServableRecord | dict,
        files: dict[str, bytes],
        *,
        visibility: str | None = None,
        publisher: Viewer | None = None,
    ) -> ServableRecord:
        """Store a new version as ``pending``; returns the record with owner and version set.
        ``visibility`` (public|private), when given, becomes the servable's (in the same
        transaction, so a private version is never visible, even briefly); otherwise a new
        servable is public and an existing one keeps its own. ``publisher``: a pipeline may pin
        only steps this viewer may see (None: no check, e.g. tests and internal use)."""
        rec = record if isinstance(record, ServableRecord) else parse_record(record)
        if visibility is not None:
            check_visibility(visibility)
        missing = sorted(set(rec.files) - set(files))
        extra = sorted(set(files) - set(rec.files))
        if missing or extra:
            raise RepositoryError(
                f"files do not match the record: missing {missing or 'none'}, unlisted {extra or 'none'}"
            )
        for path, data in files.items():
            actual = "sha256:" + hashlib.sha256(data).hexdigest()
            if actual != rec.files[path]:
                raise RepositoryError(f"file {path!r} has digest {actual}, the record says {rec.files[path]}")
        if rec.kind == "pipeline":
            rec = rec.model_copy(update={"steps": [self._pin(step, publisher) for step in rec.steps]})
        links = []
        for relation in LINK_RELATIONS:
            pinned = [self._pin_dataset(ref, relation, publisher) for ref in getattr(rec, relation)]
            rec = rec.model_copy(update={relation: pinned})
            links += [(relation, *parse_ref(ref)) for ref in pinned]
        for data in files.values():  # before the commit: a crash leaves only unreferenced blobs
            self.blobs.put(data)
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                return self._insert_version(owner, rec, visibility, links=links)
            except sa.exc.IntegrityError:  # a concurrent publish took that version number
                if attempt == PUBLISH_ATTEMPTS - 1:
                    raise RepositoryError(
                        f"could not allocate a version of {owner}/{rec.name}: too many concurrent publishes"
                    ) from None
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _insert_version(
        self,
        owner: str,
        rec: Any,
        visibility: str | None,
        *,
        record_type: str = "servable",
        status: str = "pending",
        digest_of=record_digest,
        links: list[tuple[str, str, str, int]] = (),  # type: ignore[assignment]
    ) -> Any:
        """One transaction: the next version of ``owner/name`` (servables and data sets share the
        name space: a name is one or the other), its search entry, links and visibility."""
        t = versions_table
        now = self.clock()
        with self.engine.begin() as conn:
            other = conn.execute(
                sa.select(t.c.record_type)
                .where(t.c.owner == owner, t.c.name == rec.name, t.c.record_type != record_type)
                .limit(1)
            ).scalar()
            if other is not None:
                what = "a data set" if other == "dataset" else "a servable"
                raise RepositoryError(f"{owner}/{rec.name} is {what}: choose another name")
            latest = conn.execute(
                sa.select(sa.func.max(t.c.version)).where(t.c.owner == owner, t.c.name == rec.name)
            ).scalar()
            rec = rec.model_copy(update={"owner": owner, "version": (latest or 0) + 1})
            conn.execute(
                t.insert().values(
                    owner=owner,
                    name=rec.name,
                    version=rec.version,
                    status=status,
                    record_type=record_type,
                    digest=digest_of(rec),
                    record=rec.model_dump_json(),
                    domains=_bars(rec.domains),
                    authors=_bars([a.name for a in rec.authors]),
                    related=_bars([r.identifier for r in rec.related_identifiers]),
                    created=now,
                    updated=now,
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO servable_fts (owner, name, version, title, tags, body) "
                    "VALUES (:o, :n, :v, :title, :tags, :body)"
                ),
                {"o": owner, "n": rec.name, "v": rec.version, **_search_texts(rec)},
            )
            for relation, d_owner, d_name, d_version in links:
                conn.execute(
                    links_table.insert().values(
                        owner=owner,
                        name=rec.name,
                        version=rec.version,
                        relation=relation,
                        dataset_owner=d_owner,
                        dataset_name=d_name,
                        dataset_version=d_version,
                    )
                )
            if visibility is not None:
                self._write_visibility(conn, owner, rec.name, visibility)
        if visibility is not None or status != "pending":
            self.generation += 1
        return rec

    def _pin_dataset(self, ref: str, relation: str, publisher: Viewer | None) -> str:
        """A data set a servable names (``trained_on``...) as ``owner/name:version`` of a ready
        version the publisher may see; else an error in the same words as for none at all."""
        owner, name, version = parse_ref(ref)
        missing = f"{relation} {ref!r}: {no_servable(owner, name, version, 'dataset')}"
        if publisher is not None and not self.access(owner, name).allows(owner, publisher):
            raise RepositoryError(missing)
        try:
            rec, status, _ = self.get(owner, name, version, kind="dataset")
        except NotFound:
            raise RepositoryError(missing) from None
        if status != "ready":
            raise RepositoryError(f"{relation} {ref!r} is {status}, not ready")
        return rec.ref

    def _pin(self, step: str, publisher: Viewer | None = None) -> str:
        """A pipeline step as ``owner/name:version`` of a ready version (pinned at publish), which
        the publisher may see (else the same not-found as a step that does not exist)."""
        owner, name, version = parse_ref(step)
        missing = f"pipeline step {step!r}: there is no ready version of it"
        if publisher is not None and not self.access(owner, name).allows(owner, publisher):
            raise RepositoryError(missing)
        try:
            rec, status, _ = self.get(owner, name, version)
        except NotFound:
            raise RepositoryError(missing) from None
        if status != "ready":
            raise RepositoryError(f"pipeline step {step!r} is {status}, not ready")
        return rec.ref

    def mark_ready(self, owner: str, name: str, version: int) -> None:
        self._set_status(owner, name, version, "ready", None, expect="pending")

    def mark_failed(self, owner: str, name: str, version: int, error: str) -> None:
        self._set_status(owner, name, version, "failed", error, expect="pending")

    def fail_interrupted(self) -> int:
        """At start: versions left ``pending`` by a manager that died mid-publish become failed."""
        t = versions_table
        with self.engine.begin() as conn:
            result = conn.execute(
                t.update()
                .where(t.c.status == "pending")
                .values(
                    status="failed",
                    error="publishing was interrupted (the manager stopped)",
                    updated=self.clock(),
                )
            )
        return result.rowcount

    def _set_status(self, owner, name, version, status, error, expect) -> None:
        t = versions_table
        with self.engine.begin() as conn:
            result = conn.execute(
                t.update()
                .where(t.c.owner == owner, t.c.name == name, t.c.version == version, t.c.status == expect)
                .values(status=status, error=error, updated=self.clock())
            )
        self.generation += 1
        if result.rowcount != 1:
            raise NotFound(f"{owner}/{name}:{version} is not {expect}")

    # ---- reading -------------------------------------------------------------------------------

    def get(
        self, owner: str, name: str, version: int | None = None, *, kind: str = "servable"
    ) -> tuple[Any, str, str | None]:
        """(record, status, error). ``version=None`` is the latest ready version: what calls use.
        ``kind``: servable (a :class:`ServableRecord`) or dataset (a ``DatasetRecord``)."""
        t = versions_table
        query = sa.select(t.c.record, t.c.status, t.c.error).where(
            t.c.owner == owner, t.c.name == name, t.c.record_type == kind
        )
        if version is None:
            query = query.where(t.c.status == "ready").order_by(t.c.version.desc()).limit(1)
        else:
            query = query.where(t.c.version == version, t.c.status != "deleted")
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            which = f"{owner}/{name}:{version}" if version else f"ready version of {owner}/{name}"
            raise NotFound(f"there is no {which}")
        return parse_any(json.loads(row.record), kind), row.status, row.error

    def resolve(self, owner: str, name: str, version: int | None = None) -> tuple[ServableRecord, str]:
        """(record, package digest) of a version that calls may route to: ready, not deleted."""
        try:
            rec, status, _ = self.get(owner, name, version)
        except NotFound:
            raise NotFound(self._why_not_routable(owner, name, version)) from None
        if status != "ready":
            raise NotFound(f"{rec.ref} is {status}: only ready versions run")
        t = versions_table
        with self.engine.connect() as conn:  # the digest it was published under (schema upgrades
            digest = conn.execute(  # change a re-serialized record, never a version's name)
                sa.select(t.c.digest).where(
                    t.c.owner == rec.owner, t.c.name == rec.name, t.c.version == rec.version
                )
            ).scalar()
        return rec, digest or record_digest(rec)

    def _why_not_routable(self, owner: str, name: str, version: int | None) -> str:
        t = versions_table
        query = sa.select(t.c.version, t.c.status).where(
            t.c.owner == owner, t.c.name == name, t.c.record_type == "servable"
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(t.c.version)).all()
        if version is not None:
            rows = [r for r in rows if r.version == version]
        target = f"{owner}/{name}" + (f":{version}" if version else "")
        if not rows:
            return no_servable(owner, name, version)
        states = sorted({r.status for r in rows})
        if states == ["deleted"]:
            return f"{target} was deleted"
        return f"{target} has no ready version (versions are {', '.join(states)})"

    def record_by_digest(self, digest: str) -> dict[str, Any] | None:
        t = versions_table
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.c.record).where(t.c.digest == digest)).first()
        return json.loads(row.record) if row is not None else None

    def package(self, digest: str) -> bytes | None:
        """The package blob of a version by its record digest (any status: calls already routed
        to a version that is deleted meanwhile still finish), with its pipeline steps inside."""
        t = versions_table
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.c.record).where(t.c.digest == digest)).first()
        if row is None:
            return None
        record = json.loads(row.record)
        files = {path: self.blobs.get(d) for path, d in record.get("files", {}).items()}
        steps = []
        for step in record.get("steps", []):
            owner, name, version = parse_ref(step)
            with self.engine.connect() as conn:
                step_digest = conn.execute(
                    sa.select(t.c.digest).where(t.c.owner == owner, t.c.name == name, t.c.version == version)
                ).scalar()
            blob = self.package(step_digest) if step_digest else None
            if blob is None:
                return None
            steps.append(blob)
        return pack_package(record, files, steps)

    def versions(self, owner: str, name: str, kind: str = "servable") -> list[dict[str, Any]]:
        t = versions_table
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.c.version, t.c.status, t.c.error, t.c.created)
                .where(t.c.owner == owner, t.c.name == name, t.c.record_type == kind)
                .order_by(t.c.version)
            ).all()
        if not rows:
            raise NotFound(no_servable(owner, name, kind=kind))
        return [dict(r._mapping) for r in rows]

    def exists(self, owner: str, name: str) -> bool:
        """Whether ``owner/name`` has any version (deleted ones included)."""
        t = versions_table
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.c.version).where(t.c.owner == owner, t.c.name == name).limit(1))
            return row.first() is not None

    # ---- visibility and shares (per owner/name) -----------------------------------------------

    def access(self, owner: str, name: str) -> Access:
        """The servable's visibility and shares (public, none, when nothing was set)."""
        a, sh = access_table, shares_table
        with self.engine.connect() as conn:
            visibility = conn.execute(
                sa.select(a.c.visibility).where(a.c.owner == owner, a.c.name == name)
            ).scalar()
            rows = conn.execute(
                sa.select(sh.c.kind, sh.c.principal).where(sh.c.owner == owner, sh.c.name == name)
            ).all()
        return Access(
            visibility or "public",
            frozenset(r.principal for r in rows if r.kind == "user"),
            frozenset(r.principal for r in rows if r.kind == "group"),
        )

    def set_visibility(self, owner: str, name: str, visibility: str) -> Access:
        check_visibility(visibility)
        self._must_exist(owner, name)
        with self.engine.begin() as conn:
            self._write_visibility(conn, owner, name, visibility)
        self.generation += 1
        return self.access(owner, name)

    def _write_visibility(self, conn: sa.Connection, owner: str, name: str, visibility: str) -> None:
        a = access_table
        where = (a.c.owner == owner, a.c.name == name)
        values = {"visibility": visibility, "updated": self.clock()}
        if conn.execute(a.update().where(*where).values(**values)).rowcount == 0:
            conn.execute(a.insert().values(owner=owner, name=name, **values))

    def share(self, owner: str, name: str, users=(), groups=()) -> Access:
        """Let these users and groups see ``owner/name`` (a no-op for those already shared)."""
        self._must_exist(owner, name)
        sh = shares_table
        wanted = {("user", u) for u in users} | {("group", g) for g in groups}
        with self.engine.begin() as conn:
            have = {
                (r.kind, r.principal)
                for r in conn.execute(
                    sa.select(sh.c.kind, sh.c.principal).where(sh.c.owner == owner, sh.c.name == name)
                )
            }
            now = self.clock()
            for kind, principal in sorted(wanted - have):
                conn.execute(
                    sh.insert().values(owner=owner, name=name, kind=kind, principal=principal, created=now)
                )
        self.generation += 1
        return self.access(owner, name)

    def unshare(self, owner: str, name: str, users=(), groups=()) -> Access:
        self._must_exist(owner, name)
        sh = shares_table
        with self.engine.begin() as conn:
            for kind, principals in (("user", users), ("group", groups)):
                if principals:
                    conn.execute(
                        sh.delete().where(
                            sh.c.owner == owner,
                            sh.c.name == name,
                            sh.c.kind == kind,
                            sh.c.principal.in_(list(principals)),
                        )
                    )
        self.generation += 1
        return self.access(owner, name)

    def _must_exist(self, owner: str, name: str) -> None:
        if not self.exists(owner, name):
            raise NotFound(no_servable(owner, name))

    def delete(self, owner: str, name: str, version: int | None = None) -> int:
        """Mark one version (or all) deleted: no new calls route to it; returns how many."""
        t = versions_table
        where = [t.c.owner == owner, t.c.name == name, t.c.status != "deleted", t.c.record_type == "servable"]
        if version is not None:
            where.append(t.c.version == version)
        with self.engine.begin() as conn:
            result = conn.execute(t.update().where(*where).values(status="deleted", updated=self.clock()))
            sql = "DELETE FROM servable_fts WHERE owner = :o AND name = :n"
            params: dict[str, Any] = {"o": owner, "n": name}
            if version is not None:
                sql, params["v"] = sql + " AND version = :v", version
            conn.execute(sa.text(sql), params)
        self.generation += 1
        if result.rowcount == 0:
            raise NotFound(f"nothing to delete at {owner}/{name}" + (f":{version}" if version else ""))
        return result.rowcount

    @staticmethod
    def _visible_clause(viewer: Viewer, params: dict[str, Any]) -> str:
        """SQL: the row ``v`` is public, the viewer's own, or shared with the viewer or a group of
        theirs (in SQL, so ``limit`` counts only what the viewer sees)."""
        params["viewer"] = viewer.user
        groups = sorted(viewer.groups)
        params.update({f"vg{i}": g for i, g in enumerate(groups)})
        in_groups = (
            f" OR (s.kind = 'group' AND s.principal IN ({', '.join(f':vg{i}' for i in range(len(groups)))}))"
            if groups
            else ""
        )
        return (
            " AND (v.owner = :viewer OR NOT EXISTS (SELECT 1 FROM servable_access a WHERE a.owner = v.owner"
            " AND a.name = v.name AND a.visibility = 'private') OR EXISTS (SELECT 1 FROM servable_shares s"
            " WHERE s.owner = v.owner AND s.name = v.name AND ((s.kind = 'user' AND s.principal = :viewer)"
            f"{in_groups})))"
        )

    def search(
        self,
        query: str | SearchQuery = "",
        *,
        include_unready: bool = False,
        viewer: Viewer | None = None,
        **filters: Any,
    ) -> list[dict[str, Any]]:
        """Ranked records (best first). Each word matches as a prefix anywhere in the metadata
        (``featuriz`` finds featurizer; a plural finds the singular); all words must match.
        ``query``: a :class:`SearchQuery`, or its words with its other fields as keywords
        (``owner=``, ``domain=``, ``only_latest=``, ``limit=``, ...: see :mod:`dlhub.protocol.search`).
        ``viewer``: only servables that viewer may see (None: all, for internal use)."""
        if isinstance(query, SearchQuery):
            if filters:
                raise TypeError(f"search() takes a SearchQuery or keywords, not both: {sorted(filters)}")
            search = query
        else:
            search = SearchQuery(query, **filters)
        query = search.query
        words = [w for w in "".join(c if c.isalnum() else " " for c in query.lower()).split() if w]
        words = [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words]
        params: dict[str, Any] = {}
        sql = (
            "SELECT v.owner, v.name, v.version, v.status, v.record, {rank} AS rank "
            "FROM servable_versions v {join} WHERE 1=1"
        )
        join = "JOIN servable_fts f ON f.owner = v.owner AND f.name = v.name AND f.version = v.version"
        if words and self.dialect == "sqlite":
            params["match"] = " ".join(f'"{w}"*' for w in words)
            sql = sql.format(rank=SQLITE_RANK, join=join) + " AND servable_fts MATCH :match"
        elif words:  # postgresql; a lower rank sorts first, as bm25's does
            params["match"] = " & ".join(f"{w}:*" for w in words)
            sql = (
                sql.format(rank="-ts_rank(f.tsv, to_tsquery('simple', :match))", join=join)
                + " AND f.tsv @@ to_tsquery('simple', :match)"
            )
        else:
            sql = sql.format(rank="0.0", join="")
        visible = "!= 'deleted'" if include_unready else "= 'ready'"
        sql += f" AND v.status {visible} AND v.record_type = :kind"
        params["kind"] = search.kind
        if search.only_latest:
            sql += (
                " AND v.version = (SELECT max(w.version) FROM servable_versions w"
                f" WHERE w.owner = v.owner AND w.name = v.name AND w.status {visible})"
            )
        for name, value in search.filters().items():
            column, match = SEARCH_FILTER_SQL[name]
            if match == "equals":
                params[column] = value
                sql += f" AND v.{column} = :{column}"
            elif match == "links":
                l_owner, l_name, l_version = parse_ref(value)
                if viewer is not None and not self.access(l_owner, l_name).allows(l_owner, viewer):
                    return []  # the linked record is not the viewer's to see: as if it did not exist
                sql += self._links_clause(name, l_owner, l_name, l_version, params)
            else:  # "listed": one of a |-delimited list, case-insensitive
                params[column] = f"%|{_like_literal(value.lower())}|%"
                sql += f" AND v.{column} LIKE :{column} ESCAPE '\\'"
        if viewer is not None and not viewer.admin:
            sql += self._visible_clause(viewer, params)
        sql += " ORDER BY rank, v.owner, v.name, v.version DESC LIMIT :limit"
        params["limit"] = search.limit
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(sql), params).all()
        return [_hit(row.status, json.loads(row.record)) for row in rows]

    @staticmethod
    def _links_clause(filter_name: str, owner: str, name: str, version: int | None, params: dict) -> str:
        """SQL: ``v`` (a servable) is linked to the data set named (filter ``dataset``), or ``v``
        (a data set) is linked from the servable named (filter ``servable``)."""
        params.update(l_owner=owner, l_name=name)
        if filter_name == "dataset":
            mine, theirs = ("owner", "name", "version"), ("dataset_owner", "dataset_name", "dataset_version")
        else:
            mine, theirs = ("dataset_owner", "dataset_name", "dataset_version"), ("owner", "name", "version")
        sql = (
            f" AND EXISTS (SELECT 1 FROM dataset_links l WHERE l.{mine[0]} = v.owner AND l.{mine[1]} = v.name"
            f" AND l.{mine[2]} = v.version AND l.{theirs[0]} = :l_owner AND l.{theirs[1]} = :l_name"
        )
        if version is not None:
            params["l_version"] = version
            sql += f" AND l.{theirs[2]} = :l_version"
        return sql + ")"


def _hit(status: str, record: dict[str, Any]) -> dict[str, Any]:
    """A search hit: the record and its status; a data set's files summed up (count and bytes),
    not listed (there may be many: describe lists them)."""
    if record.get("type") == "dataset":
        files = record.pop("files", {})
        record["file_count"] = len(files)
        record["size"] = sum(f.get("size", 0) for f in files.values())
    return {"status": status, **record}
