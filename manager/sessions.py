"""Sessions: who speaks on each routing identity, and for how long.

A session opens with an admitted Hello and is bound to the connection that carried it; it ends
with that connection, or when its user's token changes (revoked, re-issued: the watcher thread
sees the users generation move), after which that user's connections are closed. Frames on an
identity are admitted only for the user that opened its session, and an endpoint name only for
the user that owns it.

Apart from the broker loop because this is the security-relevant bookkeeping around the frames
rather than the moving of them. :class:`SessionsMixin` is mixed into the broker's ``Manager``:
it works on the Manager's session state (``clients``, ``endpoint_users``) and sockets, which the
frame handlers there read on every frame, so they stay attributes of the Manager.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from dlhub.protocol import PROTOCOL_VERSION
from dlhub.protocol import messages as m

from . import events as ev
from .auth import users_generation
from .config import ENDPOINT_NAME
from .memory import release_free_memory
from .store import claim_endpoint, endpoint_owner

if TYPE_CHECKING:
    from .auth import Authenticator
    from .config import ManagerConfig
    from .connections import ConnectionTracker
    from .routing import Router

log = logging.getLogger("dlhub.manager")

TRIM_EVERY_S = 2.0  # how often freed heap memory goes back to the system
USERS_POLL_S = 0.2  # how often the manager looks for user changes (revocations, new tokens)
CLOSE_AFTER_S = 0.3  # a revoked user's sessions get their refusal, then their connections close


@dataclass
class ClientSession:
    """A client's session: the user of its token, the Executor's session id, the token's role."""

    user: str
    session: str
    role: str = "user"

    @property
    def viewer(self) -> str | None:
        """Whose tasks this client may see, fetch and cancel: its own (None: an admin's, all)."""
        return None if self.role == "admin" else self.user


