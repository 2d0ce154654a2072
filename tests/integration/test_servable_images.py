"""Images per servable, for real: a servable names its container (``site:NAME`` through the
endpoint's ``images:`` catalogue, an image URI or a path); an endpoint whose Charliecloud pool
runs that image verifies it and runs its calls inside (the marker file ``/dlhub-test-image``
exists only in the image); a container this endpoint cannot provide (no catalogue entry, a
missing image file, a registry URI where pulls are off, an image no pool runs) fails the
servable's verification with the reason, so it never becomes ``ready``.

Images are built by ``scripts/build-test-image.sh`` (the ``image`` fixture of
test_container_pools); with ``DLHUB_REQUIRE_CONTAINERS=1`` a missing ch-run FAILS, not skips."""

from __future__ import annotations

import uuid

import pytest
from test_container_pools import TIMEOUT_S, endpoint_config, image  # noqa: F401  (image: a fixture)

from dlhub.executor import Client, PublishError, Servable


def inside(x):
    import os
    import sys

    return {"x": x, "marker": os.path.exists("/dlhub-test-image"), "python": sys.version_info[:2]}


def meta(name: str, container: str, examples=()) -> dict:
    return {
        "name": name,
        "title": "runs in its image",
        "authors": ["Doe, Jane"],
        "container": container,
        "examples": list(examples),
    }


def test_a_servable_runs_in_its_image_and_one_whose_image_is_missing_never_becomes_ready(
    custom_stack_factory,
    image,  # noqa: F811
    tmp_path,
):
    endpoint = {
        **endpoint_config({"type": "charliecloud", "image": image}),
        "images": {
            "site:test-image": image,
            "site:gone": str(tmp_path / "no-such-image"),
        },
        "image_cache": {"allow_pull": False},
    }
    cs = custom_stack_factory(endpoint=endpoint, name="imgpool", workers=2)
    ex = cs.executor()
    tag = uuid.uuid4().hex[:6]
    with Client(cs.manager.api.url, cs.token, home=str(cs.home)) as client:
        # the catalogue maps site:test-image to the pool's image: verified and run inside it
        ok = client.publish(Servable.from_function(inside, **meta(f"ok-{tag}", "site:test-image")))
        described = client.describe(ok)
        assert described["status"] == "ready" and described["record"]["container"] == "site:test-image"
        out = ex.submit(ok, 3).result(TIMEOUT_S)
        assert out["x"] == 3 and out["marker"], out

        cases = {
            "site:nowhere": "no such image in this endpoint's images: catalogue",
            "site:gone": "no such file or directory",
            "docker://python:3.11-slim": "does not pull images (image_cache.allow_pull: false)",
            str(tmp_path): "no pool runs this image",  # exists, but is not the pool's image
        }
        for i, (container, reason) in enumerate(cases.items()):
            name = f"bad{i}-{tag}"
            with pytest.raises(PublishError) as failed:
                client.publish(Servable.from_function(inside, **meta(name, container, [((1,), None)])))
            assert reason in str(failed.value), (container, str(failed.value))
            info = client.describe(failed.value.ref)
            assert info["status"] == "failed" and reason in info["error"], info
            assert info["record"]["container"] == container
    # the failures never reached a worker: the pool's workers ran only the good calls
    assert ex.submit(ok, 4).result(TIMEOUT_S)["x"] == 4
