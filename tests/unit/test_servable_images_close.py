"""The endpoint's servable-image fetch thread (``ServableImages.image_io``, started by the first
fetch) ends when the endpoint stops: ``ServableImages.close`` lets the fetch running now finish
and takes no more. Before, the thread was left waiting for jobs for the life of the process."""

from __future__ import annotations

import threading

from dlhub.endpoint.config import parse_config
from dlhub.endpoint.servable_images import ServableImages


def test_close_ends_the_fetch_thread_after_its_running_fetch(tmp_path):
    config = parse_config({"name": "ep", "manager": {"address": "tcp://127.0.0.1:1", "token": "t"}})
    images = ServableImages(config, tmp_path)
    images.close()  # no fetch ever ran: nothing to stop, no error
    assert images.image_io is None

    started, release = threading.Event(), threading.Event()

    def slow_pull() -> str:
        started.set()
        release.wait(10)
        return "pulled"

    from dlhub.endpoint.offloop import OffLoop

    images.image_io = OffLoop("dlhub-image-fetch")  # as _fetch_image starts it
    images.image_io.submit("docker://example/img", slow_pull)
    assert started.wait(10)
    images.close()
    images.image_io.submit("docker://example/other", lambda: "never")  # after close: not run
    release.set()
    images.image_io._thread.join(10)
    assert not images.image_io._thread.is_alive()
    outcomes = images.image_io.outcomes()
    assert [(o.key, o.value) for o in outcomes] == [("docker://example/img", "pulled")]
