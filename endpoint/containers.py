"""Container runtimes for worker pools: each worker of a pool runs inside an image.

    pool process (outside, supervises) --Popen--> RUNTIME ... IMAGE python3 -m dlhub.endpoint.worker
                                                   (apptainer | singularity | ch-run | podman | docker)

One frozen :class:`ContainerSpec` (from ``pool.container`` in the endpoint YAML) and one small
interface: :func:`worker_launch` turns (spec, worker argv, worker env, extra binds, devices) into a
:class:`Launch` (the argv and environment the pool gives ``subprocess.Popen``, and the container
name to remove when the worker is stopped, for podman/docker). The pool keeps the worker's pid, exit
status and kill exactly as for a bare worker: ch-run and Singularity/Apptainer ``exec`` the command
(or wait for it) in the foreground, and podman/docker run with ``--rm -i`` in the foreground.

Runtimes:

- ``apptainer`` / ``singularity``: the command line is built by **spython** (its ``Client``
  method every spython command goes through, ``_init_command("exec", flags)``, its bind list, and
  the option order of its ``execute``: ``exec [--nv|--rocm] --bind a --bind b [options] IMAGE
  CMD...``). spython hardcodes the executable ``singularity`` (no option or variable for it), so
  for ``apptainer`` argv[0] is replaced. We ``Popen`` that command ourselves rather than calling
  ``Client.execute``, which waits for the command to end: the pool must supervise a long-running
  worker (pid, exit status, kill).
- ``charliecloud``: ``ch-run --bind=SRC:DST --unset-env=* --set-env=K=V --cd=DIR IMAGE -- CMD``
  (``USER`` is set when missing: ch-run refuses to start without it).
- ``podman`` / ``docker``: ``run --rm -i --init --network=host --name dlhub-<worker> -v SRC:DST -e K=V
  -w DIR [--device nvidia.com/gpu=N] IMAGE CMD``. Killing the ``run`` client does not stop the
  container, so :func:`remove_container` (``rm -f NAME``) runs when the pool stops or kills it.
- ``none``: no container (the pool spawns workers exactly as without this module).

Environment: the worker's environment is passed explicitly (``DLHUB_WORKER_ID``, the accelerator
variables, ``PYTHONPATH`` for dlhub); the runtime process itself starts from a minimal host
environment, so the host's ``PYTHONPATH``/``VIRTUAL_ENV``/``PYTHONHOME`` never leak into the image.

dlhub inside the image (``container.dlhub``): ``bind`` (default) bind-mounts a copy of the
endpoint's installed ``dlhub`` package (:func:`prepare_bundle`) at ``container.mount`` (default
``/opt``, a folder that exists in the image) and the host environment's site-packages (the
worker's pyzmq, msgpack, dill ...) at ``<mount>/site``, with
``PYTHONPATH=<mount>:/dlhub/requirements:<mount>/site`` (``/dlhub/requirements``: a servable's
requirements in an image the endpoint built, see ``image_build.py``);
the image's Python must have the endpoint's major.minor version (``dlhub-endpoint check`` says).
``installed``: the image has dlhub and its dependencies; nothing is bound, PYTHONPATH untouched.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TYPES = ("none", "apptainer", "singularity", "charliecloud", "podman", "docker")
GPU_KINDS = ("none", "nvidia", "rocm")
DLHUB_MODES = ("bind", "installed")
DEFAULT_BINARY = {
    "apptainer": "apptainer",
    "singularity": "singularity",
    "charliecloud": "ch-run",
    "podman": "podman",
    "docker": "docker",
}
# the host variables the runtime process itself may need (its own config, temp dir, user)
RUNTIME_HOST_VARS = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "CONTAINERS_CONF",
    "CONTAINERS_STORAGE_CONF",
    "CONTAINERS_REGISTRIES_CONF",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "APPTAINER_CACHEDIR",
    "SINGULARITY_CACHEDIR",
    "APPTAINER_TMPDIR",
    "SINGULARITY_TMPDIR",
    "CHSHIM_STATE",
)
# never passed into a container, whatever the caller gives: they break the image's Python
HOST_ONLY_VARS = ("PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE", "CONDA_PREFIX")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ACCELERATOR_VARS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")
# folders of the bundle that are bind targets inside the image (ch-run cannot create them)
SITE_DIR, CACHE_DIR, DATA_DIR = "site", "cache", "data"
# where an image the endpoint builds from a servable's requirements installs them
# (endpoint/images.py): on a worker's PYTHONPATH right after dlhub, before the endpoint's
# site-packages, so a requirement's version wins over the endpoint's; absent in other images
REQUIREMENTS_DIR = "/dlhub/requirements"
BUNDLE_PACKAGES = ("protocol", "executor", "endpoint", "configs", "manager")


class ContainerError(RuntimeError):
    """A container runtime cannot be used as configured; the message names the runtime."""


@dataclass(frozen=True)
class ContainerSpec:
    """How a pool's workers run in an image (``pool.container`` of the endpoint config)."""

    type: str = "none"
    image: str = ""
    options: tuple[str, ...] = ()  # extra runtime options, before the image
    binds: tuple[str, ...] = ()  # "SRC:DST" (or "SRC" = same path)
    python: str = "python3"  # the image's interpreter
    workdir: str | None = None  # working directory inside the container
    binary: str | None = None  # the runtime executable; default per type (apptainer, ch-run ...)
    gpu: str = "none"  # none | nvidia | rocm: --nv/--rocm, CDI devices
    mount: str = "/opt"  # where dlhub is bound in the image (must exist there)
    dlhub: str = "bind"  # bind: the endpoint's dlhub is bound in; installed: the image has it

    def __post_init__(self):
        if self.type not in TYPES:
            raise ContainerError(f"container type {self.type!r} is not one of {', '.join(TYPES)}")
        if self.type != "none" and not self.image:
            raise ContainerError(f"container type {self.type!r} needs an image")
        if self.gpu not in GPU_KINDS:
            raise ContainerError(f"container gpu {self.gpu!r} is not one of {', '.join(GPU_KINDS)}")
        if self.dlhub not in DLHUB_MODES:
            raise ContainerError(f"container dlhub {self.dlhub!r} is not one of {', '.join(DLHUB_MODES)}")
        object.__setattr__(self, "options", tuple(self.options))
        object.__setattr__(self, "binds", tuple(self.binds))

    @property
    def enabled(self) -> bool:
        return self.type != "none"

    @property
    def executable(self) -> str:
        return self.binary or DEFAULT_BINARY.get(self.type, "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"], d["binds"] = list(self.options), list(self.binds)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ContainerSpec:
        data = dict(data or {})
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass(frozen=True)
class Launch:
    """What the pool runs for one worker: ``Popen(argv, env=env)``; ``name``: the container to
    remove (``rm -f``) when the worker is stopped (podman/docker), else None."""

    argv: list[str]
    env: dict[str, str]
    name: str | None = None
    runtime: str = "none"
    binary: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---- the bundle: dlhub as the image sees it ------------------------------------------------------


