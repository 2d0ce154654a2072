"""Files of a dlhub home are private: folders 0700, files 0600, whatever the umask.

The home holds the task database (results, stdout, payloads), tokens, keys and logs, so it is
never readable by other users. New folders and files are made with explicit modes (and chmod
after, since ``mkdir``/``open`` modes are masked by the umask only to be *narrower*); an existing
home from before is tightened once at start, with a log line saying how many paths changed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIR_MODE, FILE_MODE = 0o700, 0o600


def private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and missing parents) 0700; an existing one is narrowed to 0700."""
    path = Path(path)
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for p in [*missing, path]:
        _narrow(p, DIR_MODE)
    return path


def private_file(path: str | os.PathLike) -> Path:
    """Make sure ``path`` exists and is 0600 (created empty if missing; contents kept)."""
    path = Path(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE))
    _narrow(path, FILE_MODE)
    return path


def write_private(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` as a 0600 file, atomically (tmp + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)


def tighten(root: str | os.PathLike) -> int:
    """Narrow every folder under ``root`` (itself included) to owner-only, keeping the owner's
    bits (a script stays executable); returns how many paths changed. Links are not followed."""
    root, changed = Path(root), 0
    if not root.is_dir():
        return 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for p in (Path(dirpath), *(Path(dirpath) / f for f in filenames)):
            try:
                info = p.lstat()
            except OSError:
                continue
            if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
                continue
            if info.st_mode & 0o077:
                os.chmod(p, stat.S_IMODE(info.st_mode) & 0o700)
                changed += 1
    return changed


def _narrow(path: Path, mode: int) -> None:
    try:
        info = path.lstat()
    except OSError:
        return
    if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)
