"""``dlhub-endpoint``: configure, start, stop and inspect endpoints on this host."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import click
import yaml

from .config import ConfigError, EndpointConfig, load_config, parse_config
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
@click.version_option(package_name="dlhub")
def main() -> None:
    """Run a dlhub endpoint: it dials out to a manager and runs tasks on worker pools."""


TEMPLATES = ("local", "slurm", "slurm-apptainer", "pbs", "perlmutter", "frontier", "polaris", "aurora")


def _template_text(template: str) -> str:
    from importlib.resources import files

    return (files("dlhub.configs") / f"{template}.yaml").read_text()


def _local_manager(home: str | None) -> tuple[str | None, str | None, str | None]:
    """The manager `dlhub up` runs under this home, if any: its endpoint URL, admin token and
    CURVE public key."""
    root = dlhub_home(home) / "manager"
    try:
        info = json.loads((root / "manager.json").read_text())
        return (
            info.get("endpoint_url"),
            (root / "admin.token").read_text().strip(),
            info.get("curve_public_key"),
        )
    except (FileNotFoundError, json.JSONDecodeError):
        return None, None, None


def _fill_key(text: str, key: str) -> str:
    """Pin the manager's CURVE key: a ``key:`` line under ``manager:``, after its token."""
    import re

    line = f"  key: {json.dumps(key)}   # the manager's CURVE public key (manager.json: curve_public_key)"
    if re.search(r"(?m)^  key: ", text):
        return re.sub(r"(?m)^  key: .*$", lambda _: line, text, count=1)
    return re.sub(r"(?m)^(  token: .*)$", lambda mt: f"{mt.group(1)}\n{line}", text, count=1)


def _fill(text: str, name: str, address: str | None, token: str | None, workers: int | None) -> str:
    """Set name, manager address/token and workers in a template, keeping its comments."""
    import re

    text = re.sub(r"(?m)^name: \S+", f"name: {name}", text, count=1)
    if address:
        text = re.sub(r"(?m)^(  address: )\S+", rf"\g<1>{address}", text, count=1)
    if token:
        text = re.sub(r"(?m)^(  token: )\S+", rf"\g<1>{token}", text, count=1)
    if workers:
        text = re.sub(r"(?m)^(  workers_per_node: )\d+", rf"\g<1>{workers}", text, count=1)
    return text


@main.command()
@click.argument("name")
@click.option(
    "--template",
    type=click.Choice(TEMPLATES),
    default="local",
    show_default=True,
    help="config template to start from (see configs/ in the source)",
)
@click.option(
    "--manager",
    "manager_address",
    default=None,
    help="manager endpoint URL (default: the manager `dlhub up` runs here, if any)",
)
@click.option("--token", default=None, help="token the endpoint presents to the manager")
@click.option(
    "--manager-key",
    default=None,
    metavar="KEY",
    help="the manager's CURVE public key (curve_public_key in its manager.json; default: the "
    "key of the manager `dlhub up` runs here, or one this user runs on this host)",
)
@click.option("--workers", default=None, type=click.IntRange(1, 4096), help="workers per node")
@click.option("--force", is_flag=True, help="overwrite an existing config.yaml")
@click.option(
    "--from-globus-compute",
    "gc_config",
    default=None,
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="migrate a Globus Compute endpoint config.yaml (instead of --template); what does not map "
    "is printed and listed at the top of the written file",
)
@home_option
def configure(name, template, manager_address, token, manager_key, workers, force, gc_config, home) -> None:
    """Write ENDPOINT's config.yaml from a commented template, or migrated from a Globus Compute
    endpoint config (--from-globus-compute)."""
    from dlhub.protocol.curve import check_key

    path = endpoint_dir(name, home) / "config.yaml"
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists; edit it, or pass --force to replace it")
    local_address, local_token, local_key = _local_manager(home)
    source = _template_text(template)
    if gc_config:
        from .gc_migrate import MigrationError, migrate

        try:
            migration = migrate(Path(gc_config).read_text(), name, source=gc_config)
        except (OSError, UnicodeDecodeError) as exc:
            raise click.ClickException(f"cannot read {gc_config}: {exc}")
        except MigrationError as exc:
            raise click.ClickException(str(exc))
        source, template = migration.text, f"migrated from Globus Compute config {gc_config}"
        for item in migration.fill_in:
            click.echo(f"fill in: {item}")
        for item in migration.unmapped:
            click.echo(f"not migrated: {item}")
    text = _fill(source, name, manager_address or local_address, token or local_token, workers)
    if manager_key:
        try:
            text = _fill_key(text, check_key(manager_key, "--manager-key"))
        except ValueError as exc:
            raise click.ClickException(str(exc))
    elif local_key and (manager_address is None or manager_address == local_address):
        text = _fill_key(text, local_key)
    try:
        parse_config(yaml.safe_load(text), f"(template {template})")
    except ConfigError as exc:
        raise click.ClickException(str(exc))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    click.echo(f"wrote {path} (template {template})")
    if "CHANGE-ME" in text or "hub.example.org" in text:
        click.echo("edit manager.address and manager.token before `dlhub-endpoint check`")


