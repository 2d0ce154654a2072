"""``dlhub-manager``: run the manager and administer its users."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import click

from dlhub.protocol.private import private_dir, private_file, tighten, write_private


def _home(home: str | None) -> Path:
    base = Path(home) if home else Path(os.environ.get("DLHUB_HOME", Path.home() / ".dlhub")) / "manager"
    return base.expanduser()


def _need_extras() -> None:
    import importlib.util

    missing = [m for m in ("sqlalchemy", "fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(f"the manager needs {', '.join(missing)}: pip install 'dlhub[manager]'")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dlhub")
def main() -> None:
    """The dlhub manager: brokers tasks between clients and endpoints and records them."""


@main.command()
@click.option(
    "--home", type=click.Path(file_okay=False), help="state directory (default $DLHUB_HOME/manager)"
)
@click.option("--db-url", default=None, help="SQLAlchemy URL (default: SQLite under --home)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind")
@click.option("--client-port", default=0, show_default=True, help="port for clients (0: any free)")
@click.option("--endpoint-port", default=0, show_default=True, help="port for endpoints (0: any free)")
@click.option("--payload-limit-mb", default=256, show_default=True, help="largest payload or result")
@click.option("--admin-user", default="admin", show_default=True, help="admin created on first start")
@click.option("--rest-port", default=0, show_default=True, help="REST API port (0: any free port)")
@click.option("--no-rest", is_flag=True, help="do not serve the REST API")
@click.option(
    "--globus-compute-port",
    default=None,
    type=click.IntRange(0, 65535),
    help="serve the Globus Compute API (globus_compute_sdk.Client) on this port (0: any free; default: off)",
)
@click.option(
    "--globus-compute-amqp",
    is_flag=True,
    help="publish Globus Compute results to RabbitMQ for globus_compute_sdk.Executor (broker from "
    "$RMQ_PORT, $RMQ_MGMT_PORT, $RMQ_ADMIN_USER, $RMQ_ADMIN_PASSWORD as scripts/rabbitmq-localhost.sh)",
)
@click.option(
    "--amqp-url",
    default=None,
    metavar="URL",
    help="the RabbitMQ broker for --globus-compute-amqp (implies it): amqp://ADMIN:PASSWORD@HOST:PORT/VHOST "
    "of an administrator (it creates each user's credentials); its management API is on "
    "http://HOST:$RMQ_MGMT_PORT (default 15672)",
)
@click.option(
    "--result-cache-mb",
    default=256.0,
    show_default=True,
    type=click.FloatRange(0),
    help="result cache for deterministic servables (0: off)",
)
@click.option(
    "--result-cache-ttl-s", default=None, type=click.FloatRange(0, min_open=True), help="entry lifetime"
)
@click.option("--persist-result-cache", is_flag=True, help="keep the result cache across restarts")
@click.option(
    "--default-endpoint",
    default=None,
    metavar="NAME",
    help="endpoint for publishes and REST runs that name none (`dlhub up`: local); "
    "without it, the only connected endpoint",
)
@click.option(
    "--insecure-loopback",
    is_flag=True,
    help="ZeroMQ links without CURVE encryption (tokens still checked at the handshake); "
    "only with --host 127.0.0.1",
)
@click.option(
    "--tls-cert", type=click.Path(exists=True, dir_okay=False), help="REST over HTTPS: certificate (PEM)"
)
@click.option(
    "--tls-key", type=click.Path(exists=True, dir_okay=False), help="REST over HTTPS: private key (PEM)"
)
@click.option(
    "--max-open-tasks-per-user",
    default=1_000_000,
    show_default=True,
    type=click.IntRange(1),
    metavar="N",
    help="quota: tasks one user may have queued or running at once; more fail at once with "
    "QuotaExceeded (admins are exempt)",
)
@click.option(
    "--max-inflight-per-user",
    default=4096,
    show_default=True,
    type=click.IntRange(1),
    metavar="N",
    help="fair share: tasks of one user in flight on one endpoint (at least twice its workers); "
    "the rest wait at the manager (queued), and fewer while other users submit to a busy manager",
)
def serve(
    home,
    db_url,
    host,
    client_port,
    endpoint_port,
    payload_limit_mb,
    admin_user,
    rest_port,
    no_rest,
    globus_compute_port,
    globus_compute_amqp,
    amqp_url,
    result_cache_mb,
    result_cache_ttl_s,
    persist_result_cache,
    default_endpoint,
    insecure_loopback,
    tls_cert,
    tls_key,
    max_open_tasks_per_user,
    max_inflight_per_user,
) -> None:
    """Run the manager in the foreground (writes manager.json with its addresses)."""
    from logging.handlers import RotatingFileHandler

    _need_extras()
    from .broker import Manager, ManagerConfig

    state = _home(home)
    os.umask(0o077)  # the database (and -wal/-shm), blobs, keys and logs: this user's only
    if home is None:  # $DLHUB_HOME (or ~/.dlhub) itself; an explicit --home is the state folder
        private_dir(state.parent)
    private_dir(state)
    tightened = tighten(state)
    handler = RotatingFileHandler(private_file(state / "manager.log"), maxBytes=10 * 2**20, backupCount=3)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if tightened:
        logging.getLogger("dlhub.manager").info(
            "made %d paths under %s private to this user (folders 0700, files 0600)", tightened, state
        )
    try:
        config = ManagerConfig(
            home=state,
            db_url=db_url,
            host=host,
            client_port=client_port,
            endpoint_port=endpoint_port,
            payload_limit_bytes=payload_limit_mb * 2**20,
            admin_user=admin_user,
            rest_port=None if no_rest else rest_port,
            result_cache_mb=result_cache_mb,
            result_cache_ttl_s=result_cache_ttl_s,
            persist_result_cache=persist_result_cache,
            default_endpoint=default_endpoint,
            insecure_loopback=insecure_loopback,
            tls_cert=tls_cert,
            tls_key=tls_key,
            max_open_tasks_per_user=max_open_tasks_per_user,
            max_inflight_per_user=max_inflight_per_user,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc))
    manager = Manager(config)
    gc_server = publisher = None
    if globus_compute_port is not None:  # bound now (its URL is known), served once the manager runs
        from .api import ApiServer
        from .globus_compute import CLEAN_STOP_FILE, create_gc_app

        publisher = _amqp_publisher(state, amqp_url) if globus_compute_amqp or amqp_url else None

        clean = state / CLEAN_STOP_FILE  # the last publisher's clean stop: nothing to publish again
        try:
            published_until = float(clean.read_text())
        except (OSError, ValueError):
            published_until = None  # a crash: recent results are published again
        clean.unlink(missing_ok=True)

        def make_gc_app():
            return create_gc_app(manager, publisher, published_until)

        try:
            gc_server = ApiServer(make_gc_app, host, globus_compute_port)
        except OSError as exc:  # taken (e.g. 5000 by another manager): any free port, announced
            taken = f"Globus Compute API: port {globus_compute_port} unavailable ({exc})"
            click.echo(f"{taken}; using any free one")
            gc_server = ApiServer(make_gc_app, host, 0)
        # read by dlhub.compat.globus_compute.client()
        gc_info = {"url": gc_server.url, "pid": os.getpid(), "amqp": publisher is not None}
        write_private(state / "globus_compute.json", json.dumps(gc_info))
    manager.start()
    if gc_server is not None:
        gc_server.start()
        click.echo(f"Globus Compute API: {gc_server.url}")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: manager.request_stop())
    rest = f", REST {manager.api.url}" if manager.api else ""
    click.echo(f"manager ready: clients {manager.client_url}, endpoints {manager.endpoint_url}{rest}")
    if manager.curve_public_key:
        click.echo(f"CURVE public key (clients and endpoints pin it): {manager.curve_public_key}")
    if manager.users_without_keys and manager.curve_public_key:
        click.echo(
            f"user(s) {', '.join(manager.users_without_keys)} have tokens from before CURVE and cannot "
            "connect: re-issue each with `dlhub-manager create-user NAME`"
        )
    try:
        manager.run()
    finally:
        if gc_server is not None:  # its address goes with it (compat client() must not find a dead URL)
            (state / "globus_compute.json").unlink(missing_ok=True)
        if publisher is not None:  # results queued for the broker go out before the process ends
            stopped = time.time()
            if publisher.flush(10):
                write_private(state / CLEAN_STOP_FILE, repr(stopped))
            publisher.close()


def _amqp_publisher(state: Path, url: str | None = None):
    """The RabbitMQ result publisher of the Globus Compute API; the secret that derives each user's
    broker password is kept (0600) in the state directory, so passwords survive restarts. The
    broker: ``url`` (amqp://ADMIN:PASSWORD@HOST:PORT/VHOST), else the $RMQ_* variables."""
    import urllib.parse

    from .amqp import BrokerSettings, ResultPublisher

    secret_file = state / "amqp.secret"
    if not secret_file.exists():
        write_private(secret_file, os.urandom(32).hex())
    mgmt_port = os.environ.get("RMQ_MGMT_PORT", "15672")
    if url:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "amqp" or not u.hostname:
            raise click.ClickException(f"--amqp-url {url!r}: expected amqp://ADMIN:PASSWORD@HOST:PORT/VHOST")
        host = u.hostname
        vhost = urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"
        settings = BrokerSettings(
            host=host,
            port=u.port or 5672,
            management_url=f"http://{host}:{mgmt_port}",
            admin_user=urllib.parse.unquote(u.username or "guest"),
            admin_password=urllib.parse.unquote(u.password or "guest"),
            vhost=vhost,
            secret=secret_file.read_text().strip().encode(),
        )
    else:
        settings = BrokerSettings(
            port=int(os.environ.get("RMQ_PORT", "5672")),
            management_url=f"http://127.0.0.1:{mgmt_port}",
            admin_user=os.environ.get("RMQ_ADMIN_USER", "dlhub-admin"),
            admin_password=os.environ.get("RMQ_ADMIN_PASSWORD", "dlhub-admin"),
            secret=secret_file.read_text().strip().encode(),
        )
    return ResultPublisher(settings)


@main.command("create-user")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["admin", "user", "endpoint"]),
    default="user",
    show_default=True,
    help="admin: everything; user: submit and publish; endpoint: register endpoints",
)
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    help="the manager's state directory, as given to `serve` (default $DLHUB_HOME/manager)",
)
@click.option(
    "--db-url", default=None, help="SQLAlchemy URL, as given to `serve` (default: SQLite under --home)"
)
def create_user(name: str, role: str, home: str | None, db_url: str | None) -> None:
    """Create NAME (or replace its token) and print the new token once."""
    _need_extras()
    from .auth import create_user as make
    from .store import make_engine, migrate

    state = _home(home)
    private_dir(state)
    engine = make_engine(db_url or f"sqlite:///{state / 'dlhub.db'}")
    migrate(engine)
    click.echo(make(engine, name, role))


