"""``dlhub``: the embedded default (``up``/``down``/``status``) for one machine.

``dlhub up`` starts a manager (SQLite under the home directory) and an endpoint named ``local``
with a LocalProvider pool, as separate processes, and writes the client config so that
``Executor(endpoint="local")`` needs nothing else. The executor never imports the manager or the
endpoint: it runs their CLIs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

from dlhub.protocol.private import private_dir, private_file, tighten

from .config import dlhub_home, write_client_config
from .config_cli import register as register_config_command
from .repo_cli import register as register_repository_commands
from .status_view import examples_line, print_status

ENDPOINT_NAME = "local"


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone (reap it)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """An exited process its (adoptive) parent has not reaped yet; Linux only, else False."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait(predicate, timeout_s: float, what: str, log: Path | None = None, note=None) -> None:
    """Poll ``predicate`` until it holds, saying what is awaited: on a terminal a spinner with
    ``what``, the elapsed time and ``note()`` (e.g. "1/2 workers registered"); elsewhere (pipes,
    logs) a line each time ``note()`` changes."""
    from rich.console import Console

    console = Console(highlight=False)
    spinner = console.status(f"waiting for {what}") if console.is_terminal else None
    if spinner is not None:
        spinner.start()
    started = time.monotonic()
    deadline = started + timeout_s
    shown = None
    try:
        while time.monotonic() < deadline:
            if predicate():
                return
            text = note() if note is not None else None
            if spinner is not None:
                detail = f": {text}" if text else ""
                spinner.update(f"waiting for {what}{detail} ({time.monotonic() - started:.1f} s)")
            elif text and text != shown:
                click.echo(f"  {text}")
            shown = text
            time.sleep(0.01)
    finally:
        if spinner is not None:
            spinner.stop()
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + log.read_text()[-3000:]
    raise click.ClickException(f"{what} did not come up within {timeout_s:.0f} s{tail}")


def _spawn(args: list[str], log: Path, detach: bool, cwd: Path) -> subprocess.Popen:
    """Start a service; ``cwd`` is the dlhub home so files in the user's current directory are
    never imported by it (``python -m`` puts the current directory on the path)."""
    private_dir(log.parent)
    with open(private_file(log), "ab") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            cwd=cwd,
        )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dlhub")
def main() -> None:
    """dlhub: publish, find and run models and functions for science."""


@main.command()
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    help="state directory (default $DLHUB_HOME or ~/.dlhub)",
)
@click.option(
    "--workers", default=2, show_default=True, type=click.IntRange(1, 256), help="workers in the local pool"
)
@click.option("--detach", is_flag=True, help="return once ready, leaving the services running")
@click.option(
    "--examples/--no-examples",
    default=True,
    show_default=True,
    help="publish the example servables in the background once ready",
)
@click.option(
    "--insecure-loopback",
    is_flag=True,
    help="no CURVE encryption on the manager's ZeroMQ links nor the local endpoint's worker links "
    "(worker_link: plain; this host only; tokens and passwords still checked)",
)
@click.option(
    "--amqp",
    is_flag=True,
    help="publish Globus Compute results to RabbitMQ, for globus_compute_sdk.Executor: the broker on "
    "127.0.0.1:$RMQ_PORT (default 5672), started with scripts/rabbitmq-localhost.sh when it is down",
)
@click.option(
    "--amqp-url",
    default=None,
    metavar="URL",
    help="like --amqp, with this running broker: amqp://ADMIN:PASSWORD@HOST:PORT/VHOST (an administrator: "
    "the manager creates each user's credentials through the management API on $RMQ_MGMT_PORT)",
)
def up(
    home: str | None,
    workers: int,
    detach: bool,
    examples: bool,
    insecure_loopback: bool,
    amqp: bool,
    amqp_url: str | None,
) -> None:
    """Start a manager and a `local` endpoint on this machine."""
    missing = [m for m in ("sqlalchemy", "parsl", "fastapi") if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(
            f"`dlhub up` runs the manager and an endpoint, which need {', '.join(missing)}: "
            "pip install 'dlhub[all]'"
        )
    started = time.monotonic()
    root = dlhub_home(home).resolve()
    private_dir(root)  # the database, tokens and logs live here: this user's only
    tightened = tighten(root)
    if tightened:
        click.echo(f"made {tightened} paths under {root} private to you (folders 0700, files 0600)")
    procs: list[subprocess.Popen] = []
    try:
        if amqp or amqp_url:
            _ensure_broker(amqp_url)
        manager_info = _up_manager(root, procs, detach, insecure_loopback, amqp or bool(amqp_url), amqp_url)
        token = (root / "manager" / "admin.token").read_text().strip()
        write_client_config(
            root,
            manager_info["client_url"],
            token,
            rest_url=manager_info.get("rest_url") or "",
            manager_key=manager_info.get("curve_public_key") or "",  # pinned by every connection
            # the endpoint for calls that name none; a user's own choice in the file is kept
            default_endpoint=_read_json(root / "config.json").get("default_endpoint") or ENDPOINT_NAME,
        )
        _up_endpoint(root, manager_info, token, workers, procs, detach)
    except BaseException:
        for proc in reversed(procs):  # a failed `up` leaves nothing of its own running
            _stop_pid(proc.pid, sig=signal.SIGINT, timeout_s=10)
        raise
    click.echo(
        f"dlhub ready in {time.monotonic() - started:.2f} s: manager {manager_info['client_url']}, "
        f"endpoint {ENDPOINT_NAME!r}, home {root}"
    )
    if examples and manager_info.get("rest_url"):
        _publish_examples_in_background(root)
    if detach:
        return
    if not procs:
        click.echo("everything was already running; this command started nothing and stops nothing")
        return
    click.echo("press Ctrl-C to stop")
    stop_on = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_on)
    signal.sigwait(stop_on)
    for proc in reversed(procs):  # only what this invocation started
        _stop_pid(proc.pid, sig=signal.SIGINT)
    click.echo("stopped")