def _load(name: str, home: str | None) -> tuple[EndpointConfig, Path]:
    run_dir = endpoint_dir(name, home)
    try:
        config = load_config(run_dir / "config.yaml")
    except ConfigError as exc:
        raise click.ClickException(str(exc))
    if config.name != name:
        raise click.ClickException(
            f"{run_dir / 'config.yaml'} says name: {config.name!r}, but it is the config of endpoint "
            f"{name!r}; make them the same (users pass the name to Executor(endpoint=...))"
        )
    return config, run_dir


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
@click.option("--now", is_flag=True, help="do not wait for running tasks (default: drain first)")
@home_option
def stop(name: str, now: bool, home: str | None) -> None:
    """Stop ENDPOINT: drain running tasks (up to drain_timeout_s), then cancel its blocks."""
    run_dir = endpoint_dir(name, home)
    if read_status(run_dir).get("state") == "stopped":
        click.echo(f"endpoint {name!r} is not running")
        return
    try:
        drain_s = load_config(run_dir / "config.yaml").drain_timeout_s
    except ConfigError:
        drain_s = 300.0
    sig = signal.SIGINT if now else signal.SIGTERM
    if not stop_process(read_pid(run_dir), timeout_s=(5 if now else drain_s) + 30, sig=sig):
        raise click.ClickException(f"endpoint {name!r} did not stop")
    click.echo(f"endpoint {name!r} stopped")


@main.command()
@click.argument("name")
@click.option("--now", is_flag=True, help="do not wait for running tasks")
@home_option
@click.pass_context
def restart(ctx: click.Context, name: str, now: bool, home: str | None) -> None:
    """Stop ENDPOINT (draining unless --now) and start it again in the background."""
    ctx.invoke(stop, name=name, now=now, home=home)
    ctx.invoke(start, name=name, detach=True, log_to_console=False, home=home)


@main.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines (Ctrl-C to stop)")
@click.option("-n", "--lines", default=50, show_default=True, help="lines to show from the end")
@home_option
def logs(name: str, follow: bool, lines: int, home: str | None) -> None:
    """Show ENDPOINT's log (rotated files are endpoint.log.1, .2, ...)."""
    path = endpoint_dir(name, home) / "endpoint.log"
    if not path.exists():
        raise click.ClickException(f"no log at {path}")
    with open(path, errors="replace") as f:
        for line in f.readlines()[-lines:]:
            click.echo(line, nl=False)
        if not follow:
            return
        inode = os.fstat(f.fileno()).st_ino
        try:
            while True:
                line = f.readline()
                if line:
                    click.echo(line, nl=False)
                    continue
                time.sleep(0.2)
                try:
                    if os.stat(path).st_ino != inode:  # rotated: follow the new file
                        f.close()
                        f = open(path, errors="replace")  # noqa: SIM115
                        inode = os.fstat(f.fileno()).st_ino
                except FileNotFoundError:
                    pass
        except KeyboardInterrupt:
            pass