# ---- users and groups: written to the database; a running manager notices within a second -----

_home_option = click.option(
    "--home",
    type=click.Path(file_okay=False),
    help="the manager's state directory, as given to `serve` (default $DLHUB_HOME/manager)",
)
_db_option = click.option(
    "--db-url", default=None, help="SQLAlchemy URL, as given to `serve` (default: SQLite under --home)"
)


def _engine(home: str | None, db_url: str | None):
    """The manager's database, migrated (the same one `serve` uses with these options)."""
    _need_extras()
    from .store import make_engine, migrate

    state = _home(home)
    if db_url is None:
        private_dir(state)
    engine = make_engine(db_url or f"sqlite:///{state / 'dlhub.db'}")
    migrate(engine)
    return engine


def _admin(fn, *args):
    """Run a user/group change; its errors (unknown user, bad name...) become clean CLI errors."""
    from .auth import UserAdminError

    try:
        return fn(*args)
    except UserAdminError as exc:
        raise click.ClickException(str(exc))


def _when(t: float | None) -> str:
    import time

    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@main.group()
def user() -> None:
    """Manage users: add, list, new token, revoke (a running manager applies it within 1 s)."""


@user.command("add")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["admin", "user", "endpoint"]),
    default="user",
    show_default=True,
    help="admin: everything; user: submit and publish; endpoint: register endpoints",
)
@_home_option
@_db_option
def user_add(name: str, role: str, home: str | None, db_url: str | None) -> None:
    """Create user NAME and print its token (shown only this once)."""
    from .auth import add_user

    token = _admin(add_user, _engine(home, db_url), name, role)
    click.echo(f"created {role} {name!r}; its token (shown only once):", err=True)
    click.echo(token)


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@_home_option
@_db_option
def user_list(as_json: bool, home: str | None, db_url: str | None) -> None:
    """Users with role, creation, revocation and groups (never tokens)."""
    import json

    from .auth import list_users

    users = list_users(_engine(home, db_url))
    if as_json:
        click.echo(json.dumps(users, indent=2))
        return
    rows = [("NAME", "ROLE", "CREATED", "REVOKED", "GROUPS")]
    rows += [
        (u["name"], u["role"], _when(u["created"]), _when(u["revoked"]), ",".join(u["groups"]) or "-")
        for u in users
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])


