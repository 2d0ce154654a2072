"""Servables' container images at the endpoint: checked when a package arrives, fetched off the loop.

    loop: Code / RequestCode found on disk --checks(blobs, now)--> ImageUnavailable / ServableImage
          an image to fetch --> OffLoop thread ``dlhub-image-fetch``: cache.image_for(image)
    loop (each turn) <--answers()-- ImageFetched(image, error)

A servable package that names a ``container`` (or, with ``image_cache.build``, only
``requirements``) is resolved to an image when it arrives, i.e. at verification, before its tasks
are queued: a container this endpoint cannot run fails the servable at once; an image to pull or
build is fetched into the image cache (:mod:`.images`, which does the fetching) so the first call
does not wait for it. Split from the daemon (``endpoint/daemon.py``), whose ``Endpoint`` owns one
``ServableImages`` and calls it only on its loop's thread; the fetch runs on its own
:class:`~.offloop.OffLoop` and comes back only as outcomes the loop collects.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dlhub.protocol import messages as m

from . import events as ev
from .config import EndpointConfig
from .offloop import OffLoop

log = logging.getLogger("dlhub.endpoint")


class ServableImages:
    """The image checks and fetches, owned by the Endpoint and used only on its loop's thread."""

    def __init__(self, config: EndpointConfig, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.image_io: OffLoop | None = None  # servables' image pulls (at verification)
        self._images_fetched: dict[str, str | None] = {}  # image -> the fetch's error (None: ok)

    def checks(self, blobs: dict[str, bytes], now: float) -> list[ev.Event]:
        """ImageUnavailable for each servable package whose container this endpoint cannot run."""
        from dlhub.protocol.servable import PACKAGE_HEADER, unpack_package

        out: list[ev.Event] = []
        for function, blob in blobs.items():
            package = m.package_key(function)
            if package is None or not blob or blob[0] != PACKAGE_HEADER:
                continue
            try:
                record = unpack_package(blob)[0]
            except Exception:  # a bad package fails its tasks at the worker, with the reason
                continue
            container = record.container
            build = container is None and record.requirements and self.config.image_cache.build
            if container is not None or build:
                from .images import is_local, servable_build, servable_image

                if build:  # an image built from its requirements (image_cache.build): build://KEY
                    image, problem = servable_build(record.requirements, self.config, self.run_dir)
                else:
                    image, problem = servable_image(container, self.config)
                if problem is not None:
                    log.warning("servable package %s: %s", package[:12], problem)
                    out.append(ev.ImageUnavailable(now, package, problem))
                elif image is not None:  # its calls run on workers started inside this image
                    fetching = not is_local(image) and self._fetch_image(image)
                    out.append(ev.ServableImage(now, package, image, fetching))
        return out

    def _fetch_image(self, image: str) -> bool:
        """Pull a servable's image into the endpoint's image cache off the loop, when it is
        verified (so its first call does not wait for a pull); True while that fetch runs. Its
        outcome comes back as ImageFetched (a failed pull fails the servable with the reason)."""
        if self._images_fetched.get(image) is None and image in self._images_fetched:
            return False  # fetched already (a failed one is tried again)
        if self.image_io is None:
            self.image_io = OffLoop("dlhub-image-fetch")
        if not self.image_io.busy(image):
            from .images import cache_for

            runtime = next(iter(self.config.all_pools().values())).pool.container.type
            cache = cache_for(self.run_dir, self.config)
            log.info("fetching servable image %s into the image cache (%s)", image, runtime)
            self.image_io.submit(image, lambda: cache.image_for(image, runtime))
        return True

    def close(self) -> None:
        """The endpoint stops: the fetch thread ends after the fetch it runs now (not waited
        for; an image half-pulled is pulled again next time)."""
        if self.image_io is not None:
            self.image_io.close()

    def answers(self, events: list[ev.Event]) -> None:
        """Servable images fetched (or not) since the last look: ImageFetched events, appended to
        the loop's ``events`` (each turn: nothing is made when no fetch ever ran)."""
        if self.image_io is None:
            return
        for outcome in self.image_io.outcomes():
            error = None
            if outcome.error is not None:
                failed = "build failed" if outcome.key.startswith("build://") else "pull failed"
                error = f"image {outcome.key}: {failed}: {outcome.error}"
                log.warning("%s", error)
            else:
                log.info("servable image %s fetched in %.1f s", outcome.key, outcome.seconds)
            self._images_fetched[outcome.key] = error
            events.append(ev.ImageFetched(time.monotonic(), outcome.key, error))