@main.command()
@click.argument("name")
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, help="seconds per probe")
@home_option
def check(name: str, timeout_s: float, home: str | None) -> None:
    """Validate ENDPOINT's config, render its submit script, and dry-run what can be tried here:
    the scheduler's own validation (sbatch --test-only), worker_init, the manager's token, and
    for a containerized pool the image's Python, dill and dlhub (run through its runtime)."""
    import itertools

    from .checks import run_checks
    from .containers import check_pools

    run_dir = endpoint_dir(name, home)
    try:
        config, _ = _load(name, home)
    except click.ClickException as exc:
        click.echo(f"FAIL config: {exc.message}")
        sys.exit(1)
    click.echo(f"ok   config {run_dir / 'config.yaml'} ({config.provider.type} provider)")
    failures = 0
    pools = check_pools(config, timeout_s, _image_resolver(config, run_dir))
    for ok, title, detail in itertools.chain(run_checks(config, run_dir, timeout_s), pools):
        click.echo(f"{'ok  ' if ok else 'FAIL'} {title}")
        if detail:
            click.echo("\n".join(f"     {line}" for line in detail.rstrip().splitlines()))
        failures += not ok
    sys.exit(1 if failures else 0)


ACTIVE_BLOCK_STATES = ("PENDING", "RUNNING", "HELD", "UNKNOWN")


def _active_blocks(status: dict) -> int | None:
    """Blocks that hold (or wait for) nodes now; None for a stopped endpoint (its last
    status.json is history, not what runs)."""
    if status.get("state") == "stopped":
        return None
    return sum(
        1
        for blocks in (status.get("blocks") or {}).values()
        for block in blocks.values()
        if block.get("state") in ACTIVE_BLOCK_STATES
    )


def _image_resolver(config, run_dir):
    """For ``check``: a container image given as a URI, fetched into the endpoint's image cache
    as its pools would fetch it (a local path is returned as it is)."""
    import dataclasses

    from .images import cache_for, is_local

    def resolve(spec):
        if is_local(spec.image):
            return spec
        images = cache_for(run_dir, config)
        images.get(spec.image, spec.type)
        return dataclasses.replace(spec, image=images.image_for(spec.image, spec.type))

    return resolve


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="print name -> status as JSON, for scripts")
@home_option
def list_endpoints(as_json: bool, home: str | None) -> None:
    """List endpoints configured under the home directory (a stopped one shows no blocks)."""
    root = dlhub_home(home) / "endpoints"
    names = sorted(p.name for p in root.iterdir() if (p / "config.yaml").exists()) if root.exists() else []
    if as_json:
        click.echo(json.dumps({name: read_status(root / name) for name in names}, indent=2, default=str))
        return
    if not names:
        click.echo("no endpoints configured")
        return
    from dlhub.protocol.gc_serialize import endpoint_uuid  # its Globus Compute endpoint_id

    click.echo(f"{'NAME':20} {'STATE':13} {'PID':>8} {'BLOCKS':>6} {'WORKERS':>7} {'QUEUED':>6}  UUID")
    for name in names:
        s = read_status(root / name)
        blocks = _active_blocks(s)
        stopped = blocks is None
        click.echo(
            f"{name:20} {s.get('state', '?'):13} {s.get('pid') or '-':>8} "
            f"{'-' if stopped else blocks:>6} {'-' if stopped else s.get('workers', 0):>7} "
            f"{'-' if stopped else s.get('queued', 0):>6}  {endpoint_uuid(name)}"
        )


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print the raw status.json (as before), for scripts")
@home_option
def status(name: str, as_json: bool, home: str | None) -> None:
    """Show ENDPOINT's state, manager link, blocks, workers, queues and servables; exit 1 unless
    running. --json prints the status the endpoint writes each heartbeat."""
    run_dir = endpoint_dir(name, home)
    s = read_status(run_dir)
    if as_json:
        click.echo(json.dumps(s, indent=2, default=str))
    else:
        if not (run_dir / "config.yaml").exists() and "updated" not in s:
            raise click.ClickException(
                f"no endpoint {name!r} under {run_dir.parent} (see `dlhub-endpoint list`)"
            )
        click.echo(_status_text(name, s, run_dir, home))
    sys.exit(0 if s.get("state") == "running" else 1)