def _publish_examples_in_background(root: Path) -> None:
    """Build and publish the example servables in a low-priority process of their own, after
    everything is ready, so they never delay the first task (log: examples.log)."""
    pid_file = root / "examples.pid"
    try:
        if _pid_alive(int(pid_file.read_text())):
            click.echo(f"the example servables are still being published (log: {root / 'examples.log'})")
            return
    except (FileNotFoundError, ValueError):
        pass
    log = root / "examples.log"
    (root / "examples.json").unlink(missing_ok=True)  # the new publisher's progress replaces the last
    with open(private_file(log), "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dlhub.executor.examples", "--home", str(root)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
            start_new_session=True,
            preexec_fn=lambda: os.nice(10),
        )
    pid_file.write_text(str(proc.pid))
    click.echo(
        "publishing the example servables in the background (training the models takes a minute; "
        f"`dlhub up` does not wait for them):\n  log: {log}\n  watch: tail -f {log}, or `dlhub status`"
    )


RABBITMQ_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rabbitmq-localhost.sh"
RABBITMQ_SERVER_PATHS = ("/usr/sbin/rabbitmq-server", "/usr/lib/rabbitmq/bin/rabbitmq-server")  # off $PATH


def _tcp_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def _ensure_broker(url: str | None) -> None:
    """``--amqp``: a RabbitMQ broker must answer (AMQP and its management API), else say why and
    how to get one; a broker on 127.0.0.1 is started with scripts/rabbitmq-localhost.sh when root."""
    import shutil
    import urllib.parse

    mgmt_port = int(os.environ.get("RMQ_MGMT_PORT", "15672"))
    if url:
        u = urllib.parse.urlsplit(url)
        host, port = u.hostname or "", u.port or 5672
        if u.scheme != "amqp" or not host:
            raise click.ClickException(f"--amqp-url {url!r}: expected amqp://ADMIN:PASSWORD@HOST:PORT/VHOST")
    else:
        host, port = "127.0.0.1", int(os.environ.get("RMQ_PORT", "5672"))
    if _tcp_open(host, port) and _tcp_open(host, mgmt_port):
        click.echo(f"AMQP broker: {host}:{port} (management API on port {mgmt_port})")
        return
    if url:
        raise click.ClickException(
            f"no RabbitMQ answers at {host}:{port} (AMQP) and {host}:{mgmt_port} (management API, "
            "$RMQ_MGMT_PORT) given by --amqp-url"
        )
    if not (shutil.which("rabbitmq-server") or any(Path(p).exists() for p in RABBITMQ_SERVER_PATHS)):
        raise click.ClickException(
            f"--amqp: no RabbitMQ on 127.0.0.1:{port} and rabbitmq-server is not installed. Install it "
            "(Debian/Ubuntu: apt-get install rabbitmq-server; or run scripts/rabbitmq-localhost.sh as "
            "root, which installs and starts it), or give a running broker with --amqp-url "
            "amqp://ADMIN:PASSWORD@HOST:PORT/"
        )
    if not RABBITMQ_SCRIPT.exists():
        raise click.ClickException(
            f"--amqp: rabbitmq-server is installed but not running on 127.0.0.1:{port}; start it "
            "(with an administrator $RMQ_ADMIN_USER and the management plugin), or give --amqp-url"
        )
    if os.geteuid() != 0:
        raise click.ClickException(
            f"--amqp: RabbitMQ is not running on 127.0.0.1:{port}; start it as root: sudo {RABBITMQ_SCRIPT}"
        )
    click.echo(f"starting RabbitMQ with {RABBITMQ_SCRIPT} ...")
    run = subprocess.run(["bash", str(RABBITMQ_SCRIPT)], capture_output=True, text=True, timeout=600)
    if run.returncode != 0 or not _tcp_open(host, port):
        raise click.ClickException(f"RabbitMQ did not start:\n{(run.stdout + run.stderr)[-3000:]}")
    click.echo(f"AMQP broker: {host}:{port} (management API on port {mgmt_port})")


