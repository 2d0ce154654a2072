"""``dlhub-endpoint``: configure, start, stop and inspect endpoints on this host."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from .config import ConfigError, EndpointConfig, dump_config, load_config, parse_config
from .lifecycle import (
    AlreadyRunning,
    InstanceLock,
    dlhub_home,
    endpoint_dir,
    read_pid,
    read_status,
    setup_logging,
    spawn_detached,
    stop_process,
    wait_for,
)

home_option = click.option(
    "--home",
    type=click.Path(file_okay=False),
    default=None,
    help="dlhub home (default $DLHUB_HOME or ~/.dlhub)",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run a dlhub endpoint: it dials out to a manager and runs tasks on worker pools."""


@main.command()
@click.argument("name")
@click.option("--manager", "manager_address", required=True, help="manager endpoint URL (tcp://host:port)")
@click.option("--token", required=True, help="token the endpoint presents to the manager")
@click.option("--workers", default=2, show_default=True, help="workers per node")
@home_option
def configure(name: str, manager_address: str, token: str, workers: int, home: str | None) -> None:
    """Write ENDPOINT's config.yaml (local provider)."""
    try:
        config = parse_config(
            {
                "name": name,
                "manager": {"address": manager_address, "token": token},
                "pool": {"workers_per_node": workers},
            }
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc))
    path = endpoint_dir(name, home) / "config.yaml"
    dump_config(config, path)
    click.echo(f"wrote {path}")


def _load(name: str, home: str | None) -> tuple[EndpointConfig, Path]:
    run_dir = endpoint_dir(name, home)
    try:
        return load_config(run_dir / "config.yaml"), run_dir
    except ConfigError as exc:
        raise click.ClickException(str(exc))


@main.command()
@click.argument("name")
@click.option("--detach", is_flag=True, help="run in the background; return once registered")
@click.option("--log-to-console", is_flag=True, help="also log to stderr")
@home_option
def start(name: str, detach: bool, log_to_console: bool, home: str | None) -> None:
    """Start ENDPOINT (one instance per name)."""
    config, run_dir = _load(name, home)
    if detach:
        _start_detached(name, run_dir, home)
        return
    from .daemon import Endpoint, EndpointRefused, install_signal_handlers

    lock = InstanceLock(run_dir)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        raise click.ClickException(str(exc))
    setup_logging(run_dir / "endpoint.log", config.log_max_bytes, config.log_backups, log_to_console)
    endpoint = Endpoint(config, run_dir)
    install_signal_handlers(endpoint)
    try:
        endpoint.start()
    except EndpointRefused as exc:
        lock.release()
        raise click.ClickException(str(exc))
    try:
        endpoint.run()
    finally:
        lock.release()


def _start_detached(name: str, run_dir: Path, home: str | None) -> None:
    if read_status(run_dir).get("state") != "stopped":
        raise click.ClickException(f"endpoint {name!r} is already running (pid {read_pid(run_dir)})")
    started = time.time()
    args = [sys.executable, "-m", "dlhub.endpoint.cli", "start", name]
    if home:
        args += ["--home", str(home)]
    pid = spawn_detached(args, run_dir / "endpoint.stdout")

    def ready() -> bool:
        status = read_status(run_dir)
        return status.get("updated", 0) >= started and status.get("state") in (
            "running",
            "disconnected",
        )

    def died() -> bool:
        try:
            os.kill(pid, 0)
            return os.waitpid(pid, os.WNOHANG)[0] == pid
        except (ProcessLookupError, ChildProcessError):
            return True

    if not wait_for(lambda: ready() or died(), 60):
        raise click.ClickException(f"endpoint {name!r} did not come up in 60 s; see {run_dir}")
    if not ready():
        tail = (run_dir / "endpoint.stdout").read_text()[-2000:]
        raise click.ClickException(f"endpoint {name!r} failed to start:\n{tail}")
    click.echo(f"endpoint {name!r} started (pid {pid})")


@main.command()
@click.argument("name")
@home_option
def stop(name: str, home: str | None) -> None:
    """Stop ENDPOINT: its blocks are cancelled."""
    run_dir = endpoint_dir(name, home)
    status = read_status(run_dir)
    if status.get("state") == "stopped":
        click.echo(f"endpoint {name!r} is not running")
        return
    if not stop_process(read_pid(run_dir)):
        raise click.ClickException(f"endpoint {name!r} did not stop")
    click.echo(f"endpoint {name!r} stopped")


@main.command("list")
@home_option
def list_endpoints(home: str | None) -> None:
    """List endpoints configured under the home directory."""
    root = dlhub_home(home) / "endpoints"
    names = sorted(p.name for p in root.iterdir() if (p / "config.yaml").exists()) if root.exists() else []
    if not names:
        click.echo("no endpoints configured")
        return
    click.echo(f"{'NAME':20} {'STATE':13} {'PID':>8} {'BLOCKS':>6} {'WORKERS':>7} {'QUEUED':>6}")
    for name in names:
        s = read_status(root / name)
        click.echo(
            f"{name:20} {s.get('state', '?'):13} {s.get('pid') or '-':>8} "
            f"{len(s.get('blocks', {})):>6} {s.get('workers', 0):>7} {s.get('queued', 0):>6}"
        )


@main.command()
@click.argument("name")
@home_option
def status(name: str, home: str | None) -> None:
    """Show ENDPOINT's state, blocks, workers and versions as JSON; exit 1 unless running."""
    s = read_status(endpoint_dir(name, home))
    click.echo(json.dumps(s, indent=2, default=str))
    sys.exit(0 if s.get("state") == "running" else 1)


if __name__ == "__main__":
    main()
