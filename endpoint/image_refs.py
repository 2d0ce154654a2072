"""Image references: the forms a container image is named by, and what a servable's names for one resolve to.

Split out of ``images.py`` (the cache) so the cache, the image builder (``image_build.py``) and
the endpoint's checks of servables all read references one way, and so these checks, which run
on the event loop when a package arrives, need nothing of the cache's machinery.

A reference is a local path (no ``scheme://``: :func:`is_local`, used as is), a registry URI
(``REGISTRY_SCHEMES``), an offline ``file://`` or ``dir://`` one (``LOCAL_SCHEMES``) or
``build://KEY``, an image the endpoint builds (``BUILD_SCHEME``); :func:`entry_key` is a cached
image's key (sha256 of ``runtime NUL ref``). ``OCI`` runtimes keep images in their own store
(podman, docker), ``SIF`` ones run files and folders (apptainer, singularity).

:func:`servable_image` resolves the ``container`` a servable's record names (a ``site:NAME`` of
the endpoint's ``images:`` catalogue, an image reference or a path) to the image its workers run
in, or says why this endpoint cannot run it, with no I/O beyond a stat.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

REGISTRY_SCHEMES = ("docker", "oras", "library", "shub", "https")
LOCAL_SCHEMES = ("file", "dir")
BUILD_SCHEME = "build"
OCI = ("podman", "docker")
SIF = ("apptainer", "singularity")
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$")


def entry_key(ref: str, runtime: str) -> str:
    return hashlib.sha256(f"{runtime}\0{ref}".encode()).hexdigest()


def is_local(ref: str) -> bool:
    """A plain path (no ``scheme://``): used as is."""
    return _SCHEME.match(ref) is None


def servable_image_problem(container: str, config: Any) -> str | None:
    """Why this endpoint cannot run a servable whose record names ``container`` (None: it can);
    see :func:`servable_image`."""
    return servable_image(container, config)[1]


def servable_image(container: str, config: Any) -> tuple[str | None, str | None]:
    """``(image, problem)`` for a servable whose record names ``container``.

    The container resolves through the site catalogue (``images:`` in the endpoint YAML) or is
    itself an image reference; a registry URI needs ``image_cache.allow_pull``; a local image
    must exist (a Charliecloud directory image must look like a root file system). ``image`` is
    what the servable's workers run in: None when it is the default pool's own image (its calls
    go to the pool's workers as they are), else the resolved reference, for which the endpoint
    starts workers on demand (``StartWorker``) with the default pool's runtime. Cheap (no pull):
    it runs on the endpoint's event loop when a package arrives."""
    catalogue = dict(getattr(config, "images", {}) or {})
    target = catalogue.get(container)
    if target is None:
        if container.startswith("site:"):
            known = ", ".join(sorted(catalogue)) or "none"
            return None, (
                f"container {container!r}: no such image in this endpoint's images: catalogue "
                f"(known: {known})"
            )
        target = container
    where = f"container {container!r}" + (f" (-> {target})" if target != container else "")
    pools = config.all_pools()
    default = next(iter(pools.values())).pool.container
    if default.type == "none":
        return None, f"{where}: this endpoint runs no container runtime (pool.container.type: none)"
    m = _SCHEME.match(target)
    scheme = m.group(1) if m else None
    if scheme in REGISTRY_SCHEMES and not config.image_cache.allow_pull:
        return None, f"{where}: this endpoint does not pull images (image_cache.allow_pull: false)"
    if scheme is None or scheme in LOCAL_SCHEMES:
        path = target if scheme is None else m.group(2)
        if not os.path.exists(path) and default.type not in OCI:
            return None, f"{where}: image not found ({path}: no such file or directory)"
        if (
            scheme is None
            and default.type == "charliecloud"
            and os.path.isdir(path)
            and not any(os.path.isdir(os.path.join(path, d)) for d in ("bin", "usr/bin"))
        ):
            return None, f"{where}: {path} is not a Charliecloud image (no bin/ or usr/bin/ in it)"
    if target == default.image or container == default.image:
        return None, None
    return target, None