class SessionsMixin:
    """The session half of the broker's ``Manager`` (see the module's docstring). The Manager
    provides the attributes below, ``_send(sock, identity, msg)``, ``route(*events)`` and
    ``call_soon(fn)``."""

    clients: dict[bytes, ClientSession]
    endpoint_users: dict[bytes, str]  # endpoint identity -> the user of its token
    _endpoint_owners: dict[str, str]  # endpoint name -> the user who owns it (cache)
    # connections to close: (when, users, their client IPs, their endpoint IPs)
    _closing: list[tuple[float, frozenset[str], set[str], set[str]]]
    _stop: threading.Event
    config: ManagerConfig
    session: str  # the manager's, in every Welcome
    endpoint_url: str
    auth: Authenticator
    router: Router
    client_sock: zmq.Socket
    endpoint_sock: zmq.Socket
    client_conns: ConnectionTracker
    endpoint_conns: ConnectionTracker
    _monitors: list[tuple[zmq.Socket, int]]  # both trackers' monitors, POLLIN, for one zmq_poll

    # ---- a session bound to its connection -----------------------------------------------

    def _hello_frame(self, sock, identity: bytes, user, frame, msg: m.Hello, handler, admit) -> None:
        """A Hello opens a session on ``identity`` bound to the connection that carried it: when
        that connection ends the session is forgotten (:meth:`_connections_ended`), so a peer
        that later connects with the same identity gets nothing sent for the session. A Hello
        read after its connection ended opens nothing."""
        client = sock is self.client_sock
        conns = self.client_conns if client else self.endpoint_conns
        fd = frame.get(zmq.SRCFD)
        if not conns.live(fd):
            log.info("ignored a Hello from %r (user %s): its connection has ended", identity[:24], user)
            return
        conns.saw(identity, user, frame.get("Peer-Address"))  # where it connects from (revocation)
        try:
            if admit(sock, identity, user, msg):
                handler(identity, msg)
                if identity in (self.clients if client else self.endpoint_users):
                    conns.bind(identity, fd)
        except Exception:  # a bug must not take the broker down
            log.exception("error handling Hello")

    def _connections_ended(self) -> None:
        """Forget the sessions whose connection ended (read from the socket monitors)."""
        links = ((self.client_conns, self._drop_client), (self.endpoint_conns, self._drop_endpoint))
        for conns, drop in links:
            conns.poll()
            for identity in conns.take_ended():
                if drop(identity):
                    log.info("session %r ended with its connection", identity[:24])

    def _check_connections(self) -> None:
        """Read waiting connection events before sending (cheap when none wait)."""
        if zmq.zmq_poll(self._monitors, 0):  # one call for both: cheaper than two get(EVENTS)
            self._connections_ended()

    # ---- the connection's user against the session's ---------------------------------------

    def _hello_user_ok(self, sock: zmq.Socket, identity: bytes, user: str, token: str) -> bool:
        """Hello's token is a second check: it must name the user the connection authenticated as."""
        who = self.auth.check(token)
        if who is not None and who[0] != user:
            log.warning("refused a Hello with %s's token on a connection of %s", who[0], user)
            self._send(
                sock,
                identity,
                m.Refused("access-denied", "the token names another user than the connection's key"),
            )
            return False
        return True

    def _refuse_identity(self, sock: zmq.Socket, identity: bytes, user: str, owner: str) -> bool:
        log.warning(
            "refused a frame from user %s on routing identity %r of user %s", user, identity[:24], owner
        )
        self._send(
            sock, identity, m.Refused("access-denied", "this routing identity belongs to another session")
        )
        return False

    def _admit_client(self, sock: zmq.Socket, identity: bytes, user: str, msg: m.Message) -> bool:
        client = self.clients.get(identity)
        if client is not None and client.user != user:  # an identity stays with its first user
            return self._refuse_identity(sock, identity, user, client.user)
        if isinstance(msg, m.Hello):
            return self._hello_user_ok(sock, identity, user, msg.token)
        return True

    def _admit_endpoint(self, sock: zmq.Socket, identity: bytes, user: str, msg: m.Message) -> bool:
        owner = self.endpoint_users.get(identity)
        if owner is not None and owner != user:
            return self._refuse_identity(sock, identity, user, owner)
        if isinstance(msg, m.Hello):
            return self._hello_user_ok(sock, identity, user, msg.token)
        return True

    # ---- Hello: a session opens ------------------------------------------------------------

    def _client_hello(self, identity: bytes, hello: m.Hello) -> None:
        """A client's Hello: its session opens (Welcome) or it is refused."""
        if hello.role != "client":  # e.g. an endpoint configured with the client URL
            self._send(
                self.client_sock,
                identity,
                m.Refused(
                    "wrong-port",
                    f"this is the manager's client port; {hello.role}s connect to its endpoint port "
                    f"({self.endpoint_url})",
                ),
            )
            return
        who = self.auth.check(hello.token)
        if who is None:
            self._send(self.client_sock, identity, m.Refused("access-denied", "token refused"))
            return
        if hello.versions.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            self._send(
                self.client_sock,
                identity,
                m.Refused("protocol", f"manager speaks protocol {PROTOCOL_VERSION}"),
            )
            return
        if who[1] == "endpoint":
            self._send(
                self.client_sock,
                identity,
                m.Refused(
                    "access-denied",
                    f"{who[0]} has an endpoint token: endpoint tokens only register endpoints; "
                    "submit with a user token",
                ),
            )
            return
        self.clients[identity] = ClientSession(who[0], hello.session, who[1])
        endpoints = {
            name: {"connected": ep.connected, "versions": ep.versions}
            for name, ep in self.router.endpoints.items()
        }
        self._send(
            self.client_sock,
            identity,
            m.Welcome(
                self.session,
                {"user": who[0], "endpoints": endpoints, "default_endpoint": self.config.default_endpoint},
            ),
        )

    def _endpoint_hello(self, identity: bytes, msg: m.Hello) -> None:
        """An endpoint's Hello: it registers (its session opens) or it is refused; a ``check``
        Hello (``dlhub-endpoint check``) is only answered."""
        if msg.role == "check":  # `dlhub-endpoint check`: no session
            who = self.auth.check(msg.token)
            refusal = "token refused" if who is None else self._endpoint_refusal(who, msg.name, claim=False)
            reply = m.Welcome(self.session, {}) if refusal is None else m.Refused("access-denied", refusal)
            self._send(self.endpoint_sock, identity, reply)
            return
        who = self.auth.check(msg.token)
        if who is None or msg.role != "endpoint":
            self._send(self.endpoint_sock, identity, m.Refused("access-denied", "token refused"))
            return
        refusal = self._endpoint_refusal(who, msg.name, claim=True)
        if refusal is not None:
            log.warning("refused endpoint %r of %s: %s", str(msg.name)[:64], who[0], refusal)
            self._send(self.endpoint_sock, identity, m.Refused("access-denied", refusal))
            return
        log.info("endpoint %r registered (session %s)", msg.name, msg.session)
        self.endpoint_users[identity] = who[0]
        self.route(ev.EndpointRegistered(identity, msg, who[0], time.time()))  # owner: policy default

    def _endpoint_refusal(self, who: tuple[str, str], name: str, claim: bool) -> str | None:
        """Why ``who`` may not register endpoint ``name`` (None: it may). Only endpoint and admin
        tokens register endpoints, and a name belongs to the user who registered it first
        (``claim``: this registration makes it theirs when nobody owns it yet); admins may
        register any name."""
        user, role = who
        if role not in ("endpoint", "admin"):
            return f"{user} has a {role} token: only endpoint or admin tokens register endpoints"
        if not isinstance(name, str) or not re.fullmatch(ENDPOINT_NAME, name):
            return f"endpoint name {str(name)[:80]!r} is not valid (letters, digits, _ . -; at most 64)"
        owner = self._endpoint_owners.get(name)
        if owner is None:
            engine = self.auth.engine
            owner = claim_endpoint(engine, name, user) if claim else endpoint_owner(engine, name)
            if owner is not None:
                self._endpoint_owners[name] = owner
        if owner is not None and owner != user and role != "admin":
            return f"endpoint name {name!r} belongs to {owner}; register under another name"
        return None

    # ---- users: revocation and new tokens take effect at once ------------------------------

    def _watch_users(self) -> None:
        """Off the loop: read the users generation (one tiny query) every USERS_POLL_S and wake the
        loop only when it changed, so a revocation costs the hot path nothing. Also hands freed
        heap memory back to the system every TRIM_EVERY_S (see :func:`release_free_memory`)."""
        seen = self.auth.generation
        next_trim = time.monotonic() + TRIM_EVERY_S
        while not self._stop.wait(USERS_POLL_S):
            if time.monotonic() >= next_trim:
                release_free_memory()
                next_trim = time.monotonic() + TRIM_EVERY_S
            try:
                generation = users_generation(self.auth.engine)
            except Exception as exc:  # database briefly unavailable: try again next time
                log.warning("cannot read the users generation: %s", exc)
                continue
            if generation != seen:
                seen = generation
                self.call_soon(self._users_changed)

    def _users_changed(self) -> None:
        """On the loop: drop the token caches, then the sessions of users whose token changed.
        Users whose token no longer works (revoked or replaced) are told so at once, and their
        connections are closed CLOSE_AFTER_S later (time for the refusal to leave)."""
        changed = self.auth.refresh()
        if not changed:
            return
        denied = self.auth.lost_token & changed
        if denied:
            refusal = m.Refused("access-denied", "the token was revoked or replaced")
            for identity, client in self.clients.items():
                if client.user in denied:
                    self._send(self.client_sock, identity, refusal)
            for identity, user in self.endpoint_users.items():
                if user in denied:
                    self._send(self.endpoint_sock, identity, refusal)
            ips = (self.client_conns.ips_of(denied), self.endpoint_conns.ips_of(denied))
            self._closing.append((time.monotonic() + CLOSE_AFTER_S, denied, *ips))
        dropped = self.drop_sessions(changed)
        log.info("users changed: %s; %d session(s) closed", ", ".join(sorted(changed)), dropped)

    def _close_connections(self) -> None:
        """Close the TCP connections of users whose token no longer works (see
        :mod:`.connections`); the sessions of others behind the same addresses are dropped too,
        so they say Hello again and resend or fetch what was in flight."""
        now, users, client_ips, endpoint_ips = time.monotonic(), set(), set(), set()
        while self._closing and self._closing[0][0] <= now:
            _, who, to_clients, to_endpoints = self._closing.pop(0)
            users |= who
            client_ips |= to_clients
            endpoint_ips |= to_endpoints
        for conns, drop, ips in (
            (self.client_conns, self._drop_client, client_ips),
            (self.endpoint_conns, self._drop_endpoint, endpoint_ips),
        ):
            if not ips:
                continue
            closed = conns.close_from(ips)
            moved = sum(drop(identity) for identity in conns.sessions_from(ips))
            log.info(
                "closed %d connection(s) from %s of %s (%d other session(s) there say Hello again)",
                closed,
                ", ".join(sorted(ips)),
                ", ".join(sorted(users)),
                moved,
            )

    def drop_sessions(self, users: frozenset[str] | set[str]) -> int:
        """Forget every ZeroMQ session (client or endpoint) of ``users``: their next frame gets
        ``not-registered``, and the Hello that follows is checked against the current tokens
        (refused for a revoked or replaced token). Their endpoints' tasks wait, as when an
        endpoint disconnects. Returns how many sessions were closed."""
        dropped = 0
        for identity, client in list(self.clients.items()):
            if client.user in users:
                dropped += self._drop_client(identity)
        for identity, user in list(self.endpoint_users.items()):
            if identity not in self.router.endpoint_by_identity:  # re-registered under another identity
                del self.endpoint_users[identity]
                continue
            if user in users:
                dropped += self._drop_endpoint(identity)
        return dropped

    def _drop_client(self, identity: bytes) -> bool:
        self.client_conns.forget(identity)
        return self.clients.pop(identity, None) is not None

    def _drop_endpoint(self, identity: bytes) -> bool:
        """Forget an endpoint's session: it shows disconnected, its tasks wait for its next Hello."""
        self.endpoint_conns.forget(identity)
        if self.endpoint_users.pop(identity, None) is None:
            return False
        name = self.router.endpoint_by_identity.pop(identity, None)
        ep = self.router.endpoints.get(name) if name is not None else None
        if ep is not None and ep.identity == identity:
            ep.connected, ep.identity = False, None
        return True
