"""The endpoint's image cache: one per endpoint (``endpoints/NAME/images/``), shared by its pools.

How image references read, and what a servable's ``container`` resolves to, is
``image_refs.py``'s; how an image is built from requirements, ``image_build.py``'s (the names
they define are importable from here as before).

``ImageCache(root, budget_bytes).get(ref, runtime)`` gives a local image for an image reference:

- a local path (``/sw/images/x.sif``, a directory image) is used as is: never copied, never
  evicted, not listed;
- a registry URI (``docker://``, ``oras://``, ``library://``, ``shub://``, ``https://``) is fetched
  ONCE by the runtime's own command:

  * ``apptainer`` / ``singularity``: ``pull --name DEST.sif URI``, the command line spython's
    ``Client.pull`` runs (built with its ``_init_command("pull")``). ``Client.pull`` itself is not
    called: it first runs ``singularity --version`` (hardcoded: an apptainer-only site fails),
    and it ends the process (``sys.exit``) on a bad URI; so, as for ``exec`` in
    ``containers.py``, argv[0] becomes the configured executable and we run the command,
  * ``podman`` / ``docker``: ``pull URI`` (docker without the ``docker://`` prefix), then
    ``image inspect`` records the image id and size; evicting the entry runs ``rmi ID``,
  * ``charliecloud``: no puller here (``ch-image`` comes with ``charliecloud-builders``, which
    pulls in docker.io and buildah): a clear :class:`ContainerError`; use a ``file://`` or
    ``dir://`` reference;

- ``build://KEY`` is an image the endpoint BUILDS from a servable's requirements, as recorded
  in ``builds/KEY.json``: the build itself (wheels, recipe, the runtime's builder) is
  ``image_build.py``'s (:class:`ImageBuilds`, this cache's base class); the entry it makes is
  cached, evicted and pinned like a pulled one (podman/docker: the image id; eviction runs
  ``rmi``).
- ``file:///path/rootfs.tar[.gz|.xz]`` is unpacked into the cache (a directory image that
  ch-run, apptainer/singularity sandboxes run; podman/docker: ``import`` of the tarball);
  ``file:///path/x.sif`` (not a tarball) is copied; ``dir:///path`` is copied (symlinks kept).
  These are offline, real fetches whose cost a warm cache avoids.

Layout under ``root``: ``entries/KEY/`` (the image, KEY = sha256 of ``runtime NUL ref``),
``index.json`` (0600, written atomically: size, created, last_used, ref, runtime, digest),
``locks/KEY.lock`` (an fcntl lock per entry: one process or thread fetches, the others wait and
then reuse it), ``tmp/KEY.PID.RAND`` (a fetch in progress, renamed into ``entries/`` when
complete; one left by a crash is removed by the next fetch of that key, or by ``prune``) and
``builds/KEY.json`` (the spec of a ``build://KEY`` image, so any process of the endpoint can
build it again after an eviction), ``tools/`` (the zipped pip builds install with) and
``pins/KEY/PID@HOST.RAND`` (an entry in use: a pin whose process is alive is never evicted or
pruned; one from another host, on a shared file system, counts as alive until it is unpinned).
Across nodes the entry lock needs a file system whose ``flock`` is cluster-wide (NFSv4; Lustre
mounted with ``-o flock``).

Budget: after a fetch, least recently used entries that are not pinned are evicted until the
cache fits ``budget_bytes``; an image larger than the whole budget is refused. When pinned
entries keep the cache over budget the new image is kept anyway (it is needed now) and a
warning is logged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .containers import DEFAULT_BINARY, TYPES, ContainerError, _runtime_env
from .image_build import (  # noqa: F401 - re-exported: callers import these from the cache
    BUILD_DIR,
    BUILD_TIMEOUT_S,
    BUILDERS,
    RECIPE_VERSION,
    BuildSpec,
    ImageBuilds,
    build_spec_for,
    write_recipe,
)
from .image_refs import (  # noqa: F401 - re-exported: callers import these from the cache
    _SCHEME,
    BUILD_SCHEME,
    LOCAL_SCHEMES,
    OCI,
    REGISTRY_SCHEMES,
    SIF,
    entry_key,
    is_local,
    servable_image,
    servable_image_problem,
)

log = logging.getLogger(__name__)

DEFAULT_BUDGET_GB = 20.0
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")
PULL_TIMEOUT_S = 3600.0


# threads of one process: fcntl locks are per process, so the entry lock is also a thread lock
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@dataclass
class Entry:
    """One cached image (a row of ``index.json``)."""

    key: str
    ref: str
    runtime: str
    size: int
    created: float
    last_used: float
    image: str  # what a ContainerSpec's image is: a path, or an image id (podman/docker)
    digest: str | None = None  # the runtime's image id/digest where it reports one
    uses: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    import socket

    return socket.gethostname().replace("/", "_") or "localhost"


def _tree_size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _rmtree(path: Path) -> None:
    """Remove a tree, including read-only folders images often have."""

    def onerror(func, p, exc_info):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, onerror=onerror)


class ImageCache(ImageBuilds):
    """A content-addressed image cache with a disk budget and LRU eviction (module docstring)."""

    def __init__(
        self,
        root: str | os.PathLike,
        budget_bytes: int = int(DEFAULT_BUDGET_GB * 1e9),
        binaries: dict[str, str] | None = None,
    ):
        if budget_bytes <= 0:
            raise ContainerError(f"image cache budget must be positive, got {budget_bytes} bytes")
        self.root = Path(root)
        self.budget_bytes = int(budget_bytes)
        self.binaries = dict(binaries or {})  # runtime -> executable (container.binary)
        self.fetches = 0  # fetches done by this instance (tests, benchmarks)
        for sub in ("entries", "locks", "tmp", "pins"):  # builds/ and tools/ when first needed
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)

    # ---- index ----------------------------------------------------------------------------------

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        with self._flock(self.root / "locks" / "index.lock"):
            yield

    def _read_index(self) -> dict[str, Entry]:
        try:
            raw = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("image cache index %s unreadable (%s): starting an empty one", self.index_path, exc)
            return {}
        out = {}
        for key, row in (raw.get("entries") or {}).items():
            try:
                out[key] = Entry(**row)
            except TypeError:
                continue
        return out

    def _write_index(self, entries: dict[str, Entry]) -> None:
        tmp = self.index_path.with_name(f"index.json.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"entries": {k: e.to_dict() for k, e in entries.items()}}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.index_path)

    def entries(self) -> list[Entry]:
        """The cached images, most recently used first."""
        with self._index_lock():
            entries = self._read_index()
        return sorted(entries.values(), key=lambda e: e.last_used, reverse=True)

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    # ---- locks and pins -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, path: Path) -> Iterator[None]:
        with _thread_locks_guard:
            tlock = _thread_locks.setdefault(str(path), threading.Lock())
        with tlock:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock

    def pinned(self, key: str) -> bool:
        """Whether a live process holds a pin on ``key`` (stale pins are removed)."""
        folder = self.root / "pins" / key
        if not folder.is_dir():
            return False
        live = False
        here = _host()
        for pin in folder.iterdir():
            pid, _, rest = pin.name.partition("@")
            host = rest.rsplit(".", 1)[0]
            if host and host != here:
                live = True  # a process on another node (a shared file system): cannot check it
            elif pid.isdigit() and _pid_alive(int(pid)):
                live = True
            else:
                pin.unlink(missing_ok=True)
        return live

    def pin(self, ref: str, runtime: str, pid: int | None = None) -> Path | None:
        """Mark ``ref`` in use by process ``pid`` (default: this one) until :meth:`unpin` or that
        process ends; a local path needs no pin (None)."""
        if is_local(ref):
            return None
        folder = self.root / "pins" / entry_key(ref, runtime)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        pin = folder / f"{pid or os.getpid()}@{_host()}.{secrets.token_hex(4)}"
        pin.touch(mode=0o600)
        return pin

    @staticmethod
    def unpin(pin: Path | None) -> None:
        if pin is not None:
            pin.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lease(self, ref: str, runtime: str) -> Iterator[str]:
        """``get`` and pin for the duration: yields what a ContainerSpec's image is."""
        pin = self.pin(ref, runtime)
        try:
            self.get(ref, runtime)
            yield self.image_for(ref, runtime)
        finally:
            self.unpin(pin)

    # ---- get ------------------------------------------------------------------------------------

    def get(self, ref: str, runtime: str) -> Path:
        """A local image for ``ref`` under ``runtime``: the path itself for a local path, else
        the cache entry's folder (fetched once; :meth:`image_for` gives the image inside it)."""
        runtime, ref = self._check(ref, runtime)
        if is_local(ref):
            if not os.path.exists(ref) and runtime not in OCI:
                raise ContainerError(f"image {ref!r} ({runtime}): no such file or directory")
            return Path(ref)
        key = entry_key(ref, runtime)
        final = self.root / "entries" / key
        with self._flock(self.root / "locks" / f"{key}.lock"):
            with self._index_lock():
                index = self._read_index()
                entry = index.get(key)
                if entry is not None and final.exists():
                    entry.last_used, entry.uses = time.time(), entry.uses + 1
                    self._write_index(index)
                    return final
            # nothing complete: what is there is left from a crash (we hold the entry's lock)
            self._clean_key(key)
            entry = self._fetch(ref, runtime, key, final)
            self.fetches += 1
            self._admit(entry)
        return final

    def image_for(self, ref: str, runtime: str) -> str:
        """What ``container.image`` is for ``ref``: a path, or an image id (podman/docker)."""
        runtime, ref = self._check(ref, runtime)
        if is_local(ref):
            return ref
        with self._index_lock():
            entry = self._read_index().get(entry_key(ref, runtime))
        if entry is None:  # not fetched yet (or evicted): fetch it now
            self.get(ref, runtime)
            with self._index_lock():
                entry = self._read_index().get(entry_key(ref, runtime))
            if entry is None:
                raise ContainerError(f"image {ref!r} ({runtime}) was evicted as soon as it was fetched")
        return entry.image

    def _check(self, ref: str, runtime: str) -> tuple[str, str]:
        if runtime not in TYPES or runtime == "none":
            raise ContainerError(
                f"image cache: runtime {runtime!r} is not one of {', '.join(t for t in TYPES if t != 'none')}"
            )
        if not isinstance(ref, str) or not ref.strip():
            raise ContainerError("image cache: empty image reference")
        ref = ref.strip()
        m = _SCHEME.match(ref)
        if m and m.group(1) not in REGISTRY_SCHEMES + LOCAL_SCHEMES + (BUILD_SCHEME,):
            raise ContainerError(
                f"image {ref!r}: unknown scheme {m.group(1)}:// (expected a local path, "
                f"{', '.join(s + '://' for s in REGISTRY_SCHEMES + LOCAL_SCHEMES)})"
            )
        if m and not m.group(2):
            raise ContainerError(f"image {ref!r}: nothing after {m.group(1)}://")
        return runtime, ref

    def _clean_key(self, key: str) -> None:
        for tmp in (self.root / "tmp").glob(f"{key}.*"):
            _rmtree(tmp)
        _rmtree(self.root / "entries" / key)

    # ---- fetch ----------------------------------------------------------------------------------

    def _fetch(self, ref: str, runtime: str, key: str, final: Path) -> Entry:
        scheme, _, rest = ref.partition("://")
        tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        digest = None
        try:
            if scheme == BUILD_SCHEME:
                spec = self.build_spec(ref)
                if spec.runtime != runtime:
                    raise ContainerError(f"image {ref!r} is built for {spec.runtime}, not {runtime}")
                image_name, digest = self._build(spec, ref, tmp)
                _rmtree(tmp / "context")  # the build context (its wheels): the recipe was kept
            elif scheme in LOCAL_SCHEMES:
                image_name, digest = self._import_local(scheme, rest, ref, runtime, tmp)
            elif runtime in SIF:
                image_name = self._pull_sif(ref, runtime, tmp)
            elif runtime in OCI:
                image_name, digest = self._pull_oci(ref, runtime, tmp)
            else:
                raise ContainerError(
                    f"image {ref!r}: charliecloud cannot pull {scheme}:// here: ch-image comes with "
                    "charliecloud-builders (not installed: it needs docker.io and buildah). Use a "
                    "file:///path/rootfs.tar.gz or dir:///path reference, or a local directory image"
                )
            size = _tree_size(tmp)
            if digest and runtime in OCI:  # the image lives in the runtime's store
                size = self._oci_size(runtime, digest) or size
            if size > self.budget_bytes:
                if digest and runtime in OCI:
                    self._oci_rmi(runtime, digest)
                raise ContainerError(
                    f"image {ref!r} is {size / 1e9:.2f} GB, over the whole image cache budget "
                    f"({self.budget_bytes / 1e9:.2f} GB, image_cache.budget_gb)"
                )
            os.rename(tmp, final)
        except BaseException:
            _rmtree(tmp)
            raise
        now = time.time()
        image = digest if (runtime in OCI and digest) else str(final / image_name)
        return Entry(key, ref, runtime, size, now, now, image, digest, 1)

    def _import_local(self, scheme: str, rest: str, ref: str, runtime: str, tmp: Path):
        src = Path(rest)
        if not src.is_absolute():
            raise ContainerError(f"image {ref!r}: {scheme}:// needs an absolute path ({scheme}:///path)")
        if not src.exists():
            raise ContainerError(f"image {ref!r}: {src} does not exist")
        is_tar = src.is_file() and src.name.endswith(TAR_SUFFIXES)
        if scheme == "dir" and not src.is_dir():
            raise ContainerError(f"image {ref!r}: dir:// needs a directory, {src} is not one")
        if scheme == "file" and not src.is_file():
            raise ContainerError(f"image {ref!r}: file:// needs a file (a tarball or .sif); use dir://")
        if runtime in OCI:
            if not is_tar:
                raise ContainerError(f"image {ref!r}: {runtime} imports a rootfs tarball (.tar[.gz])")
            out = self._run(runtime, [self._exe(runtime), "import", str(src)], ref)
            image_id = (out.strip().splitlines() or [""])[-1].strip()
            if not image_id:
                raise ContainerError(f"image {ref!r}: {runtime} import printed no image id")
            (tmp / "image.id").write_text(image_id + "\n")
            return "image.id", image_id
        if scheme == "dir":
            shutil.copytree(src, tmp / "image", symlinks=True)
            return "image", None
        if is_tar:
            # GNU tar: it keeps the absolute symlinks real root filesystems have
            # (/etc/alternatives/...) yet refuses members named ../x and never writes through a
            # symlink the archive made (it sets such links up last); any refusal fails the fetch.
            # tarfile does the same only with extraction filters (Python >= 3.11.4, 3.10.12),
            # and dlhub supports 3.10
            (tmp / "image").mkdir()
            argv = ["tar", "--no-same-owner", "-xf", str(src), "-C", str(tmp / "image")]
            try:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            except OSError as exc:
                raise ContainerError(f"image {ref!r}: cannot run tar: {exc}") from None
            if proc.returncode != 0:
                raise ContainerError(f"image {ref!r}: cannot unpack {src}: {proc.stderr.strip()[-1500:]}")
            return "image", None
        if runtime == "charliecloud":
            raise ContainerError(
                f"image {ref!r}: charliecloud runs a directory image: give a rootfs tarball or dir://"
            )
        shutil.copy2(src, tmp / "image.sif")
        return "image.sif", None

    def _exe(self, runtime: str) -> str:
        exe = self.binaries.get(runtime) or DEFAULT_BINARY[runtime]
        if not shutil.which(exe):
            raise ContainerError(
                f"container runtime {runtime!r}: executable {exe!r} not found on PATH "
                "(install it, or set container.binary)"
            )
        return exe

    def _run(self, runtime: str, argv: list[str], ref: str) -> str:
        try:
            proc = subprocess.run(
                argv,
                # the host's whole environment: a pull needs its proxy and registry credentials
                # (https_proxy, APPTAINER_DOCKER_USERNAME, REGISTRY_AUTH_FILE ...); nothing of it
                # reaches a worker
                env=_runtime_env(os.environ),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=PULL_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise ContainerError(f"image {ref!r}: {' '.join(argv[:2])} timed out") from None
        except OSError as exc:
            raise ContainerError(f"image {ref!r}: cannot run {argv[0]}: {exc}") from None
        if proc.returncode != 0:
            raise ContainerError(
                f"image {ref!r}: `{' '.join(argv)}` failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-1500:]}"
            )
        return proc.stdout

    def _pull_sif(self, ref: str, runtime: str, tmp: Path) -> str:
        from spython.main import get_client

        exe = self._exe(runtime)
        client = get_client()
        client.quiet, client.debug = False, False
        dest = tmp / "image.sif"
        argv = client._init_command("pull", None) + ["--name", str(dest), ref]
        argv[0] = exe  # spython hardcodes "singularity"
        self._run(runtime, argv, ref)
        if not dest.is_file():
            raise ContainerError(f"image {ref!r}: {runtime} pull reported success but wrote no {dest.name}")
        return "image.sif"

    def _pull_oci(self, ref: str, runtime: str, tmp: Path) -> tuple[str, str]:
        exe = self._exe(runtime)
        scheme, _, rest = ref.partition("://")
        if scheme not in ("docker", "oras", "https") or (runtime == "docker" and scheme != "docker"):
            raise ContainerError(f"image {ref!r}: {runtime} cannot pull {scheme}:// images")
        name = rest if runtime == "docker" else ref  # podman takes the docker:// transport
        self._run(runtime, [exe, "pull", name], ref)
        out = self._run(runtime, [exe, "image", "inspect", "--format", "{{.Id}}", name], ref)
        image_id = (out.strip().splitlines() or [""])[0].strip()
        if not image_id:
            raise ContainerError(f"image {ref!r}: {runtime} image inspect gave no image id")
        (tmp / "image.id").write_text(image_id + "\n")
        return "image.id", image_id

    def _oci_size(self, runtime: str, image_id: str) -> int | None:
        try:
            argv = [self._exe(runtime), "image", "inspect", "--format", "{{.Size}}", image_id]
            out = self._run(runtime, argv, image_id)
            return int(out.strip().splitlines()[0])
        except (ContainerError, ValueError, IndexError):
            return None

    def _oci_rmi(self, runtime: str, image_id: str) -> None:
        try:
            self._run(runtime, [self._exe(runtime), "rmi", image_id], image_id)
        except ContainerError as exc:
            log.warning("image cache: could not remove %s image %s: %s", runtime, image_id, exc)

    # ---- budget, eviction, prune ----------------------------------------------------------------

    def _admit(self, new: Entry) -> None:
        """Record ``new`` (already in ``entries/``), then evict LRU unpinned entries over budget."""
        with self._index_lock():
            index = self._read_index()
            index[new.key] = new
            self._write_index(index)
            total = sum(e.size for e in index.values())
            victims = []
            for e in sorted(index.values(), key=lambda e: e.last_used):
                if total <= self.budget_bytes:
                    break
                if e.key == new.key or self.pinned(e.key) or not self._try_lock(e.key):
                    continue
                victims.append(e)
                total -= e.size
            for e in victims:
                self._drop(e, index)
            self._write_index(index)
            if total > self.budget_bytes:
                log.warning(
                    "image cache %s: %.2f GB over its budget of %.2f GB: the rest is pinned by running pools",
                    self.root,
                    (total - self.budget_bytes) / 1e9,
                    self.budget_bytes / 1e9,
                )

    def _try_lock(self, key: str) -> bool:
        """Whether no one holds ``key``'s entry lock (a get in progress) right now."""
        fd = os.open(self.root / "locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        finally:
            os.close(fd)

    def _drop(self, entry: Entry, index: dict[str, Entry]) -> None:
        if entry.runtime in OCI and entry.digest:
            self._oci_rmi(entry.runtime, entry.digest)
        _rmtree(self.root / "entries" / entry.key)
        index.pop(entry.key, None)
        log.info("image cache: evicted %s (%s, %d bytes)", entry.ref, entry.runtime, entry.size)

    def prune(self, everything: bool = False, older_than_days: float | None = None) -> list[Entry]:
        """Remove entries no live process pins: all of them with ``everything``, those unused for
        ``older_than_days`` with that, else only what is over the budget (LRU first). Also removes
        temp folders and entry folders that crashed fetches left. Returns the removed entries."""
        removed: list[Entry] = []
        with self._index_lock():
            index = self._read_index()
            now = time.time()
            total = sum(e.size for e in index.values())
            for e in sorted(index.values(), key=lambda e: e.last_used):
                if self.pinned(e.key) or not self._try_lock(e.key):
                    continue
                if everything:
                    pass
                elif older_than_days is not None:
                    if now - e.last_used < older_than_days * 86400:
                        continue
                elif total <= self.budget_bytes:
                    break
                self._drop(e, index)
                total -= e.size
                removed.append(e)
            self._write_index(index)
            for path in list((self.root / "tmp").iterdir()) + list((self.root / "entries").iterdir()):
                key = path.name.split(".", 1)[0]
                if path.parent.name == "entries" and key in index:
                    continue
                if self._try_lock(key):  # no fetch of it is running
                    _rmtree(path)
        return removed


def cache_for(run_dir: str | os.PathLike, config: Any | None = None) -> ImageCache:
    """The image cache of the endpoint whose run directory is ``run_dir``."""
    budget_gb = getattr(getattr(config, "image_cache", None), "budget_gb", DEFAULT_BUDGET_GB)
    binaries = {}
    if config is not None:
        for named in config.all_pools().values():
            c = named.pool.container
            if c.type != "none" and c.binary:
                binaries[c.type] = c.binary
    return ImageCache(Path(run_dir) / "images", int(budget_gb * 1e9), binaries)


def servable_build(
    requirements: list[str], config: Any, run_dir: str | os.PathLike
) -> tuple[str | None, str | None]:
    """``(image, problem)`` for a servable with ``requirements`` and no container on an endpoint
    with ``image_cache.build: true``: ``image`` is ``build://KEY``, registered in the endpoint's
    image cache (built when the daemon fetches it, at verification, off its loop)."""
    try:
        spec = build_spec_for(requirements, config)
        return cache_for(run_dir, config).register_build(spec), None
    except (ContainerError, OSError) as exc:
        return None, f"image build for requirements {', '.join(requirements)}: {exc}"
