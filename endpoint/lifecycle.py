"""Endpoint processes on disk: one running instance per name, its logs, its state.

``$DLHUB_HOME/endpoints/<name>/`` holds ``config.yaml``, ``endpoint.lock`` (held with flock for
the life of the process, so a stale pid file is detected, never trusted), ``endpoint.pid``,
``status.json`` (rewritten every heartbeat) and ``endpoint.log`` (rotated with a size cap).
"""

from __future__ import annotations

import fcntl
import json
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dlhub.protocol.private import private_dir, private_file, tighten


def dlhub_home(home: str | Path | None = None) -> Path:
    return Path(home or os.environ.get("DLHUB_HOME") or Path.home() / ".dlhub").expanduser()


def endpoint_dir(name: str, home: str | Path | None = None) -> Path:
    """The endpoint's folder; ``name`` may be its Globus Compute UUID (``dlhub-endpoint list``)."""
    root = dlhub_home(home) / "endpoints"
    path = root / name
    if len(name) == 36 and not path.exists() and root.is_dir():
        from dlhub.protocol.gc_serialize import endpoint_uuid

        for candidate in root.iterdir():
            if candidate.is_dir() and endpoint_uuid(candidate.name) == name:
                return candidate
    return path


class AlreadyRunning(RuntimeError):
    pass


class InstanceLock:
    """An exclusive flock on ``endpoint.lock``; released by the kernel if the process dies."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "endpoint.lock"
        self.pid_path = run_dir / "endpoint.pid"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(
                f"endpoint in {self.path.parent} is already running (pid {read_pid(self.path.parent)})"
            ) from None
        self._fd = fd
        self.pid_path.write_text(str(os.getpid()))

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.pid_path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


def read_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / "endpoint.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def is_running(run_dir: Path) -> bool:
    """True when some process holds the instance lock (a leftover pid file is not enough)."""
    path = run_dir / "endpoint.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def read_status(run_dir: Path) -> dict[str, Any]:
    """The endpoint's last status, corrected to ``stopped`` when no process holds the lock."""
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        status = {"name": run_dir.name}
    if not is_running(run_dir):
        status["state"] = "stopped"
        status["pid"] = None
        for key in ("workers", "queued", "outstanding", "busy_workers"):  # nothing runs now
            if key in status:
                status[key] = 0
    return status


class _BoundedFileHandler(logging.handlers.RotatingFileHandler):
    """Rotates at ``maxBytes``; with no backups the file starts over (the standard handler
    never rotates then, and the log would grow without bound)."""

    def _open(self):
        stream = super()._open()
        os.chmod(self.baseFilename, 0o600)  # a new file after a rollover is private too
        return stream

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream:
            self.stream.close()
        self.stream = open(self.baseFilename, "w", encoding=self.encoding)  # noqa: SIM115
        os.chmod(self.baseFilename, 0o600)


def setup_logging(log_file: Path, max_bytes: int, backups: int, console: bool = False) -> None:
    """Log to ``log_file``, kept under ``max_bytes`` per file and ``backups`` rotated files.
    The endpoint's folder is made private (0700, files 0600) first, an older one tightened."""
    private_dir(log_file.parent)
    tightened = tighten(log_file.parent)
    private_file(log_file)
    handler: logging.Handler = _BoundedFileHandler(log_file, maxBytes=max_bytes, backupCount=backups)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        root.addHandler(stream)
    root.setLevel(logging.INFO)
    logging.getLogger("parsl").setLevel(logging.WARNING)
    if tightened:
        logging.getLogger("dlhub.endpoint").info(
            "made %d paths under %s private to this user (folders 0700, files 0600)",
            tightened,
            log_file.parent,
        )


def spawn_detached(args: list[str], log_file: Path, env: dict[str, str] | None = None) -> int:
    """Start ``args`` in its own session, output to ``log_file``; return its pid."""
    private_dir(log_file.parent)
    private_file(log_file)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    return proc.pid


def is_zombie(pid: int) -> bool:
    """An exited process its (adoptive) parent has not reaped yet; Linux only, else False."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def wait_for(predicate, timeout_s: float, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def stop_process(pid: int | None, timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> bool:
    """Signal (SIGTERM: drain), wait, then SIGKILL. True when the process is gone."""
    if not pid:
        return True
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # reap it if it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        return is_zombie(pid)

    if wait_for(gone, timeout_s, 0.05):
        return True
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return wait_for(gone, 5, 0.05)
