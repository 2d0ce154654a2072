"""Securing the ZeroMQ links to the manager: CurveZMQ keys derived from tokens, and what a
dialling socket needs to present them.

A user keeps ONE credential, the token. Its CURVE key pair is derived from it
(``secret = z85(sha256("dlhub-curve-v1:" + token))``); the manager stores the public half when it
makes the token and maps a connecting key to the user during the handshake (ZAP), so a peer
without a valid token never gets a frame into the manager. A manager started with
``--insecure-loopback`` speaks ZeroMQ PLAIN instead (no encryption, loopback only): the token is
the password, still checked during the handshake.

Clients pin the manager's public key: given explicitly, from ``$DLHUB_MANAGER_KEY``, from the
client config, or, for a manager on this host, from the small file a manager run by the same
user publishes per port in a private runtime directory (``local_key_dir()``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import stat
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

KEY_CONTEXT = b"dlhub-curve-v1:"
PLAIN_USER = b"dlhub"  # the PLAIN user name; the token (the password) says who it is


def keypair_for_token(token: str) -> tuple[bytes, bytes]:
    """``(public, secret)`` z85 CURVE keys derived from ``token``."""
    secret = z85.encode(hashlib.sha256(KEY_CONTEXT + token.encode()).digest())
    return zmq.curve_public(secret), secret


def public_key_for_token(token: str) -> str:
    return keypair_for_token(token)[0].decode("ascii")


def check_key(key: str, what: str = "manager key") -> str:
    """A z85 CURVE public key (40 characters), or ValueError naming what is wrong."""
    try:
        if len(key) != 40 or len(z85.decode(key.encode("ascii"))) != 32:
            raise ValueError
    except (ValueError, UnicodeEncodeError, KeyError, IndexError):
        raise ValueError(
            f"{what} {key!r} is not a CURVE public key (40 z85 characters, as `dlhub-manager serve` "
            "writes to manager.json as curve_public_key)"
        ) from None
    return key


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_tcp(address: str) -> tuple[str, int] | None:
    scheme, _, rest = address.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


# ---- the per-user directory where managers on this host publish their keys ---------------------


def local_key_dir(create: bool = False) -> Path | None:
    """A directory only this user can write (checked), or None when it is not safe to use."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "dlhub" if base and Path(base).is_dir() else Path(f"/tmp/dlhub-{os.getuid()}")
    if create:
        try:
            path.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            return None
    try:
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        return None
    return path


def publish_local_key(port: int, public_key: str) -> Path | None:
    """Record this (loopback) manager's key for clients of the same user on this host."""
    folder = local_key_dir(create=True)
    if folder is None:
        return None
    path = folder / f"manager-{port}.json"
    tmp = folder / f".manager-{port}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"curve_public_key": public_key, "pid": os.getpid()}, f)
    tmp.replace(path)
    return path


def unpublish_local_key(port: int, any_pid: bool = False) -> None:
    """Remove the key published for ``port`` (by this process, unless ``any_pid``: a stale one)."""
    folder = local_key_dir()
    if folder is not None:
        try:
            path = folder / f"manager-{port}.json"
            if any_pid or json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass


def find_server_key(
    address: str, explicit: str | None = None, stored: dict[str, Any] | None = None
) -> str | None:
    """The manager key to pin for ``address``: explicit, ``$DLHUB_MANAGER_KEY``, the client config
    (``stored``) when it describes this address, or the key a manager of this user on this host
    published. None: none is known (only a loopback manager in insecure mode accepts that)."""
    key = explicit or os.environ.get("DLHUB_MANAGER_KEY")
    if key:
        return check_key(key)
    if stored and stored.get("manager_key"):
        urls = {str(stored.get(k) or "").rstrip("/") for k in ("manager", "endpoint_url")}
        if address.rstrip("/") in urls:
            return check_key(stored["manager_key"])
    hostport = split_tcp(address)
    if hostport and is_loopback(hostport[0]):
        folder = local_key_dir()
        if folder is not None:
            try:
                return check_key(
                    json.loads((folder / f"manager-{hostport[1]}.json").read_text())["curve_public_key"]
                )
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


# ---- the dialling side -------------------------------------------------------------------------


def secure_dealer(sock: zmq.Socket, address: str, token: str, server_key: str | None) -> str:
    """Set ``sock`` up to authenticate with ``token`` (before ``connect``); returns the mechanism.

    With a server key: CURVE, client keys derived from the token. Without one: PLAIN (a manager
    in ``--insecure-loopback`` mode), which is refused for an address off this host."""
    if server_key:
        public, secret = keypair_for_token(token)
        sock.curve_serverkey = check_key(server_key).encode("ascii")
        sock.curve_publickey, sock.curve_secretkey = public, secret
        return "curve"
    check_plain_allowed(address)
    sock.plain_username, sock.plain_password = PLAIN_USER, token.encode()
    return "plain"


