"""``dlhub-manager``: run the manager and administer its users."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import click


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
    result_cache_mb,
    result_cache_ttl_s,
    persist_result_cache,
    default_endpoint,
) -> None:
    """Run the manager in the foreground (writes manager.json with its addresses)."""
    from logging.handlers import RotatingFileHandler

    _need_extras()
    from .broker import Manager, ManagerConfig

    state = _home(home)
    state.mkdir(parents=True, exist_ok=True)
    handler = RotatingFileHandler(state / "manager.log", maxBytes=10 * 2**20, backupCount=3)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
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
        )
    except ValueError as exc:
        raise click.ClickException(str(exc))
    manager = Manager(config)
    manager.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: manager.request_stop())
    rest = f", REST {manager.api.url}" if manager.api else ""
    click.echo(f"manager ready: clients {manager.client_url}, endpoints {manager.endpoint_url}{rest}")
    manager.run()


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
    state.mkdir(parents=True, exist_ok=True)
    engine = make_engine(db_url or f"sqlite:///{state / 'dlhub.db'}")
    migrate(engine)
    click.echo(make(engine, name, role))


if __name__ == "__main__":
    main()