def _local(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _when(epoch: float | None, now: float) -> str:
    """``12 s ago (2026-12-04 15:54:15 UTC)``, in local time; ``never`` without a time."""
    if not isinstance(epoch, (int, float)):
        return "never"
    return f"{_span(now - epoch)} ago ({_local(epoch)})"


def _span(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _manager_note(address: str | None, run_dir: Path, home: str | None) -> str:
    """Why the address this endpoint dials is not the one in config.json, or what is wrong with it."""
    notes = []
    try:
        configured = load_config(run_dir / "config.yaml").manager.address
    except ConfigError:
        configured = None
    if configured and address and configured != address:
        notes.append(f"config.yaml now says {configured}; `dlhub-endpoint restart {run_dir.name}` to use it")
    local = dlhub_home(home) / "manager" / "manager.json"
    try:
        info = json.loads(local.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        info = {}
    client_url, endpoint_url = info.get("client_url"), info.get("endpoint_url")
    if address and endpoint_url == address:
        notes.append(
            f"the manager's port for endpoints; clients use its client port {client_url}, in config.json"
        )
    elif address and client_url == address:
        notes.append(f"that is the manager's client port: endpoints must dial {endpoint_url}")
    elif address and endpoint_url:
        notes.append(
            f"the manager `dlhub up` runs under this home takes endpoints at {endpoint_url} now "
            "(it was restarted on other ports, or this endpoint serves another manager)"
        )
    else:
        notes.append("the manager's endpoint port; its clients use another, its client port")
    return "; ".join(notes)


def _status_text(name: str, s: dict, run_dir: Path, home: str | None) -> str:
    """The human form of ``status.json``: local times, labelled counts, blocks with job ids."""
    now = time.time()
    state = s.get("state", "?")
    lines = []
    if state == "stopped":
        lines.append(f"endpoint {name}: stopped; its last status was written {_when(s.get('updated'), now)}")
    else:
        started = s.get("started")
        up = f", up {_span(now - started)} (since {_local(started)})" if started else ""
        lines.append(f"endpoint {name}: {state} (pid {s.get('pid')}){up}")
    out = lines.append

    def row(key: str, value: str) -> None:
        out(f"  {key + ':':13} {value}")

    row("manager", str(s.get("manager", "?")))
    out(f"  {'':13} ({_manager_note(s.get('manager'), run_dir, home)})")
    versions = s.get("versions") or {}
    if versions:
        row("versions", f"Python {versions.get('python', '?')}, dill {versions.get('dill', '?')}")
    if state != "stopped":
        beat = s.get("heartbeat_s")
        every = f", rewritten every {beat:g} s" if isinstance(beat, (int, float)) else ""
        row("status", f"written {_when(s.get('updated'), now)}{every}")
        row("workers", f"{s.get('workers', 0)} ({s.get('busy_workers', 0)} busy)")
        on_workers = s.get("on_workers", max(0, s.get("outstanding", 0) - s.get("queued", 0)))
        by_pool = s.get("queued_by_pool") or {}
        pools = f" ({', '.join(f'{p} {n}' for p, n in by_pool.items())})" if len(by_pool) > 1 else ""
        row(
            "tasks now",
            f"{s.get('queued', 0)} queued for a worker{pools}, "
            f"{on_workers} on workers (running or prefetched)",
        )
    if s.get("received"):
        failed = f" ({s['failed']} failed)" if "failed" in s else ""
        row(
            "tasks so far",
            f"received {s['received']}, finished {s.get('completed', 0)}{failed}; "
            f"{s.get('worker_lost', 0)} lost with their worker, {s.get('requeued', 0)} requeued",
        )
    out(_blocks_text(s, run_dir))
    for key, error in sorted((s.get("block_errors") or {}).items()):
        out(f"  block error {key} (job {error.get('job_id')}): {error.get('reason')}")
        for line in str(error.get("output") or "").strip().splitlines()[-5:]:
            out(f"    | {line}")
    for pool, message in sorted((s.get("failing") or {}).items()):
        out(f"  pool {pool} is failing its tasks: {message}")
    for pool, query in sorted((s.get("provider_queries") or {}).items()):
        seconds = query.get("running_s")
        out(f"  pool {pool}: its scheduler's status command has run {seconds} s (not waited on)")
    servables = s.get("servables") or {}
    if servables:
        out("  servables:")
        for label, st in sorted(servables.items()):
            out(f"    {label}")
            out(
                f"      loads {st.get('loads', 0)}, evictions {st.get('evictions', 0)}, output cache hits "
                f"{st.get('output_cache_hits', 0)} / misses {st.get('output_cache_misses', 0)}, "
                f"{st.get('batched_calls', 0)} calls in {st.get('batches', 0)} batches"
            )
    for warning in s.get("version_warnings") or []:
        out(f"  warning: {warning}")
    out(f"  files:        {run_dir} (config.yaml, endpoint.log; `dlhub-endpoint logs {name}`)")
    return "\n".join(lines)


def _blocks_text(s: dict, run_dir: Path) -> str:
    """One line per block: state, scheduler job id, the pool running in it and its workers."""
    try:
        pools = load_config(run_dir / "config.yaml").all_pools()
        kinds = {pool: named.provider.type for pool, named in pools.items()}
    except ConfigError:
        kinds = {}
    pools_by_id = s.get("pools") or {}
    blocks = [
        (pool, b, info) for pool, bs in sorted((s.get("blocks") or {}).items()) for b, info in bs.items()
    ]

    def job(pool: str, info: dict) -> str:
        return " ".join(filter(None, (kinds.get(pool), "job", str(info.get("job_id")))))

    if s.get("state") == "stopped":
        left = [(p, b, i) for p, b, i in blocks if i.get("state") in ACTIVE_BLOCK_STATES]
        if not left:
            return "  blocks:       none (stopped)"
        jobs = ", ".join(f"{p}/{b} ({job(p, i)}, {i.get('state')})" for p, b, i in left)
        return (
            "  blocks:       none (stopped), but it did not stop cleanly: these blocks were active at its "
            f"last status and may still be in the scheduler's queue: {jobs}"
        )
    if not blocks:
        return "  blocks:       none yet"
    active = sum(1 for _, _, i in blocks if i.get("state") in ACTIVE_BLOCK_STATES)
    lines = [f"  blocks:       {active} active"]
    for pool, block, info in blocks:
        line = f"    {pool}/{block}  {info.get('state')}  {job(pool, info)}"
        p = pools_by_id.get(info.get("pool"))
        if p:
            n = p.get("workers", 0)
            line += f"  pool {info['pool']} on {p.get('hostname')}, {n} worker{'' if n == 1 else 's'}"
            if p.get("draining"):
                line += " (draining: walltime ends soon)"
        if info.get("message"):
            line += f"  ({info['message']})"
        lines.append(line)
    return "\n".join(lines)


@main.group()
def images() -> None:
    """The endpoint's image cache (endpoints/NAME/images/): list and prune pulled images."""


def _image_cache(name: str, home: str | None):
    from .images import cache_for

    config, run_dir = _load(name, home)
    return cache_for(run_dir, config)


@images.command("list")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print the entries as JSON, for scripts")
@home_option
def images_list(name: str, as_json: bool, home: str | None) -> None:
    """List the images in endpoint NAME's cache, most recently used first."""
    cache = _image_cache(name, home)
    entries = cache.entries()
    if as_json:
        rows = [{**e.to_dict(), "pinned": cache.pinned(e.key)} for e in entries]
        click.echo(json.dumps({"budget_bytes": cache.budget_bytes, "entries": rows}, indent=2))
        return
    if not entries:
        click.echo(f"no images cached in {cache.root}")
        return
    now = time.time()
    click.echo(f"{'REF':50} {'RUNTIME':12} {'SIZE':>10} {'LAST USED':>12} IN USE")
    for e in entries:
        click.echo(
            f"{e.ref:50} {e.runtime:12} {e.size / 1e6:>8.1f}MB {_span(now - e.last_used) + ' ago':>12} "
            f"{'yes' if cache.pinned(e.key) else '-'}"
        )
    total = sum(e.size for e in entries)
    click.echo(f"total {total / 1e9:.2f} GB of {cache.budget_bytes / 1e9:.2f} GB (image_cache.budget_gb)")


@images.command("prune")
@click.argument("name")
@click.option("--all", "everything", is_flag=True, help="remove every image no running pool uses")
@click.option(
    "--older-than-days",
    type=click.FloatRange(min=0),
    default=None,
    help="remove images not used for this many days",
)
@home_option
def images_prune(name: str, everything: bool, older_than_days: float | None, home: str | None) -> None:
    """Remove images of endpoint NAME's cache that no running pool uses: what is over the budget
    (least recently used first), every one with --all, or those unused for --older-than-days."""
    if everything and older_than_days is not None:
        raise click.UsageError("--all and --older-than-days exclude each other")
    cache = _image_cache(name, home)
    removed = cache.prune(everything=everything, older_than_days=older_than_days)
    for e in removed:
        click.echo(f"removed {e.ref} ({e.runtime}, {e.size / 1e6:.1f} MB)")
    left = cache.entries()
    click.echo(f"removed {len(removed)} image(s); {len(left)} left, {sum(e.size for e in left) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
