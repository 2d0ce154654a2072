"""The TCP connections behind a manager ROUTER socket, so that a revoked user's can be closed.

ZeroMQ gives a ROUTER no call to drop one peer, and ZAP tells the manager a connection's user
but not its descriptor. The socket monitor does tell each accepted connection's descriptor, so
:class:`ConnectionTracker` keeps ``fd -> (peer ip, peer port)`` from the monitor's events, and
the broker remembers which IPs each user's sessions came from (the ``Peer-Address`` property of
their Hello). To close a user's connections it shuts down every connection from those IPs:
libzmq sees the end of the stream, closes its side and the peer's reconnect meets ZAP again,
where a revoked key or token is refused. Other users behind the same IP (a login node, a
loopback demo) reconnect at once; the broker drops their sessions too, so each re-says Hello and
resends or fetches whatever was in flight (the path a manager restart takes): nothing is lost.

Sessions are bound to their connection too: a Hello that the broker admits binds its routing
identity to the descriptor that carried it (the ``SRCFD`` frame property), and when that
connection ends the identity is handed back by :meth:`ConnectionTracker.take_ended`, so the
broker forgets the session before another connection can take the identity over (ZeroMQ routes
sends by identity to whichever connection holds it now).

Only the loop thread calls this (the monitor socket is polled with the ROUTERs). A descriptor is
checked again just before ``shutdown()`` — local port == the ROUTER's port, same peer — so a
number libzmq has closed and the process has reused (a database socket, a file) is never touched.
"""

from __future__ import annotations

import logging
import os
import socket

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("dlhub.manager.connections")

_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


class ConnectionTracker:
    """``fd -> peer`` for the accepted TCP connections of one bound ROUTER socket."""

    def __init__(self, sock: zmq.Socket, port: int = 0):
        self.port = port  # the ROUTER's bound port (set after bind): every accepted one's local port
        self.monitor = sock.get_monitor_socket(_EVENTS)
        self.peers: dict[int, tuple[str, int]] = {}  # fd -> (peer ip, peer port)
        self.sessions: dict[bytes, tuple[str, str]] = {}  # routing identity -> (user, peer ip)
        self.bound: dict[bytes, int] = {}  # routing identity -> fd of the connection of its Hello
        self.by_fd: dict[int, set[bytes]] = {}
        self.ended: list[bytes] = []  # identities whose connection ended since take_ended()

    def saw(self, identity: bytes, user: str | None, ip: str | None) -> None:
        """A Hello from ``identity``: remember who it is and where it connects from."""
        if user is not None and ip:
            self.sessions[identity] = (user, ip)

    def forget(self, identity: bytes) -> None:
        self.sessions.pop(identity, None)
        self._unbind(identity)

    def live(self, fd: int | None) -> bool:
        """Whether ``fd`` is a connection accepted here that has not ended (monitor read first)."""
        self.poll()
        return fd is not None and fd in self.peers

    def bind(self, identity: bytes, fd: int) -> None:
        """``identity``'s session now lives on connection ``fd``."""
        self._unbind(identity)
        self.bound[identity] = fd
        self.by_fd.setdefault(fd, set()).add(identity)

    def _unbind(self, identity: bytes) -> None:
        fd = self.bound.pop(identity, None)
        if fd is not None:
            same = self.by_fd.get(fd)
            if same is not None:
                same.discard(identity)
                if not same:
                    del self.by_fd[fd]

    def take_ended(self) -> list[bytes]:
        """Identities whose session's connection ended (read the monitor first: :meth:`poll`)."""
        ended, self.ended = self.ended, []
        return ended

    def ips_of(self, users: set[str] | frozenset[str]) -> set[str]:
        return {ip for user, ip in self.sessions.values() if user in users}

    def sessions_from(self, ips: set[str]) -> list[bytes]:
        return [identity for identity, (_, ip) in self.sessions.items() if ip in ips]

    def poll(self) -> None:
        """Read the monitor's waiting events (never blocks)."""
        while self.monitor.poll(0):
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                peer = self._peer(fd)
                if peer is not None:
                    self.peers[fd] = peer
            else:  # disconnected or closed: the number is libzmq's no more
                self.peers.pop(fd, None)
                for identity in self.by_fd.pop(fd, ()):
                    del self.bound[identity]
                    self.ended.append(identity)

    def close_from(self, ips: set[str]) -> int:
        """Shut down every tracked connection whose peer IP is in ``ips``; returns how many."""
        self.poll()  # forget what already ended
        closed = 0
        for fd, peer in list(self.peers.items()):
            if peer[0] not in ips:
                continue
            if self._peer(fd) != peer:  # ended and reused since: not ours to touch
                self.peers.pop(fd, None)
                continue
            try:
                with socket.socket(fileno=os.dup(fd)) as dup:  # shutdown acts on the connection
                    dup.shutdown(socket.SHUT_RDWR)
                closed += 1
            except OSError as exc:
                log.debug("cannot shut down connection %s:%d: %s", *peer, exc)
            self.peers.pop(fd, None)
        return closed

    def close(self) -> None:
        self.monitor.close(0)

    def _peer(self, fd: int) -> tuple[str, int] | None:
        """The peer of ``fd`` if it is a TCP connection accepted on our port, else None."""
        try:
            with socket.socket(fileno=os.dup(fd)) as dup:
                if dup.type != socket.SOCK_STREAM or dup.getsockname()[1] != self.port:
                    return None
                ip, port = dup.getpeername()[:2]
        except (OSError, IndexError, TypeError):
            return None
        return _plain_ip(ip), port


def _plain_ip(ip: str) -> str:
    """``::ffff:127.0.0.1`` (an IPv4 peer on a dual-stack socket) as libzmq names it: 127.0.0.1."""
    return ip[7:] if ip.startswith("::ffff:") else ip


def raise_open_file_limit(wanted: int = 65536) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` towards the hard limit; return the soft limit.

    Every connected endpoint and client holds one TCP descriptor in the manager. With the common
    soft limit of 1,024 a manager stops accepting near 1,000 connections (benchmarks/scale.py:
    at 1,024 descriptors libzmq's listener could not accept and spun at 100% CPU, registration
    stalled). The hard limit is what the administrator allows (systemd's default is 524,288), so
    taking the soft limit up to it, as Ray and Jupyter do, needs no privilege.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-file limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:  # a container may refuse even within the hard limit
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        log.warning(
            "open-file limit is %d: this manager can hold about %d endpoint and client "
            "connections; raise the hard limit (LimitNOFILE= in its systemd unit, ulimit -Hn)",
            soft,
            max(soft - 100, 0),
        )
    return soft
