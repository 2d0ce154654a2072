"""Tokens and users: who may talk to this manager.

Tokens are random, shown once, and stored only as their SHA-256. Users have a role: ``admin``,
``user`` or ``endpoint``. The first start of a manager with an empty database creates an admin
user and writes its token to a 0600 file under the manager's home (``dlhub up`` reads it).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path

import sqlalchemy as sa

from .store import users_table

ROLES = ("admin", "user", "endpoint")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(engine: sa.Engine, name: str, role: str = "user") -> str:
    """Create ``name`` (or give it a new token) and return the token."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    token = "dlh_" + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        conn.execute(users_table.delete().where(users_table.c.name == name))
        conn.execute(
            users_table.insert().values(
                name=name, token_sha256=hash_token(token), role=role, created=time.time()
            )
        )
    return token


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


class Authenticator:
    """Looks tokens up once and remembers the answer (tokens are revoked by restarting)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self._cache: dict[str, tuple[str, str] | None] = {}

    def check(self, token: str) -> tuple[str, str] | None:
        """Return ``(user, role)`` for a valid token, else None."""
        if not token:
            return None
        digest = hash_token(token)
        if digest not in self._cache:
            with self.engine.connect() as conn:
                row = conn.execute(
                    sa.select(users_table.c.name, users_table.c.role).where(
                        users_table.c.token_sha256 == digest
                    )
                ).first()
            self._cache[digest] = (row[0], row[1]) if row else None
        return self._cache[digest]