@user.command("token")
@click.argument("name")
@_home_option
@_db_option
def user_token(name: str, home: str | None, db_url: str | None) -> None:
    """Give NAME a new token and print it; the old one stops working at once (and a revoked user
    is active again)."""
    from .auth import reissue_token

    token = _admin(reissue_token, _engine(home, db_url), name)
    click.echo(f"new token for {name!r} (shown only once; the old one no longer works):", err=True)
    click.echo(token)


@user.command("revoke")
@click.argument("name")
@_home_option
@_db_option
def user_revoke(name: str, home: str | None, db_url: str | None) -> None:
    """Revoke NAME's token: its connections are closed within a second (`user token` re-enables)."""
    from .auth import revoke_user

    if _admin(revoke_user, _engine(home, db_url), name):
        click.echo(f"revoked {name!r}: a running manager closes its connections within a second")
    else:
        click.echo(f"{name!r} was revoked already")


@main.group()
def group() -> None:
    """Manage groups of users (servables are shared with groups, endpoint policies name them)."""


@group.command("add")
@click.argument("name")
@click.option("--member", "members", multiple=True, metavar="USER", help="a user to add (repeatable)")
@_home_option
@_db_option
def group_add(name: str, members: tuple[str, ...], home: str | None, db_url: str | None) -> None:
    """Create group NAME, or add members to it if it exists."""
    from .auth import add_group

    created = _admin(add_group, _engine(home, db_url), name, list(members))
    added = f" with {', '.join(members)}" if created and members else ""
    if created:
        click.echo(f"created group {name!r}{added}")
    else:
        click.echo(f"group {name!r}: added {', '.join(members) or 'nobody'}")


@group.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@_home_option
@_db_option
def group_list(as_json: bool, home: str | None, db_url: str | None) -> None:
    """Groups and their members."""
    import json

    from .auth import list_groups

    groups = list_groups(_engine(home, db_url))
    if as_json:
        click.echo(json.dumps(groups, indent=2))
        return
    if not groups:
        click.echo("no groups (create one: dlhub-manager group add NAME --member USER)")
    for g in groups:
        click.echo(f"{g['name']}: {', '.join(g['members']) or '(no members)'}")


@group.command("remove")
@click.argument("name")
@click.option(
    "--member", "members", multiple=True, metavar="USER", help="remove only this member (repeatable)"
)
@_home_option
@_db_option
def group_remove(name: str, members: tuple[str, ...], home: str | None, db_url: str | None) -> None:
    """Delete group NAME, or with --member take those users out of it."""
    from .auth import remove_group

    _admin(remove_group, _engine(home, db_url), name, list(members))
    click.echo(f"group {name!r}: removed {', '.join(members)}" if members else f"deleted group {name!r}")


if __name__ == "__main__":
    main()
