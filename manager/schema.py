"""The manager's database schema, in one place: every table, the schema version and the
migrations that bring an older database up to it, and the engine settings.

    tasks, code, result_cache           the task store (store.py)
    users, groups, group_members,       users, roles, tokens and groups (auth.py, zap.py)
      endpoint_owners
    servable_versions, servable_access, the servable repository (repository.py): servables and
      servable_shares, servable_fts,      data sets (record_type), one name space, one search index
      dataset_links                       which data sets a servable version was trained/validated on
    dlhub_meta                          schema version, users generation

tasks.payload and tasks.result are ``SpilledBinary``: a large value lives in a file of the task
store's and the row holds a marker that reads back as the file's bytes (store.py says when).

The modules that read and write these import from here and not from each other, so the package's
import graph stays acyclic (tests/unit/test_import_graph.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from dlhub.protocol import messages as m

SCHEMA_VERSION = 9  # 2: tasks.resources; 3: servable_versions.digest; 4: tasks.options;
# 5: users.curve_key;
# 6: users.revoked, groups, group_members; 7: servable_access, servable_shares; 8: endpoint_owners;
# 9: servable_versions.record_type (data sets beside servables), dataset_links
metadata = sa.MetaData()

log = logging.getLogger(__name__)

# ---- large payloads and results live in files (issue 15): the column holds a marker ------------

BLOB_MARKER = b"\x00dlhub-blob\x00"  # 0x00 never starts a dlhub payload (serializer ids 0x01..)
BLOB_MARKER_LEN = len(BLOB_MARKER) + 64  # + the sha256 hex of the content
_HEX = frozenset(b"0123456789abcdef")

# The task blob directories of this process (TaskStore registers its own), searched in order.
# A marker names content, never a place: a file's name is the sha256 of its bytes, so a file of
# that name in any registered directory is the right one, and a row cannot point anywhere else.
BLOB_DIRS: list[Path] = []


def blob_marker(digest: str) -> bytes:
    """What the SQL column holds for content stored as a file under ``digest`` (sha256 hex)."""
    return BLOB_MARKER + digest.encode("ascii")


def blob_digest(value: bytes | bytearray | memoryview | None) -> str | None:
    """The digest a column value refers to, or None when the value is the content itself."""
    if value is None or len(value) != BLOB_MARKER_LEN or bytes(value[: len(BLOB_MARKER)]) != BLOB_MARKER:
        return None
    hexd = bytes(value[len(BLOB_MARKER) :])
    return hexd.decode("ascii") if _HEX.issuperset(hexd) else None


def blob_path(root: Path, kind: str, digest: str) -> Path:
    """Where content ``digest`` of column ``kind`` ("payload" or "result") lives under ``root``."""
    return root / kind / digest[:2] / digest[2:]


def read_blob(kind: str, digest: str) -> bytes | None:
    """The content of a spilled ``kind`` column, from the first registered directory that has
    it; None (logged as an error) when none has: a task whose file is gone reads as having no
    payload or result rather than failing every query that touches its row (or the restart)."""
    for root in list(BLOB_DIRS):
        try:
            with open(blob_path(root, kind, digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            continue
    log.error("task %s file %s is missing (looked in %s)", kind, digest, [str(d) for d in BLOB_DIRS])
    return None


class SpilledBinary(sa.types.TypeDecorator):
    """LargeBinary whose marker values read back as their file's bytes (the DDL is unchanged:
    no migration). Writes pass through: only the task store's writer spills, on its raw DBAPI
    connection; a value written through SQLAlchemy stays in the row."""

    impl = sa.LargeBinary
    cache_ok = True

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def process_result_value(self, value, dialect):
        if value is None or len(value) != BLOB_MARKER_LEN:
            return value
        digest = blob_digest(value)
        return value if digest is None else read_blob(self.kind, digest)


tasks_table = sa.Table(
    "tasks",
    metadata,
    sa.Column("task_id", sa.LargeBinary(16), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("client_session", sa.String(64), nullable=False),
    sa.Column("endpoint", sa.String(128), nullable=False, index=True),
    sa.Column("function", sa.String(80), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("timeout_s", sa.Float, nullable=True),
    sa.Column("result_serializer", sa.String(16), nullable=False),
    sa.Column("resources", sa.Text, nullable=True),  # JSON of the task's resource request
    sa.Column("options", sa.Text, nullable=True),  # JSON of the task's per-call options
    sa.Column("t_received", sa.Float, nullable=False),
    sa.Column("t_dispatched", sa.Float, nullable=True),
    sa.Column("t_started", sa.Float, nullable=True),
    sa.Column("t_finished", sa.Float, nullable=True),
    # payload dropped once the task is terminal; either may be a marker of a file (SpilledBinary)
    sa.Column("payload", SpilledBinary("payload"), nullable=True),
    sa.Column("result", SpilledBinary("result"), nullable=True),
    sa.Column("error", sa.LargeBinary, nullable=True),  # msgpack of the wire error record
    sa.Column("stdout", sa.Text, nullable=True),
    sa.Column("stderr", sa.Text, nullable=True),
)

code_table = sa.Table(
    "code",
    metadata,
    sa.Column("digest", sa.String(80), primary_key=True),
    sa.Column("blob", sa.LargeBinary, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)

# results of deterministic servables, kept across restarts when the manager is configured so
result_cache_table = sa.Table(
    "result_cache",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("created", sa.Float, nullable=False, index=True),
)

users_table = sa.Table(
    "users",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("revoked", sa.Float, nullable=True),  # when `dlhub-manager user revoke` ran (6)
    # z85 CURVE public key derived from the token (5): the ZAP handler maps a connection to its user
    sa.Column("curve_key", sa.String(40), nullable=True, index=True),
)

# groups of users (6): servables are shared with them, endpoint policies name them
groups_table = sa.Table(
    "groups",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("created", sa.Float, nullable=False),
)

group_members_table = sa.Table(
    "group_members",
    metadata,
    sa.Column("group_name", sa.String(128), primary_key=True),
    sa.Column("user_name", sa.String(128), primary_key=True, index=True),
)

# endpoint names (8): a name belongs to the user whose token registered it first
endpoint_owners_table = sa.Table(
    "endpoint_owners",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)

meta_table = sa.Table(
    "dlhub_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

TERMINAL = tuple(sorted(m.TERMINAL_STATES))  # the one definition is the protocol's


def make_engine(url: str) -> sa.Engine:
    """Create the engine; for SQLite turn on WAL so readers never block the writer, and make
    the file private (0600) before SQLite opens it: SQLite gives -wal/-shm the file's mode."""
    engine = sa.create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        _private_sqlite_files(engine.url.database)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process
            cur.execute("PRAGMA busy_timeout=5000")
            cur.close()

    return engine