def _up_manager(
    root: Path,
    procs: list[subprocess.Popen],
    detach: bool,
    insecure: bool = False,
    amqp: bool = False,
    amqp_url: str | None = None,
) -> dict:
    """The running manager's info, starting one if needed (on the ports it had last time, so
    clients and endpoints of a previous run reconnect by themselves)."""
    manager_home = root / "manager"
    info = _read_json(manager_home / "manager.json")
    if _pid_alive(info.get("pid")):
        click.echo(f"manager already running (pid {info['pid']})")
        if amqp and not _read_json(manager_home / "globus_compute.json").get("amqp"):
            click.echo("  it publishes no AMQP results: `dlhub down` then `dlhub up --amqp`")
        return info
    (manager_home / "manager.json").unlink(missing_ok=True)
    args = [sys.executable, "-m", "dlhub.manager.cli", "serve", "--home", str(manager_home)]
    args += ["--default-endpoint", ENDPOINT_NAME]  # publishes and REST runs that name no endpoint
    if insecure:
        args.append("--insecure-loopback")
    last = _read_json(manager_home / "ports.json")
    for option, key in (
        ("--client-port", "client"),
        ("--endpoint-port", "endpoint"),
        ("--rest-port", "rest"),
    ):
        if _port_free(last.get(key)):
            args += [option, str(last[key])]
    # the Globus Compute API: 5000 (the SDK's environment="local") when free, else its last port, else any
    gc_port = next((p for p in (GC_DEFAULT_PORT, last.get("globus_compute")) if _port_free(p)), 0)
    args += ["--globus-compute-port", str(gc_port)]
    if amqp:
        args += ["--amqp-url", amqp_url] if amqp_url else ["--globus-compute-amqp"]
    reused = [f"{key} {last[key]}" for key in ("client", "endpoint", "rest") if _port_free(last.get(key))]
    ports = f"the ports of its last run ({', '.join(reused)})" if reused else "free ports"
    click.echo(f"starting the manager on {ports} (state: {manager_home}) ...")
    started = time.monotonic()
    proc = _spawn(args, manager_home / "manager.stdout", detach, cwd=root)
    procs.append(proc)
    _wait(
        lambda: (manager_home / "manager.json").exists() or proc.poll() is not None,
        30,
        "the manager to listen",
        manager_home / "manager.stdout",
    )
    if proc.poll() is not None:
        raise click.ClickException(
            "the manager failed to start:\n" + (manager_home / "manager.stdout").read_text()[-3000:]
        )
    info = _read_json(manager_home / "manager.json")
    ports = {
        "client": int(info["client_url"].rsplit(":", 1)[1]),
        "endpoint": int(info["endpoint_url"].rsplit(":", 1)[1]),
    }
    if info.get("rest_url"):
        ports["rest"] = int(info["rest_url"].rsplit(":", 1)[1])
    gc_url = _read_json(manager_home / "globus_compute.json").get("url")
    if gc_url:
        ports["globus_compute"] = int(gc_url.rsplit(":", 1)[1])
        if ports["globus_compute"] != GC_DEFAULT_PORT:
            click.echo(
                f"port {GC_DEFAULT_PORT} is taken: the Globus Compute API is on {gc_url} "
                "(dlhub.compat.globus_compute.client() finds it)"
            )
    (manager_home / "ports.json").write_text(json.dumps(ports))
    rest = f", REST {info['rest_url']}" if info.get("rest_url") else ""
    rest += f", Globus Compute API {gc_url}" if gc_url else ""
    click.echo(
        f"manager up in {time.monotonic() - started:.1f} s: clients {info['client_url']}, "
        f"endpoints {info['endpoint_url']}{rest}"
    )
    return info