def prepare_bundle(dest: str | os.PathLike) -> Path:
    """Copy the installed, pure-Python ``dlhub`` package into ``dest/dlhub`` (the repository
    layout maps top-level folders to ``dlhub.*`` through an editable finder that an image cannot
    see, so the files are copied: about 1 MB), with the empty bind targets ``dest/site``,
    ``dest/cache`` and ``dest/data``. Replaced atomically; returns ``dest``."""
    import importlib

    dest = Path(dest)
    tmp = dest.with_name(f"{dest.name}.new.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "dlhub").mkdir(parents=True)
    for sub in BUNDLE_PACKAGES:
        try:
            mod = importlib.import_module(f"dlhub.{sub}")
        except ImportError:
            continue
        src = Path(mod.__file__).parent  # type: ignore[arg-type]
        shutil.copytree(
            src, tmp / "dlhub" / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
        )
    for d in (SITE_DIR, CACHE_DIR, DATA_DIR):
        (tmp / d).mkdir()
    old = dest.with_name(f"{dest.name}.old.{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def site_dirs() -> list[str]:
    """The site-packages of this interpreter's environment (purelib first), existing ones."""
    out: list[str] = []
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path and os.path.isdir(path) and path not in out:
            out.append(path)
    return out


def dlhub_binds(
    spec: ContainerSpec, bundle: str | None, cache: str | None, data: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """Binds and environment that make dlhub importable in the image (``dlhub: bind``), and the
    endpoint's data cache (``data``: inputs and outputs by reference) bound in, its path inside
    in ``DLHUB_DATA_CACHE`` (``<mount>/data``; with ``dlhub: installed`` the same path as on the
    host, which the runtime must be able to create)."""
    if spec.dlhub == "installed":
        if not data:
            return [], {}
        Path(data).mkdir(mode=0o700, parents=True, exist_ok=True)
        return [f"{data}:{data}"], {"DLHUB_DATA_CACHE": data}
    if not bundle:
        raise ContainerError("container dlhub: bind needs the endpoint's bundle folder (none was prepared)")
    mount = spec.mount.rstrip("/") or "/"
    binds = [f"{bundle}:{mount}"]
    sites = site_dirs()
    paths = [mount, REQUIREMENTS_DIR]
    if sites:  # one environment's site-packages at <mount>/site (platlib, if apart, is rare)
        binds.append(f"{sites[0]}:{mount}/{SITE_DIR}")
        paths.append(f"{mount}/{SITE_DIR}")
    env = {"PYTHONPATH": ":".join(paths)}
    if cache:
        Path(cache).mkdir(mode=0o700, parents=True, exist_ok=True)
        binds.append(f"{cache}:{mount}/{CACHE_DIR}")
        env["DLHUB_SERVABLE_CACHE"] = f"{mount}/{CACHE_DIR}"
    if data:  # ch-run binds only onto folders that exist in the image: the bundle's data/
        Path(data).mkdir(mode=0o700, parents=True, exist_ok=True)
        binds.append(f"{data}:{mount}/{DATA_DIR}")
        env["DLHUB_DATA_CACHE"] = f"{mount}/{DATA_DIR}"
    return binds, env


# ---- per-runtime command lines -------------------------------------------------------------------


def _runtime_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in RUNTIME_HOST_VARS if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    if "USER" not in env:  # ch-run (and the shim) refuse to start without it
        import pwd

        try:
            env["USER"] = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            env["USER"] = str(os.getuid())
    env.update(extra or {})
    return env


def _which(spec: ContainerSpec, path: str | None = None) -> str:
    exe = spec.executable
    found = shutil.which(exe, path=path if path is not None else os.environ.get("PATH"))
    if not found:
        raise ContainerError(
            f"container runtime {spec.type!r}: executable {exe!r} not found on PATH "
            f"(install it, load its module in worker_init, or set container.binary)"
        )
    return found


def _clean(env: Mapping[str, str]) -> dict[str, str]:
    return {k: str(v) for k, v in env.items() if k not in HOST_ONLY_VARS}


def _check_binds(spec: ContainerSpec, binds: Sequence[str]) -> None:
    for bind in binds:
        host = bind.split(":", 1)[0]
        if not os.path.exists(host):
            raise ContainerError(
                f"container runtime {spec.type!r}: bind {bind!r}: {host} does not exist on this host"
            )


def _singularity(spec, cmd, env, binds, devices, name) -> Launch:
    """Through spython: the command its ``execute`` would run, which we Popen ourselves."""
    from spython.main import get_client

    client = get_client()
    client.quiet, client.debug = False, False  # get_client(quiet=) does not stick (recipe)
    argv = client._init_command("exec", None)
    if spec.gpu == "nvidia":
        argv += ["--nv"]
    elif spec.gpu == "rocm":
        argv += ["--rocm"]
    argv += client._generate_bind_list(list(binds))  # hosts checked before (no SystemExit)
    run_env = _runtime_env()
    prefix = "APPTAINERENV_" if spec.type == "apptainer" else "SINGULARITYENV_"
    options: list[str] = []
    for key, value in env.items():
        if "," in value:  # --env splits on commas: pass such values as <PREFIX>KEY
            run_env[prefix + key] = value
        else:
            options += ["--env", f"{key}={value}"]
    if spec.workdir:
        options += ["--pwd", spec.workdir]
    argv += options + list(spec.options) + [spec.image] + list(cmd)
    argv[0] = spec.executable  # spython hardcodes "singularity": apptainer (or container.binary)
    return Launch(argv, run_env, None, spec.type)


def _charliecloud(spec, cmd, env, binds, devices, name) -> Launch:
    argv = [spec.executable]
    for bind in binds:
        src, _, dst = bind.partition(":")
        argv.append(f"--bind={src}:{(dst or src).split(':')[0]}")  # ch-run has no :ro
    argv.append("--unset-env=*")  # nothing of the host's environment, only what is set here
    if os.path.isfile(os.path.join(spec.image, "ch", "environment")):
        argv.append("--set-env")  # the image's own IMAGE/ch/environment (PATH, LANG ...)
    elif "PATH" not in env:
        argv.append(f"--set-env=PATH={DEFAULT_PATH}")
    argv += [f"--set-env={k}={v}" for k, v in env.items()]
    if spec.workdir:
        argv.append(f"--cd={spec.workdir}")
    argv += list(spec.options) + [spec.image, "--"] + list(cmd)
    return Launch(argv, _runtime_env(), None, spec.type)


def _oci(spec, cmd, env, binds, devices, name) -> Launch:
    # --init: the worker is not PID 1, so the SIGTERM the run client forwards (pool stop, block
    # cancel) ends it; as PID 1 without a handler it would ignore SIGTERM until rm -f
    argv = [spec.executable, "run", "--rm", "-i", "--init", "--network=host"]
    if name:
        argv += ["--name", name]
    for bind in binds:
        src, _, dst = bind.partition(":")
        argv += ["-v", f"{src}:{dst or src}"]
    for k, v in env.items():
        argv += ["-e", f"{k}={v}"]
    if spec.workdir:
        argv += ["-w", spec.workdir]
    if spec.gpu == "nvidia":
        for dev in devices:  # CDI: the worker's own device(s)
            argv += ["--device", f"nvidia.com/gpu={dev}"]
        if not devices:
            argv += ["--device", "nvidia.com/gpu=all"]
    elif spec.gpu == "rocm":
        argv += ["--device", "/dev/kfd", "--device", "/dev/dri"]
    argv += list(spec.options) + [spec.image] + list(cmd)
    return Launch(argv, _runtime_env(), name, spec.type)


_BUILDERS = {
    "apptainer": _singularity,
    "singularity": _singularity,
    "charliecloud": _charliecloud,
    "podman": _oci,
    "docker": _oci,
}


def container_name(worker_id: str) -> str:
    """A podman/docker container name for a worker id (letters, digits, _ . -)."""
    import re

    return "dlhub-" + re.sub(r"[^A-Za-z0-9_.-]", "-", worker_id)[:200]


def worker_launch(
    spec: ContainerSpec,
    cmd: Sequence[str],
    env: Mapping[str, str],
    binds: Sequence[str] = (),
    devices: Sequence[str] = (),
    worker_id: str | None = None,
) -> Launch:
    """The argv and environment that run ``cmd`` (whose first item is the image's python) in
    ``spec``'s image with exactly ``env`` (plus the image's own), the config's binds and ``binds``,
    and the GPU ``devices`` of this worker. Raises :class:`ContainerError` (naming the runtime and
    executable) when the runtime cannot be found or a bind's host path is missing."""
    if not spec.enabled:
        return Launch(list(cmd), {**os.environ, **env}, None, "none")
    binary = _which(spec)
    all_binds = [*spec.binds, *binds]
    _check_binds(spec, all_binds)
    name = container_name(worker_id) if worker_id and spec.type in ("podman", "docker") else None
    launch = _BUILDERS[spec.type](spec, list(cmd), _clean(env), all_binds, list(devices), name)
    return Launch(launch.argv, launch.env, launch.name, spec.type, binary)


def remove_container(spec: ContainerSpec, name: str | None, timeout: float = 30.0) -> None:
    """``podman|docker rm -f NAME``: killing the ``run`` client leaves the container running."""
    if not name or spec.type not in ("podman", "docker"):
        return
    import subprocess

    try:
        subprocess.run(
            [spec.executable, "rm", "-f", "--time", "2", name]
            if spec.type == "podman"
            else [spec.executable, "rm", "-f", name],
            env=_runtime_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        pass


def worker_env(worker_id: str, accelerator: str | None, dlhub_env: Mapping[str, str]) -> dict[str, str]:
    """The environment a containerized worker gets, explicitly: its id, its device, the dlhub
    paths, and the ``DLHUB_*`` variables of the pool's environment (not the rest of it)."""
    # DLHUB_SERVABLE_CACHE names a host folder: the image gets its own (dlhub_binds) or none
    env = {k: v for k, v in os.environ.items() if k.startswith("DLHUB_") and k != "DLHUB_SERVABLE_CACHE"}
    env["DLHUB_WORKER_ID"] = worker_id
    if accelerator is not None:
        for var in ACCELERATOR_VARS:
            env[var] = accelerator
    else:
        for var in ACCELERATOR_VARS:
            if var in os.environ:
                env[var] = os.environ[var]
    env.update(dlhub_env)
    return env


PROBE = r"""
import json, sys
out = {"python": "%d.%d.%d" % sys.version_info[:3], "executable": sys.executable}
try:
    import dill
    out["dill"] = dill.__version__
except Exception as exc:
    out["dill_error"] = "%s: %s" % (type(exc).__name__, exc)
try:
    import dlhub.endpoint.worker
    from importlib import metadata
    try:
        out["dlhub"] = metadata.version("dlhub")
    except Exception:
        out["dlhub"] = "source"
    out["dlhub_path"] = dlhub.endpoint.worker.__file__
except Exception as exc:
    out["dlhub_error"] = "%s: %s" % (type(exc).__name__, exc)
print("DLHUB-PROBE " + json.dumps(out))
"""


def probe_image(spec: ContainerSpec, bundle: str | None, timeout: float = 120.0) -> dict[str, Any]:
    """Run the image's Python through the runtime as a worker would be run, and report its
    Python, dill and dlhub versions (or why one cannot be imported)."""
    import json
    import subprocess

    dlhub_b, dlhub_e = dlhub_binds(spec, bundle, None)
    env = worker_env("probe", None, dlhub_e)
    launch = worker_launch(
        spec, [spec.python, "-c", PROBE], env, dlhub_b, worker_id="probe-" + str(os.getpid())
    )
    try:
        proc = subprocess.run(
            launch.argv,
            env=launch.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        remove_container(spec, launch.name)
    for line in proc.stdout.splitlines():
        if line.startswith("DLHUB-PROBE "):
            return json.loads(line[len("DLHUB-PROBE ") :])
    raise ContainerError(
        f"container runtime {spec.type!r}: the image's python {spec.python!r} did not run "
        f"(exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-1500:]}"
    )


def compare_versions(found: Mapping[str, Any], mine: Mapping[str, str]) -> list[str]:
    """What differs between the image (``probe_image``) and the endpoint (``runtime_versions``)."""
    problems = []
    theirs_py, mine_py = str(found.get("python", "")), str(mine.get("python", ""))
    if theirs_py.split(".")[:2] != mine_py.split(".")[:2]:
        problems.append(
            f"Python {theirs_py} in the image but {mine_py} at the endpoint: major.minor must match "
            "(functions travel as bytecode)"
        )
    if "dill_error" in found:
        problems.append(f"dill not importable in the image: {found['dill_error']}")
    elif found.get("dill") != mine.get("dill"):
        problems.append(f"dill {found.get('dill')} in the image but {mine.get('dill')} at the endpoint")
    if "dlhub_error" in found:
        problems.append(f"dlhub not importable in the image: {found['dlhub_error']}")
    elif mine.get("dlhub") and found.get("dlhub") not in (mine.get("dlhub"), "source"):
        problems.append(f"dlhub {found.get('dlhub')} in the image but {mine.get('dlhub')} at the endpoint")
    return problems


def check_pools(config: Any, timeout_s: float = 120.0, resolve: Any = None):
    """``dlhub-endpoint check``: for each pool with a container, run the image's Python through
    its runtime as a worker would be run and compare Python (major.minor), dill and dlhub with
    this endpoint's. ``resolve(spec) -> spec`` turns an image given as a URI into a local one
    (the CLI passes the endpoint's image cache: fetched as the pool would, so a bad URI fails the
    check and a good one is warm for the first block). Yields ``(ok, title, detail)``."""
    import tempfile
    from importlib import metadata

    from dlhub.protocol.serialize import runtime_versions

    mine = dict(runtime_versions())
    try:
        mine["dlhub"] = metadata.version("dlhub")
    except metadata.PackageNotFoundError:  # pragma: no cover - dlhub runs from an install
        pass
    for name, named in config.all_pools().items():
        raw = named.pool.container.model_dump()
        if raw.get("type", "none") == "none":
            continue
        spec = ContainerSpec.from_dict(raw)
        title = f"pool {name}: container {spec.type} {spec.image}"
        with tempfile.TemporaryDirectory(prefix="dlhub-check-bundle-") as tmp:
            try:
                if resolve is not None:
                    spec = resolve(spec)
                bundle = str(prepare_bundle(Path(tmp) / "bundle")) if spec.dlhub == "bind" else None
                found = probe_image(spec, bundle, timeout_s)
            except (ContainerError, OSError) as exc:
                yield False, title, str(exc)
                continue
        problems = compare_versions(found, mine)
        summary = (
            f"Python {found.get('python')}, dill {found.get('dill', '-')}, dlhub {found.get('dlhub', '-')}"
            f" in the image ({found.get('executable')}); the endpoint: Python {mine['python']}, "
            f"dill {mine['dill']}, dlhub {mine.get('dlhub', '-')}"
        )
        yield not problems, title, "\n".join([summary, *problems])