def _private_sqlite_files(database: str | None) -> None:
    """Create the database file 0600 (whatever the umask); narrow an existing one and its
    -wal/-shm files. In-memory databases have no file."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    from dlhub.protocol.private import private_file

    path = Path(database)
    if path.parent.is_dir():
        private_file(path)
        for suffix in ("-wal", "-shm"):
            extra = path.with_name(path.name + suffix)
            if extra.exists():
                private_file(extra)


versions_table = sa.Table(
    "servable_versions",
    metadata,
    sa.Column("owner", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(80), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("record", sa.Text, nullable=False),  # JSON of the ServableRecord
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("digest", sa.String(64), nullable=True, index=True),  # record_digest: names the package
    # "|a|b|" forms so filters are one portable LIKE each
    sa.Column("domains", sa.Text, nullable=False, default="|"),
    sa.Column("authors", sa.Text, nullable=False, default="|"),
    sa.Column("related", sa.Text, nullable=False, default="|"),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
    # servable | dataset (9): both kinds share owner/name, versions, visibility, shares and search
    sa.Column("record_type", sa.String(16), nullable=False, server_default="servable", index=True),
)

# A servable version's data sets (9): pinned at publish, so searches go both ways in SQL
links_table = sa.Table(
    "dataset_links",
    metadata,
    sa.Column("owner", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(80), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("relation", sa.String(16), primary_key=True),  # trained_on | validated_on
    sa.Column("dataset_owner", sa.String(128), primary_key=True),
    sa.Column("dataset_name", sa.String(80), primary_key=True),
    sa.Column("dataset_version", sa.Integer, primary_key=True),
    sa.Index("ix_dataset_links_dataset", "dataset_owner", "dataset_name", "dataset_version"),
)

# Who may see a servable: the row's owner/name, not one immutable version (visibility can change
# after publish, so it is kept out of the record and of its digest). No row means public.
access_table = sa.Table(
    "servable_access",
    metadata,
    sa.Column("owner", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(80), primary_key=True),
    sa.Column("visibility", sa.String(16), nullable=False),  # public | private
    sa.Column("updated", sa.Float, nullable=False),
)

shares_table = sa.Table(
    "servable_shares",
    metadata,
    sa.Column("owner", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(80), primary_key=True),
    sa.Column("kind", sa.String(8), primary_key=True),  # user | group
    sa.Column("principal", sa.String(128), primary_key=True),
    sa.Column("created", sa.Float, nullable=False),
)

# The search index: FTS5 on SQLite, a GIN-indexed generated tsvector on PostgreSQL. One row per
# (owner, name, version); three texts weighted for ranking: name + title (most), keywords +
# domains, then description + authors.
FTS_DDL = {
    "sqlite": [
        "CREATE VIRTUAL TABLE IF NOT EXISTS servable_fts USING fts5(owner UNINDEXED, name UNINDEXED, "
        "version UNINDEXED, title, tags, body, tokenize='unicode61')"
    ],
    "postgresql": [
        "CREATE TABLE IF NOT EXISTS servable_fts (owner TEXT NOT NULL, name TEXT NOT NULL, "
        "version INTEGER NOT NULL, title TEXT NOT NULL, tags TEXT NOT NULL, body TEXT NOT NULL, "
        "tsv tsvector GENERATED ALWAYS AS ("
        "setweight(to_tsvector('simple', title), 'A') || setweight(to_tsvector('simple', tags), 'B') "
        "|| setweight(to_tsvector('simple', body), 'C')) STORED, "
        "PRIMARY KEY (owner, name, version))",
        "CREATE INDEX IF NOT EXISTS servable_fts_tsv ON servable_fts USING GIN (tsv)",
    ],
}


# version -> statements that bring a database from the version before up to it
def _add_column(table: str, column: str, ddl: str) -> Callable[[sa.Connection], None]:
    """A migration step that adds a column unless create_all just made the table with it."""

    def step(conn: sa.Connection) -> None:
        if column not in {c["name"] for c in sa.inspect(conn).get_columns(table)}:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")

    return step


MIGRATIONS: dict[int, list[str | Callable[[sa.Connection], None]]] = {
    2: ["ALTER TABLE tasks ADD COLUMN resources TEXT"],
    3: [
        _add_column("servable_versions", "digest", "VARCHAR(64)"),
        "CREATE INDEX IF NOT EXISTS ix_servable_versions_digest ON servable_versions (digest)",
    ],
    4: [_add_column("tasks", "options", "TEXT")],
    5: [
        _add_column("users", "curve_key", "VARCHAR(40)"),
        "CREATE INDEX IF NOT EXISTS ix_users_curve_key ON users (curve_key)",
    ],
    6: [_add_column("users", "revoked", "FLOAT")],  # groups, group_members: made by create_all
    7: [],  # servable_access, servable_shares (visibility and shares): made by create_all
    8: [],  # endpoint_owners: made by create_all
    9: [  # dataset_links: made by create_all
        _add_column("servable_versions", "record_type", "VARCHAR(16) NOT NULL DEFAULT 'servable'"),
        "CREATE INDEX IF NOT EXISTS ix_servable_versions_record_type ON servable_versions (record_type)",
    ],
}


def migrate(engine: sa.Engine) -> None:
    """Create missing tables, then apply each migration the database has not seen, in order."""
    fresh = not sa.inspect(engine).has_table("tasks")
    metadata.create_all(engine)
    with engine.begin() as conn:
        row = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")).first()
        if fresh:
            version = SCHEMA_VERSION
        else:  # a database from before versions were recorded is version 1
            version = int(row[0]) if row is not None else 1
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {version} is newer than this manager ({SCHEMA_VERSION}); "
                "upgrade dlhub"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS.get(target, []):
                if callable(statement):
                    statement(conn)
                else:
                    conn.exec_driver_sql(statement)
        if row is None:
            conn.execute(meta_table.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
        else:
            conn.execute(
                meta_table.update()
                .where(meta_table.c.key == "schema_version")
                .values(value=str(SCHEMA_VERSION))
            )