GC_DEFAULT_PORT = 5000  # globus_compute_sdk.Client(environment="local") talks to localhost:5000


def _port_free(port: object) -> bool:
    if not isinstance(port, int) or not 0 < port < 65536:
        return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds: TIME_WAIT is fine
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _up_endpoint(
    root: Path, manager_info: dict, token: str, workers: int, procs: list[subprocess.Popen], detach: bool
) -> None:
    ep_dir = root / "endpoints" / ENDPOINT_NAME
    status = _read_json(ep_dir / "status.json")
    if status.get("state") in ("running", "disconnected") and _pid_alive(status.get("pid")):
        click.echo(f"endpoint {ENDPOINT_NAME!r} already running (pid {status['pid']})")
        if status.get("workers") is not None and status["workers"] != workers:
            click.echo(
                f"  it has {status['workers']} workers; `dlhub down` then `dlhub up --workers {workers}`"
            )
        return
    # The endpoint validates this file when it starts (the executor never imports it). An existing
    # file keeps the admin's edits: only the manager link and the worker count are brought up to date.
    private_dir(ep_dir)
    config_path = ep_dir / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) if config_path.exists() else None) or {}
    config["name"] = ENDPOINT_NAME
    config["manager"] = {"address": manager_info["endpoint_url"], "token": token}
    if manager_info.get("curve_public_key"):  # the endpoint pins the manager's key
        config["manager"]["key"] = manager_info["curve_public_key"]
        config.pop("worker_link", None)  # CURVE to its workers too
    else:  # --insecure-loopback: nothing here is encrypted, the workers' links neither
        config["worker_link"] = "plain"
    config.setdefault("pool", {})["workers_per_node"] = workers
    # keep one block warm: the local pool should not go cold between calls
    config.setdefault("provider", {"type": "local", "init_blocks": 1, "min_blocks": 1, "max_blocks": 1})
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    config_path.chmod(0o600)
    (ep_dir / "status.json").unlink(missing_ok=True)
    args = [sys.executable, "-m", "dlhub.endpoint.cli", "start", ENDPOINT_NAME, "--home", str(root)]
    click.echo(
        f"starting endpoint {ENDPOINT_NAME!r} with {workers} worker{'s' if workers != 1 else ''} "
        f"(log: {ep_dir / 'endpoint.log'}) ..."
    )
    started = time.monotonic()
    ep_proc = _spawn(args, ep_dir / "endpoint.stdout", detach, cwd=root)
    procs.append(ep_proc)

    def ready() -> bool:
        s = _read_json(ep_dir / "status.json")
        return (s.get("state") == "running" and s.get("workers", 0) >= workers) or ep_proc.poll() is not None

    def note() -> str:
        s = _read_json(ep_dir / "status.json")
        if s.get("state") != "running":
            return "connecting to the manager, starting its pool"
        return f"workers registered: {s.get('workers', 0)}/{workers}"

    _wait(ready, 60, f"endpoint {ENDPOINT_NAME!r} and its workers", ep_dir / "endpoint.log", note)
    if ep_proc.poll() is not None:
        raise click.ClickException(
            "the endpoint failed to start:\n" + (ep_dir / "endpoint.stdout").read_text()[-3000:]
        )
    registered = _read_json(ep_dir / "status.json").get("workers", workers)
    click.echo(
        f"endpoint {ENDPOINT_NAME!r} up in {time.monotonic() - started:.1f} s: "
        f"{registered}/{workers} workers registered"
    )


