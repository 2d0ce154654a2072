"""Images the endpoint builds from a servable's requirements: ``build://KEY`` in the image cache.

Split out of ``images.py`` (the cache: entries, budget, eviction, pulls, locks), which builds an
image through :class:`ImageBuilds`, the build half of :class:`~dlhub.endpoint.images.ImageCache`;
what is built, how and with which recipe lives here.

A :class:`BuildSpec` (``build_spec_for`` makes one from the endpoint config) is registered in the
cache as ``builds/KEY.json`` by :meth:`ImageBuilds.register_build` (KEY = sha256 of the recipe
version, runtime, base image and sorted requirements); the cache's ``get`` of ``build://KEY``
builds it under the entry's lock. The host's own pip (``python -m pip wheel``: the endpoint
environment's pip config, indexes, proxy and CA apply) fetches wheels of the requirements into a
build context, with that pip itself zipped (``tools/pip-VERSION.zip``); spython's recipe writer
writes the recipe (:func:`write_recipe`: ``DockerWriter`` -> ``Dockerfile``,
``SingularityWriter`` -> ``image.def``) that installs them with ``pip install --no-index --target
/dlhub/requirements`` (``containers.REQUIREMENTS_DIR``, first on a worker's PYTHONPATH after
dlhub) FROM the configured base; the runtime's own builder builds it with no network:
``podman|docker build --network=none -t localhost/dlhub-build:KEY16 -f Dockerfile CONTEXT``
(the entry records the image id; eviction runs ``rmi``), ``apptainer|singularity build
DEST.sif image.def`` (the line spython's ``Client.build`` runs, argv[0] replaced as for
``exec``). Charliecloud: no builder here (``ch-image`` comes with ``charliecloud-builders``);
the config refuses ``image_cache.build`` with it. A failed ``pip wheel`` (an unknown package, no
index) or build raises :class:`ContainerError` with the command's last lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .containers import REQUIREMENTS_DIR, ContainerError, _runtime_env
from .image_refs import _SCHEME, BUILD_SCHEME, OCI

BUILDERS = ("apptainer", "singularity", "podman", "docker")  # runtimes dlhub builds images with
RECIPE_VERSION = 1  # part of a build's key: a changed recipe builds again
BUILD_TIMEOUT_S = 1800.0
BUILD_DIR = "/dlhub-build"  # the build context inside the image while it builds (removed after)


@dataclass(frozen=True)
class BuildSpec:
    """An image the endpoint builds: ``base`` with ``requirements`` installed, for ``runtime``.

    Its cache reference is ``build://KEY``, KEY the sha256 of (recipe version, runtime, base,
    sorted requirements): the same servable requirements on the same base give the same image,
    whoever asks and in whatever order they list them. ``python`` (the image's interpreter),
    ``options`` (extra builder options), ``pip_options`` (extra options of the host's ``pip
    wheel``) and ``timeout_s`` say how to build it and are not part of the key."""

    runtime: str
    base: str
    requirements: tuple[str, ...]
    python: str = "python3"
    options: tuple[str, ...] = ()
    pip_options: tuple[str, ...] = ()
    timeout_s: float = BUILD_TIMEOUT_S

    def __post_init__(self):
        if self.runtime not in BUILDERS:
            raise ContainerError(
                "charliecloud cannot build images here: ch-image comes with charliecloud-builders "
                "(it needs docker.io and buildah, not installed); build with podman, docker, "
                "apptainer or singularity, or build elsewhere and name the image in images:"
                if self.runtime == "charliecloud"
                else f"image build: runtime {self.runtime!r} is not one of {', '.join(BUILDERS)}"
            )
        if not isinstance(self.base, str) or not self.base.strip():
            raise ContainerError(f"image build ({self.runtime}): no base image")
        reqs = sorted({r.strip() for r in self.requirements if r and r.strip()})
        if not reqs:
            raise ContainerError("image build: no requirements to install")
        for r in reqs:
            if "\n" in r or "\r" in r:
                raise ContainerError(f"image build: requirement {r!r} spans lines")
        object.__setattr__(self, "requirements", tuple(reqs))
        object.__setattr__(self, "options", tuple(self.options))
        object.__setattr__(self, "pip_options", tuple(self.pip_options))

    @property
    def key(self) -> str:
        data = json.dumps([RECIPE_VERSION, self.runtime, self.base.strip(), list(self.requirements)])
        return hashlib.sha256(data.encode()).hexdigest()

    @property
    def ref(self) -> str:
        return f"{BUILD_SCHEME}://{self.key}"

    @property
    def tag(self) -> str:
        """podman/docker: the name the built image gets in the runtime's store."""
        return f"localhost/dlhub-build:{self.key[:16]}"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def write_recipe(spec: BuildSpec, flavour: str, context: str | os.PathLike) -> str:
    """The recipe that builds ``spec``, written by spython's recipe writer from a ``Recipe``:
    ``flavour`` ``docker`` (``DockerWriter``: a Dockerfile, files relative to the context) or
    ``singularity`` (``SingularityWriter``: a definition file, files from ``context``). The
    requirements travel in ``requirements.txt`` (never on a shell line), installed from the
    context's ``wheels/`` with the endpoint's own pip, zipped (``pip.zip``: it runs from a zip as
    from its wheel, so the base needs only a Python), into ``REQUIREMENTS_DIR``; then the context
    is removed from the image."""
    import shlex

    from spython.main.parse.recipe import Recipe
    from spython.main.parse.writers import DockerWriter, SingularityWriter

    recipe = Recipe()
    base = spec.base.strip()
    recipe.fromHeader = base.removeprefix("docker://") if flavour == "docker" else base
    src = "" if flavour == "docker" else str(context).rstrip("/") + "/"
    recipe.files = [
        [f"{src}requirements.txt", f"{BUILD_DIR}/requirements.txt"],
        [f"{src}wheels", f"{BUILD_DIR}/wheels"],
        [f"{src}pip.zip", f"{BUILD_DIR}/pip.zip"],
    ]
    if flavour == "docker":  # the writers take labels in their parsers' own forms
        recipe.labels = [f"org.dlhub.build={spec.key}"]
    else:
        recipe.labels = [["org.dlhub.build", spec.key]]
    recipe.environ = [f"PYTHONPATH={REQUIREMENTS_DIR}"]  # for `dlhub: installed` (bind sets its own)
    py = shlex.quote(spec.python)
    recipe.install = [
        f"{py} {BUILD_DIR}/pip.zip/pip install --no-index --find-links {BUILD_DIR}/wheels "
        f"--target {REQUIREMENTS_DIR} --no-warn-script-location --disable-pip-version-check "
        f"--root-user-action=ignore -r {BUILD_DIR}/requirements.txt"
        f" && {py} -c 'import shutil; shutil.rmtree(\"{BUILD_DIR}\")'",
    ]
    if flavour != "docker":  # runscript/startscript: the image's python (not the writer's bash)
        recipe.entrypoint = py  # (a Dockerfile keeps its base's entrypoint: workers give argv)
    writer = (DockerWriter if flavour == "docker" else SingularityWriter)({"spython-base": recipe})
    text = writer.convert()
    if flavour != "docker":  # SingularityWriter always writes "Bootstrap: docker"
        text = text.replace(f"Bootstrap: docker\nFrom: {base}", _bootstrap(base), 1)
    return text + "\n"


def _bootstrap(base: str) -> str:
    """The header of a definition file for ``base``: a registry URI or a local image."""
    m = _SCHEME.match(base)
    if m is None:  # a local .sif or sandbox folder
        return f"Bootstrap: localimage\nFrom: {base}"
    scheme, rest = m.group(1), m.group(2)
    if scheme in ("docker", "oras", "library", "shub"):
        return f"Bootstrap: {scheme}\nFrom: {rest}"
    raise ContainerError(
        f"image build: base {base!r}: apptainer/singularity cannot start a build from {scheme}://"
    )


def build_spec_for(requirements: list[str], config: Any) -> BuildSpec:
    """The image this endpoint builds for a servable with ``requirements`` and no container:
    ``build.base`` for the default pool's runtime, the requirements installed (ContainerError
    says why not, e.g. charliecloud)."""
    container = next(iter(config.all_pools().values())).pool.container
    build = config.build
    return BuildSpec(
        runtime=container.type,
        base=build.base_for(container.type) or "",
        requirements=tuple(requirements),
        python=container.python,
        options=tuple(build.options),
        pip_options=tuple(build.pip_options),
        timeout_s=float(build.timeout_s),
    )


class ImageBuilds:
    """The building half of :class:`~dlhub.endpoint.images.ImageCache` (its base class): it uses
    the cache's ``root``, ``_exe``, ``_run`` and ``_flock``; the cache's ``_fetch`` calls
    :meth:`_build` under the entry's lock, into the entry's temp folder."""

    def register_build(self, spec: BuildSpec) -> str:
        """Record how to build ``spec`` (``builds/KEY.json``, written atomically) and return its
        reference ``build://KEY`` for :meth:`get`. Cheap: no build."""
        (self.root / "builds").mkdir(mode=0o700, exist_ok=True)
        path = self.root / "builds" / f"{spec.key}.json"
        data = json.dumps(spec.to_dict(), indent=1, sort_keys=True)
        try:
            if path.read_text() == data:
                return spec.ref
        except OSError:
            pass
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
        return spec.ref

    def build_spec(self, ref: str) -> BuildSpec:
        key = ref.partition("://")[2]
        try:
            data = json.loads((self.root / "builds" / f"{key}.json").read_text())
        except FileNotFoundError:
            raise ContainerError(f"image {ref!r}: no build recipe for it in {self.root / 'builds'}") from None
        except (OSError, ValueError) as exc:
            raise ContainerError(f"image {ref!r}: unreadable build recipe: {exc}") from None
        spec = BuildSpec.from_dict(data)
        if spec.key != key:
            raise ContainerError(f"image {ref!r}: its build recipe is for build://{spec.key}")
        return spec

    def _build(self, spec: BuildSpec, ref: str, tmp: Path) -> tuple[str, str | None]:
        """Build ``spec`` into ``tmp``: wheels on the host, then the runtime's builder."""
        exe = self._exe(spec.runtime)
        context = tmp / "context"
        (context / "wheels").mkdir(parents=True)
        (context / "requirements.txt").write_text("\n".join(spec.requirements) + "\n")
        what = f"{ref} ({'; '.join(spec.requirements)} on {spec.base}, {spec.runtime})"
        pip = [sys.executable, "-m", "pip"]
        self._run_build(
            [
                *pip,
                "wheel",
                "--wheel-dir",
                str(context / "wheels"),
                "--disable-pip-version-check",
                *spec.pip_options,
                "-r",
                str(context / "requirements.txt"),
            ],
            what,
            spec.timeout_s,
            "pip wheel (on the endpoint host)",
        )
        shutil.copy2(self._pip_zip(), context / "pip.zip")
        digest = None
        if spec.runtime in OCI:
            (context / "Dockerfile").write_text(write_recipe(spec, "docker", context))
            argv = [exe, "build", "--network=none", "-t", spec.tag, "-f", str(context / "Dockerfile")]
            self._run_build(
                [*argv, *spec.options, str(context)], what, spec.timeout_s, f"{spec.runtime} build"
            )
            out = self._run(spec.runtime, [exe, "image", "inspect", "--format", "{{.Id}}", spec.tag], ref)
            digest = (out.strip().splitlines() or [""])[0].strip()
            if not digest:
                raise ContainerError(f"image {what}: {spec.runtime} image inspect gave no image id")
            (tmp / "image.id").write_text(digest + "\n")
            name = "image.id"
        else:
            from spython.main import get_client

            (context / "image.def").write_text(write_recipe(spec, "singularity", context))
            client = get_client()
            client.quiet, client.debug = False, False
            argv = client._init_command("build", None)  # what spython's Client.build runs
            argv[0] = exe  # spython hardcodes "singularity"
            dest = tmp / "image.sif"
            argv += [*spec.options, str(dest), str(context / "image.def")]
            self._run_build(argv, what, spec.timeout_s, f"{spec.runtime} build", cwd=context)
            if not dest.exists():
                raise ContainerError(
                    f"image {what}: {spec.runtime} build reported success but wrote no image.sif"
                )
            name = "image.sif"
        # keep the recipe (small) for `dlhub-endpoint images`; the wheels go (the cache's
        # _fetch removes the context as soon as this returns)
        for keep in ("Dockerfile", "image.def", "requirements.txt"):
            if (context / keep).exists():
                os.replace(context / keep, tmp / f"recipe.{keep}")
        return name, digest

    def _pip_zip(self) -> Path:
        """The endpoint environment's own pip, zipped (``tools/pip-VERSION.zip``, made once): a
        build runs it as ``python3 pip.zip/pip`` (as pip runs from its wheel), so the base image
        needs only a Python and nothing is downloaded for it."""
        import zipfile

        try:
            import pip
        except ImportError:
            raise ContainerError("image build: pip is not installed in the endpoint's environment") from None
        src = Path(pip.__file__).parent
        (self.root / "tools").mkdir(mode=0o700, exist_ok=True)
        dest = self.root / "tools" / f"pip-{pip.__version__}.zip"
        if dest.is_file():
            return dest
        with self._flock(self.root / "locks" / "tools.lock"):
            if not dest.is_file():
                tmp = dest.with_name(f"{dest.name}.{os.getpid()}.{secrets.token_hex(4)}")
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                    for folder, dirs, files in os.walk(src):
                        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                        for name in sorted(files):
                            path = Path(folder) / name
                            z.write(path, Path("pip") / path.relative_to(src))
                os.replace(tmp, dest)
        return dest

    def _run_build(
        self, argv: list[str], what: str, timeout_s: float, step: str, cwd: Path | None = None
    ) -> None:
        """Run one build step; a failure raises ContainerError with its last output lines."""
        env = _runtime_env(os.environ)  # the host's own: pip config, proxy, CA, registry auth
        try:
            proc = subprocess.run(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise ContainerError(f"image {what}: {step} timed out after {timeout_s:.0f} s") from None
        except OSError as exc:
            raise ContainerError(f"image {what}: {step}: cannot run {argv[0]}: {exc}") from None
        if proc.returncode != 0:
            lines = [ln for ln in proc.stdout.splitlines() if ln.strip()][-12:]
            raise ContainerError(
                f"image {what}: {step} failed (exit {proc.returncode}): " + "\n".join(lines)[-2000:]
            )
