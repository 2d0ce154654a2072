"""Tokens, users and groups: who may talk to this manager.

Tokens are random, shown once, and stored only as their SHA-256. Users have a role: ``admin``,
``user`` or ``endpoint``. The first start of a manager with an empty database creates an admin
user and writes its token to a 0600 file under the manager's home (``dlhub up`` reads it).

Every change to users or groups (``dlhub-manager user|group ...``, run while the manager runs)
writes a new *users generation* into ``dlhub_meta`` in the same transaction. The manager watches
that one value: when it changes it drops its token caches and closes the sessions of every user
whose token, role or revocation changed, so a revoked or re-issued token stops working within a
second, without a restart and without a database read per message.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dlhub.protocol.curve import public_key_for_token
from dlhub.protocol.servable import OWNER_PATTERN

from .store import group_members_table, groups_table, meta_table, users_table

ROLES = ("admin", "user", "endpoint")
GENERATION_KEY = "users_generation"


class UserAdminError(ValueError):
    """A user or group command that cannot be done (unknown user, existing user, bad name...)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _new_token() -> str:
    return "dlh_" + secrets.token_urlsafe(32)


def check_name(name: str, what: str = "user") -> str:
    """Users and groups are named like servable owners (a user's name is the owner of what it
    publishes): letters, digits, '_', '.', '-', starting with a letter or digit, at most 128."""
    if not isinstance(name, str) or not re.fullmatch(OWNER_PATTERN, name):
        raise UserAdminError(
            f"bad {what} name {name!r}: use letters, digits, '_', '.' or '-', starting with a letter "
            "or digit, at most 128 characters"
        )
    return name


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise UserAdminError(f"role must be one of {', '.join(ROLES)}, got {role!r}")


# ---- the users generation: how a running manager learns of changes -------------------------


def users_generation(engine_or_conn: sa.Engine | sa.Connection) -> str:
    """The current users generation ('' before any change was recorded)."""
    query = sa.select(meta_table.c.value).where(meta_table.c.key == GENERATION_KEY)
    if isinstance(engine_or_conn, sa.Engine):
        with engine_or_conn.connect() as conn:
            return conn.execute(query).scalar() or ""
    return engine_or_conn.execute(query).scalar() or ""


def _users_changed(conn: sa.Connection) -> None:
    """Record a new generation (random, so two concurrent commands never write the same one)."""
    value = secrets.token_hex(8)
    updated = conn.execute(
        meta_table.update().where(meta_table.c.key == GENERATION_KEY).values(value=value)
    ).rowcount
    if not updated:
        conn.execute(meta_table.insert().values(key=GENERATION_KEY, value=value))


# ---- users ---------------------------------------------------------------------------------