def _stop_pid(pid: int | None, timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> bool:
    """Signal, wait for the process to go, then SIGKILL."""
    if not _pid_alive(pid):
        return False
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return True


def _down(root: Path) -> list[str]:
    stopped = []
    endpoints = root / "endpoints"
    for ep_dir in sorted(endpoints.iterdir()) if endpoints.exists() else []:
        try:
            pid = int((ep_dir / "endpoint.pid").read_text())
        except (FileNotFoundError, ValueError):
            continue
        if _stop_pid(pid, sig=signal.SIGINT):  # at once: `down` does not wait for tasks to drain
            stopped.append(f"endpoint {ep_dir.name}")
    try:
        if _stop_pid(int((root / "examples.pid").read_text()), timeout_s=5):
            stopped.append("example publisher")
    except (FileNotFoundError, ValueError):
        pass
    (root / "examples.pid").unlink(missing_ok=True)
    if _stop_pid(_read_json(root / "manager" / "manager.json").get("pid")):
        stopped.append("manager")
    # the manager's Globus Compute address goes with it (client() must not find a dead URL)
    if not _pid_alive(_read_json(root / "manager" / "globus_compute.json").get("pid")):
        (root / "manager" / "globus_compute.json").unlink(missing_ok=True)
    (root / "up.json").unlink(missing_ok=True)
    return stopped


@main.command()
@click.option("--home", type=click.Path(file_okay=False))
def down(home: str | None) -> None:
    """Stop what `dlhub up` started."""
    stopped = _down(dlhub_home(home).resolve())
    click.echo("stopped: " + ", ".join(stopped) if stopped else "nothing was running")


@main.command()
@click.option("--home", type=click.Path(file_okay=False))
@click.option("--endpoint", default=ENDPOINT_NAME, show_default=True, help="endpoint that must be up")
@click.option("--json", "as_json", is_flag=True, help="print the raw status as JSON")
def status(home: str | None, endpoint: str, as_json: bool) -> None:
    """Show the manager and its endpoints; exit 0 only if the manager and ENDPOINT are up."""
    from dlhub.protocol import DLHubError

    from .config import ClientConfig
    from .connection import Connection

    try:
        config = ClientConfig.resolve(home=home)
        conn = Connection(
            config.manager,
            config.token,
            on_results=lambda r: None,
            connect_timeout_s=3,
            server_key=config.manager_key,
        )
    except (DLHubError, ValueError) as exc:
        click.echo(f"manager: down ({exc})")
        sys.exit(1)
    try:
        info = conn.request("status").result(5)
    finally:
        conn.close()
    from dlhub.protocol.gc_serialize import endpoint_uuid

    for name, ep in info["endpoints"].items():  # the UUID Globus Compute code names it by
        ep.setdefault("uuid", endpoint_uuid(name))
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        print_status(config.manager, info)
        examples = _examples_line(dlhub_home(home).resolve())
        if examples:
            click.echo(examples)
    ep = info["endpoints"].get(endpoint)
    if ep is None:  # a Globus Compute UUID names an endpoint too
        ep = next((e for n, e in info["endpoints"].items() if endpoint_uuid(n) == endpoint), None)
    if ep is None:
        click.echo(f"endpoint {endpoint!r} is not known to this manager")
    sys.exit(0 if ep and ep["connected"] and ep["info"].get("workers", 0) >= 1 else 1)


def _examples_line(root: Path) -> str | None:
    """The example publisher's progress line (see ``status_view.examples_line``), from the state
    file it keeps (``examples.json``) and its pid file; None when `dlhub up` never started it."""
    state = _read_json(root / "examples.json")
    try:
        running = _pid_alive(int((root / "examples.pid").read_text()))
    except (FileNotFoundError, ValueError):
        running = False
    return examples_line(state, running, root / "examples.log")


register_repository_commands(main)
register_config_command(main)

if __name__ == "__main__":
    main()