def check_plain_allowed(address: str) -> None:
    """Without a pinned key only a manager on this host may be dialled (PLAIN, unencrypted)."""
    hostport = split_tcp(address)
    if hostport and not is_loopback(hostport[0]):
        raise ValueError(
            f"no CURVE key is known for the manager at {address}: pin it with manager_key= "
            "(Executor), `--manager-key` (dlhub-endpoint configure) or $DLHUB_MANAGER_KEY; it is "
            "curve_public_key in the manager's manager.json"
        )


HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
)


class HandshakeWatch:
    """Watches a dialling socket's handshakes, so a refused token is reported at once (ZeroMQ
    itself would retry silently) and a silent failure can be explained."""

    def __init__(self, sock: zmq.Socket, address: str, mechanism: str):
        self.address, self.mechanism = address, mechanism
        self.monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self.failures = 0
        self.succeeded = False
        self._sock = sock

    def poll(self) -> str | None:
        """Read pending events; return an error message when the manager refused us."""
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded = True
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return f"the manager at {self.address} refused the token during the handshake (token refused)"
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                return f"the secure handshake with the manager at {self.address} failed: {self.mismatch()}"
            elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.failures += not self.succeeded
        return None

    def mismatch(self) -> str:
        """What a mechanism mismatch means, for this side's mechanism."""
        if self.mechanism == "curve":
            return "it does not speak CURVE (is it a --insecure-loopback manager? then pin no key)"
        return (
            "it does not accept unencrypted links: pin its CURVE key (manager_key=, $DLHUB_MANAGER_KEY,"
            " or `dlhub-endpoint configure --manager-key`; curve_public_key in its manager.json)"
        )

    def timeout_hint(self) -> str:
        """Why a connection that never answered may have failed."""
        if self.failures and self.mechanism == "curve":
            return (
                " — it closed the connection during the CURVE handshake: the pinned manager key is "
                "probably wrong (or the token refused)"
            )
        return ""

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)


# ---- the endpoint's links to its pools and workers ---------------------------------------------


LINK_ZAP_DOMAIN = "dlhub-workers"


def new_link_keys() -> dict[str, str]:
    """Keys for one endpoint session's worker links: the endpoint's (server) pair and one client
    pair its pools and workers share (they read it from pool.json, 0600)."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return {
        "server_public": server_public.decode("ascii"),
        "server_secret": server_secret.decode("ascii"),
        "client_public": client_public.decode("ascii"),
        "client_secret": client_secret.decode("ascii"),
    }


def start_link_authenticator(ctx: zmq.Context, client_public: str, plain_password: str | None = None) -> Any:
    """ZAP for the endpoint's worker socket: only the session's client key gets in (with
    ``plain_password``, a loopback-only PLAIN link: only that password, as user ``pool``)."""
    from zmq.auth.thread import ThreadAuthenticator

    class _OneKey:
        def callback(self, domain: str, key: bytes) -> bool:
            return key == client_public.encode("ascii")

    auth = ThreadAuthenticator(ctx)
    auth.start()
    if plain_password is not None:
        auth.configure_plain(LINK_ZAP_DOMAIN, {LINK_PLAIN_USER: plain_password})
    else:
        auth.configure_curve_callback(LINK_ZAP_DOMAIN, _OneKey())
    return auth


LINK_PLAIN_USER = "pool"


def secure_link_server(sock: zmq.Socket, keys: dict[str, str], plain: bool = False) -> None:
    """CURVE (the default), or with ``plain`` ZeroMQ PLAIN: authenticated by the session's
    secret as a password, not encrypted (``worker_link: plain``, loopback only)."""
    sock.setsockopt_string(zmq.ZAP_DOMAIN, LINK_ZAP_DOMAIN)
    if plain:
        sock.plain_server = True
        return
    sock.curve_server = True
    sock.curve_secretkey = keys["server_secret"].encode("ascii")


def secure_link_client(sock: zmq.Socket, pool_config: dict[str, Any]) -> None:
    """A pool's or worker's socket to its endpoint: CURVE with the keys in pool.json, or PLAIN
    with its password (a pool.json from an endpoint without either: plain, as before)."""
    keys = pool_config.get("curve")
    if keys:
        sock.curve_serverkey = keys["server_public"].encode("ascii")
        sock.curve_publickey = keys["client_public"].encode("ascii")
        sock.curve_secretkey = keys["client_secret"].encode("ascii")
    elif pool_config.get("plain"):
        sock.plain_username = LINK_PLAIN_USER.encode()
        sock.plain_password = pool_config["plain"]["password"].encode("ascii")