def create_user(engine: sa.Engine, name: str, role: str = "user") -> str:
    """Create ``name`` (or give it a new token) and return the token (``create-user``)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    token = _new_token()
    with engine.begin() as conn:
        conn.execute(users_table.delete().where(users_table.c.name == name))
        conn.execute(
            users_table.insert().values(
                name=name,
                token_sha256=hash_token(token),
                curve_key=public_key_for_token(token),
                role=role,
                created=time.time(),
            )
        )
        _users_changed(conn)
    return token


def _user_row(conn: sa.Connection, name: str) -> Any:
    return conn.execute(sa.select(users_table).where(users_table.c.name == name)).first()


def add_user(engine: sa.Engine, name: str, role: str = "user") -> str:
    """Create a new user and return its token; an existing name is an error."""
    check_name(name)
    _check_role(role)
    token = _new_token()
    with engine.begin() as conn:
        if _user_row(conn, name) is not None:
            raise UserAdminError(
                f"user {name!r} exists; give it a new token with `dlhub-manager user token {name}`"
            )
        conn.execute(
            users_table.insert().values(
                name=name,
                token_sha256=hash_token(token),
                curve_key=public_key_for_token(token),
                role=role,
                created=time.time(),
            )
        )
        _users_changed(conn)
    return token


def _need_user(conn: sa.Connection, name: str) -> Any:
    row = _user_row(conn, name)
    if row is None:
        known = list(
            conn.execute(sa.select(users_table.c.name).order_by(users_table.c.name).limit(21)).scalars()
        )
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        raise UserAdminError(
            f"unknown user {name!r} (users: {shown or 'none'}; see `dlhub-manager user list`)"
        )
    return row


def reissue_token(engine: sa.Engine, name: str) -> str:
    """Give ``name`` a new token (the old one stops working) and lift a revocation."""
    token = _new_token()
    with engine.begin() as conn:
        _need_user(conn, name)
        conn.execute(
            users_table.update()
            .where(users_table.c.name == name)
            .values(token_sha256=hash_token(token), curve_key=public_key_for_token(token), revoked=None)
        )
        _users_changed(conn)
    return token


def revoke_user(engine: sa.Engine, name: str) -> bool:
    """Revoke ``name``'s token; False when it was revoked already. The stored digest and key are
    replaced by those of a token nobody holds, so no lookup anywhere (ZAP included) matches."""
    with engine.begin() as conn:
        row = _need_user(conn, name)
        if row.revoked is not None:
            return False
        void = _new_token()  # never shown
        conn.execute(
            users_table.update()
            .where(users_table.c.name == name)
            .values(revoked=time.time(), token_sha256=hash_token(void), curve_key=public_key_for_token(void))
        )
        _users_changed(conn)
    return True


def list_users(engine: sa.Engine) -> list[dict[str, Any]]:
    """Every user with its role, creation and revocation times and groups (never a token)."""
    with engine.connect() as conn:
        groups: dict[str, list[str]] = {}
        for g, u in conn.execute(
            sa.select(group_members_table.c.group_name, group_members_table.c.user_name).order_by(
                group_members_table.c.group_name
            )
        ):
            groups.setdefault(u, []).append(g)
        rows = conn.execute(
            sa.select(
                users_table.c.name, users_table.c.role, users_table.c.created, users_table.c.revoked
            ).order_by(users_table.c.name)
        ).all()
    return [
        {
            "name": r.name,
            "role": r.role,
            "created": r.created,
            "revoked": r.revoked,
            "groups": groups.get(r.name, []),
        }
        for r in rows
    ]


def ensure_admin(engine: sa.Engine, name: str, token_file: Path) -> str | None:
    """On an empty user table, create an admin and write its token to ``token_file``."""
    with engine.connect() as conn:
        if conn.execute(sa.select(sa.func.count()).select_from(users_table)).scalar():
            return None
    token = create_user(engine, name, "admin")
    token_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


# ---- groups --------------------------------------------------------------------------------


def add_group(engine: sa.Engine, name: str, members: list[str] = ()) -> bool:
    """Create group ``name`` (if new) and add ``members`` (existing users); True if created."""
    check_name(name, "group")
    for member in members:
        check_name(member)
    gm = group_members_table
    with engine.begin() as conn:
        for member in members:
            _need_user(conn, member)
        created = (
            conn.execute(sa.select(groups_table.c.name).where(groups_table.c.name == name)).first() is None
        )
        if created:
            conn.execute(groups_table.insert().values(name=name, created=time.time()))
        have = set(conn.execute(sa.select(gm.c.user_name).where(gm.c.group_name == name)).scalars())
        new = [u for u in dict.fromkeys(members) if u not in have]
        if new:
            conn.execute(gm.insert(), [{"group_name": name, "user_name": u} for u in new])
        _users_changed(conn)
    return created


def remove_group(engine: sa.Engine, name: str, members: list[str] = ()) -> None:
    """Remove ``members`` from group ``name``, or (none named) the whole group."""
    gm = group_members_table
    with engine.begin() as conn:
        if conn.execute(sa.select(groups_table.c.name).where(groups_table.c.name == name)).first() is None:
            known = list(conn.execute(sa.select(groups_table.c.name).order_by(groups_table.c.name)).scalars())
            raise UserAdminError(f"unknown group {name!r} (groups: {', '.join(known) or 'none'})")
        if members:
            have = set(conn.execute(sa.select(gm.c.user_name).where(gm.c.group_name == name)).scalars())
            missing = [u for u in members if u not in have]
            if missing:
                raise UserAdminError(f"not members of group {name!r}: {', '.join(missing)}")
            conn.execute(gm.delete().where(gm.c.group_name == name, gm.c.user_name.in_(list(members))))
        else:
            conn.execute(gm.delete().where(gm.c.group_name == name))
            conn.execute(groups_table.delete().where(groups_table.c.name == name))
        _users_changed(conn)


def list_groups(engine: sa.Engine) -> list[dict[str, Any]]:
    """Every group with its creation time and members."""
    gm = group_members_table
    with engine.connect() as conn:
        members: dict[str, list[str]] = {}
        for g, u in conn.execute(sa.select(gm.c.group_name, gm.c.user_name).order_by(gm.c.user_name)):
            members.setdefault(g, []).append(u)
        rows = conn.execute(sa.select(groups_table).order_by(groups_table.c.name)).all()
    return [{"name": r.name, "created": r.created, "members": members.get(r.name, [])} for r in rows]


def groups_of(engine_or_conn: sa.Engine | sa.Connection, user: str) -> frozenset[str]:
    """The groups ``user`` belongs to."""
    gm = group_members_table
    query = sa.select(gm.c.group_name).where(gm.c.user_name == user)
    if isinstance(engine_or_conn, sa.Engine):
        with engine_or_conn.connect() as conn:
            return frozenset(conn.execute(query).scalars())
    return frozenset(engine_or_conn.execute(query).scalars())


# ---- the running manager's view ------------------------------------------------------------


class Authenticator:
    """Token -> ``(user, role)`` and user -> groups, cached and bounded.

    Valid tokens live in an LRU of ``max_tokens``; refused tokens in a much smaller one
    (``max_refused``), so a flood of distinct wrong tokens costs a lookup each but no memory.
    The caches hold until the users generation changes. With ``refresh_s`` set (the REST API,
    which checks the token of every request) :meth:`check` looks at the generation at most that
    often; the broker passes None and calls :meth:`refresh` itself when its watcher sees a change
    (a ZeroMQ token is checked once, at Hello, so the broker must close sessions instead).
    """

    def __init__(
        self,
        engine: sa.Engine,
        refresh_s: float | None = 0.25,
        max_tokens: int = 10_000,
        max_refused: int = 1_000,
    ):
        self.engine = engine
        self.refresh_s = refresh_s
        self.max_tokens, self.max_refused = max_tokens, max_refused
        self._lock = threading.Lock()
        self._valid: OrderedDict[str, tuple[str, str]] = OrderedDict()  # token digest -> (user, role)
        self._refused: OrderedDict[str, None] = OrderedDict()
        self._groups: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._epoch = 0  # bumped whenever the caches are dropped: a lookup begun before is not kept
        self.lost_token: frozenset[str] = frozenset()  # at the last refresh: revoked or re-issued
        with engine.connect() as conn:
            self._generation = users_generation(conn)
            self._snapshot = self._load(conn)
        self._next_refresh = time.monotonic() + (refresh_s or 0.0)

    @property
    def generation(self) -> str:
        """The users generation the caches reflect."""
        return self._generation

    @staticmethod
    def _load(conn: sa.Connection) -> dict[str, tuple]:
        u = users_table
        rows = conn.execute(sa.select(u.c.name, u.c.token_sha256, u.c.role, u.c.revoked))
        return {r.name: (r.token_sha256, r.role, r.revoked) for r in rows}

    def _maybe_refresh(self) -> None:
        if self.refresh_s is not None and time.monotonic() >= self._next_refresh:
            self._next_refresh = time.monotonic() + self.refresh_s
            self.refresh()

    def refresh(self) -> frozenset[str]:
        """If users or groups changed, drop the caches and return the users whose token, role or
        revocation changed (their sessions must end); else an empty set. One small read."""
        with self.engine.connect() as conn:
            generation = users_generation(conn)
            if generation == self._generation:
                return frozenset()
            snapshot = self._load(conn)  # read after the generation: at least as new
        with self._lock:
            old, self._snapshot, self._generation = self._snapshot, snapshot, generation
            self._valid.clear()
            self._refused.clear()
            self._groups.clear()
            self._epoch += 1
        users = old.keys() | snapshot.keys()
        self.lost_token = frozenset(u for u in users if _token_gone(old.get(u), snapshot.get(u)))
        # a user added since the last refresh is no change: a session it opened meanwhile is valid
        return frozenset(u for u in old if old[u] != snapshot.get(u)) | self.lost_token

    def check(self, token: str) -> tuple[str, str] | None:
        """Return ``(user, role)`` for a valid, unrevoked token, else None."""
        if not token:
            return None
        self._maybe_refresh()
        digest = hash_token(token)
        with self._lock:
            who = self._valid.get(digest)
            if who is not None:
                self._valid.move_to_end(digest)
                return who
            if digest in self._refused:
                return None
            epoch = self._epoch
        u = users_table
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(u.c.name, u.c.role).where(u.c.token_sha256 == digest, u.c.revoked.is_(None))
            ).first()
        who = (row[0], row[1]) if row else None
        with self._lock:
            if epoch == self._epoch:  # else the users changed meanwhile: don't keep a stale answer
                cache = self._valid if who else self._refused
                cache[digest] = who
                if len(cache) > (self.max_tokens if who else self.max_refused):
                    cache.popitem(last=False)
        return who

    def groups_of(self, user: str) -> frozenset[str]:
        """The groups ``user`` belongs to, cached until users or groups change."""
        self._maybe_refresh()
        with self._lock:
            groups = self._groups.get(user)
            if groups is not None:
                self._groups.move_to_end(user)
                return groups
            epoch = self._epoch
        groups = groups_of(self.engine, user)
        with self._lock:
            if epoch == self._epoch:
                self._groups[user] = groups
                if len(self._groups) > self.max_tokens:
                    self._groups.popitem(last=False)
        return groups

    def cache_sizes(self) -> dict[str, int]:
        """How many entries each cache holds (bounded by ``max_tokens`` / ``max_refused``)."""
        with self._lock:
            return {"valid": len(self._valid), "refused": len(self._refused), "groups": len(self._groups)}


# ---- CURVE keys derived from tokens (the ZAP handler looks connections up by them) -----------


def _token_gone(before: tuple | None, after: tuple | None) -> bool:
    """Whether a user's token stopped working: removed, revoked or re-issued. ``before`` may be
    None when the user was added and revoked between two refreshes (its sessions still count)."""
    if before is not None and before[2] is not None:  # already revoked: nothing of theirs connects
        return False
    if after is None:
        return before is not None
    return after[2] is not None or (before is not None and after[0] != before[0])


def backfill_curve_key(engine: sa.Engine, token: str) -> bool:
    """Store the CURVE key of a token made before keys were stored (the admin's, at start)."""
    with engine.begin() as conn:
        return bool(
            conn.execute(
                users_table.update()
                .where(users_table.c.token_sha256 == hash_token(token), users_table.c.curve_key.is_(None))
                .values(curve_key=public_key_for_token(token))
            ).rowcount
        )


def users_without_curve_key(engine: sa.Engine) -> list[str]:
    """Users whose token predates stored keys: they cannot connect until it is re-issued."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(users_table.c.name)
            .where(users_table.c.curve_key.is_(None))
            .order_by(users_table.c.name)
        )
        return [r[0] for r in rows]
