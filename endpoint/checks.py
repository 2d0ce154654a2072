"""``dlhub-endpoint check``: find config mistakes now, not when a job fails hours later.

Each check returns ``(ok, title, detail)``. What runs: the submit script Parsl would write (shown
in full); for Slurm, ``sbatch --test-only`` on it, which asks the real scheduler whether the
partition, account, QOS and limits are acceptable without queueing anything; ``worker_init``
followed by an import of the pool module in a login shell, the way a block would start (this is
where a missing module or a wrong environment shows up); and the manager's answer to the token.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import zmq

from dlhub.protocol import messages as m
from dlhub.protocol.curve import HandshakeWatch, find_server_key, secure_dealer
from dlhub.protocol.serialize import runtime_versions

from .config import EndpointConfig
from .engine import render_submit_script

Check = tuple[bool, str, str]


def run_checks(config: EndpointConfig, run_dir: Path, timeout_s: float) -> Iterator[Check]:
    for name, named in config.all_pools().items():
        python = named.pool.python or sys.executable
        pool_json = run_dir / f"pool-{name}.json"
        pool_cmd = f"{shlex.quote(python)} -m dlhub.endpoint.pool --config {pool_json} --block-id {name}/0"
        with tempfile.TemporaryDirectory(prefix="dlhub-check-") as tmp:
            try:
                script, commands = render_submit_script(named.provider, pool_cmd, Path(tmp))
            except Exception as exc:  # a provider that cannot even render is a config error
                yield False, f"pool {name}: render submit script", f"{type(exc).__name__}: {exc}"
                continue
            yield True, f"pool {name}: submit script (as Parsl will write it)", script
            if commands:
                yield True, f"pool {name}: scheduler commands", "\n".join(commands)
            if named.provider.type == "slurm":
                yield _sbatch_test_only(name, script, Path(tmp), timeout_s)
        yield _worker_init(name, named.provider.worker_init, python, timeout_s)
    yield _manager(config, timeout_s)


def _sbatch_test_only(name: str, script: str, tmp: Path, timeout_s: float) -> Check:
    title = f"pool {name}: sbatch --test-only (the scheduler accepts the job)"
    if shutil.which("sbatch") is None:
        return False, title, "sbatch is not on PATH: is this a Slurm login node?"
    path = tmp / "test-only.sh"
    path.write_text(script)
    try:
        proc = subprocess.run(
            ["sbatch", "--test-only", str(path)], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return False, title, f"sbatch did not answer within {timeout_s:.0f} s (is slurmctld up?)"
    out = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0, title, out


def _worker_init(name: str, worker_init: str, python: str, timeout_s: float) -> Check:
    """Run worker_init then import the pool, as the first lines of a block would."""
    title = f"pool {name}: worker_init + import dlhub (as a block starts)"
    probe = (
        f"{worker_init}\n"
        f"{shlex.quote(python)} -c 'import dlhub.endpoint.pool, dill, zmq, sys, platform; "
        f"print(platform.python_version(), dill.__version__)'"
    )
    try:
        proc = subprocess.run(["bash", "-e", "-c", probe], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, title, f"did not finish within {timeout_s:.0f} s"
    if proc.returncode != 0:
        return False, title, f"exit code {proc.returncode}\n{(proc.stdout + proc.stderr).strip()[-2000:]}"
    versions = proc.stdout.strip().splitlines()[-1].split()
    mine = runtime_versions()
    detail = f"pool would run Python {versions[0]} / dill {versions[1]}"
    same = versions[0].rsplit(".", 1)[0] == mine["python"].rsplit(".", 1)[0] and versions[1] == mine["dill"]
    if not same:
        detail += f" but the endpoint runs Python {mine['python']} / dill {mine['dill']}"
    return same, title, detail


def _manager(config: EndpointConfig, timeout_s: float) -> Check:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    watch = None
    try:
        link = config.manager
        mechanism = secure_dealer(sock, link.address, link.token, find_server_key(link.address, link.key))
        watch = HandshakeWatch(sock, link.address, mechanism)
        sock.connect(config.manager.address)
        hello = m.Hello("check", config.name, config.manager.token, "check", runtime_versions(), {})
        sock.send(m.pack(hello), zmq.NOBLOCK)
        deadline = time.monotonic() + min(timeout_s, 10)
        while not sock.poll(100):  # the handshake watch says at once why the manager refused us
            refused = watch.poll()
            if refused is None and watch.failures >= 3 and mechanism == "curve":
                refused = f"the CURVE handshake failed {watch.failures} times{watch.timeout_hint()}"
            if refused is not None:
                return (
                    False,
                    "manager",
                    f"{link.address} refused: token refused (at the handshake)"
                    if ("token refused" in refused)
                    else refused,
                )
            if time.monotonic() >= deadline:
                return False, "manager", f"no answer from {config.manager.address} within 10 s"
        msg = m.unpack(sock.recv())
        if isinstance(msg, m.Welcome):
            return True, "manager", f"{config.manager.address} accepts the token"
        return False, "manager", f"{config.manager.address} refused: {getattr(msg, 'message', msg)}"
    except Exception as exc:
        return False, "manager", f"{type(exc).__name__}: {exc}"
    finally:
        if watch is not None:
            watch.close()
        sock.close(0)
        ctx.term()
