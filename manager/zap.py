"""ZAP: the manager authenticates every ZeroMQ connection during the handshake.

pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator` serves the ZAP socket on its own thread;
this subclass answers from the users table. CURVE (the default): the client's public key must be
one the manager stored for a user's token (``users.curve_key``). PLAIN (``--insecure-loopback``):
the password is the token. Either way the reply's User-Id is the user's name, which libzmq then
attaches to every frame of that connection (``frame.get("User-Id")``): the broker takes the user
from there, never from a routing identity or a message field. Unknown keys and tokens are refused
before a single frame reaches the broker (a client sees ``EVENT_HANDSHAKE_FAILED_AUTH``).

One database lookup per handshake (not per frame), so a revoked or re-issued token stops new
connections at once.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import sqlalchemy as sa
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .auth import hash_token
from .store import users_table

log = logging.getLogger("dlhub.manager.zap")

ZAP_DOMAIN = "dlhub"


def load_or_create_keypair(path: Path) -> tuple[bytes, bytes]:
    """The manager's own CURVE key pair: made on first start, kept in ``path`` (0600)."""
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise RuntimeError(f"{path} is readable by others (mode {mode:o}): chmod 600 {path}")
        lines = path.read_text().split()
        if len(lines) != 2:
            raise RuntimeError(f"{path} is not a dlhub CURVE key file (public and secret key lines)")
        return lines[0].encode(), lines[1].encode()
    public, secret = zmq.curve_keypair()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{public.decode()}\n{secret.decode()}\n")
    return public, secret


class UserAuthenticator(ThreadAuthenticator):
    """Maps a CURVE key or a PLAIN token to the user it belongs to; refuses everything else."""

    def __init__(self, context: zmq.Context, engine: sa.Engine):
        super().__init__(context, log=log)
        self.engine = engine

    def _lookup(self, where) -> str | None:
        try:
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(users_table.c.name).where(where)).first()
        except Exception:  # the database is away: refuse (fail closed), say so
            log.exception("ZAP: user lookup failed; refusing the connection")
            return None
        return row[0] if row else None

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) < 6:
            if len(msg) >= 2:
                self._send_zap_reply(msg[1], b"400", b"Not enough frames")
            return
        version, request_id, _domain, address, _identity, mechanism = msg[:6]
        credentials = msg[6:]
        if version != b"1.0":
            self._send_zap_reply(request_id, b"400", b"Invalid version")
            return
        user = None
        if mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            user = self._lookup(users_table.c.curve_key == z85.encode(credentials[0]).decode("ascii"))
        elif mechanism == b"PLAIN" and len(credentials) == 2:
            token = credentials[1].decode("utf-8", "replace")
            user = self._lookup(users_table.c.token_sha256 == hash_token(token)) if token else None
        if user is None:
            log.info("ZAP: refused a %s connection from %s", mechanism.decode(errors="replace"), address)
            self._send_zap_reply(request_id, b"400", b"token refused")
        else:
            self._send_zap_reply(request_id, b"200", b"OK", user)
