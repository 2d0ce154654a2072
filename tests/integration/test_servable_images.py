"""Images per servable, for real: a servable names its container (``site:NAME`` through the
endpoint's ``images:`` catalogue, an image URI or a path); an endpoint whose Charliecloud pool
runs that image verifies it and runs its calls inside (the marker file ``/dlhub-test-image``
exists only in the image); a container this endpoint cannot provide (no catalogue entry, a
missing image file, a registry URI where pulls are off, a directory that is no image, an image
whose workers die as they start) fails the servable's verification with the reason, so it never
becomes ``ready``.

Servables in images other than the pool's own get workers started inside their image on demand
(two copies of the test image, each with its own ``/dlhub-image-name``), within the pool's two
workers: calls interleaved between them each run in their own image, and a third image retires
the least recently used image's worker.

Images built by the endpoint from a servable's requirements, with podman for real: an endpoint
with ``image_cache.build: true`` verifies a servable that has requirements and no container by
building an image FROM ``build.base`` (the test image, imported) with them installed (the host's
pip fetches wheels, spython's DockerWriter writes the Dockerfile, ``podman build --network=none``
builds it), and its calls run on workers inside that image: a package the host's environment
lacks imports there at its version, and one the host has at another version shadows the host's.
The same requirements in another order reuse the image (one build); a requirement no index has
fails the verification with pip's reason. Offline on purpose, as an air-gapped site builds: the
wheels come from a wheelhouse made here (``build.pip_options: [--no-index, --find-links DIR]``).

Images are built by ``scripts/build-test-image.sh`` (the ``image`` fixture of
test_container_pools); with ``DLHUB_REQUIRE_CONTAINERS=1`` a missing ch-run FAILS, not skips."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import uuid

import pytest
from buildwheel import make_wheel
from conftest import wait_until
from test_container_pools import (  # noqa: F401  (image, podman_image, shim_path: fixtures)
    TIMEOUT_S,
    endpoint_config,
    image,
    podman_containers,
    podman_image,
    shim_path,
)

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
    broken = tmp_path / "broken"
    (broken / "bin").mkdir(parents=True)
    endpoint = {
        **endpoint_config({"type": "charliecloud", "image": image}),
        "images": {
            "site:test-image": image,
            "site:gone": str(tmp_path / "no-such-image"),
            "site:broken": str(broken),  # looks like a root file system; has no python3
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
            str(tmp_path): "is not a Charliecloud image",  # exists, but is no root file system
            "site:broken": "workers inside it exit as they start",  # ImageFailed from the pool
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


def which_image(x):
    import os

    try:
        with open("/dlhub-image-name") as f:
            name = f.read().strip()
    except OSError:
        name = None
    return {"x": x, "image": name, "marker": os.path.exists("/dlhub-test-image")}


def copy_image(source: str, dest, name: str) -> str:
    """A copy of the test image (hard links: instant) that says its name in /dlhub-image-name."""
    dest = str(dest)
    if subprocess.run(["cp", "-al", source, dest], capture_output=True).returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest, symlinks=True)
    with open(os.path.join(dest, "dlhub-image-name"), "w") as f:
        f.write(name)
    return dest


def test_workers_start_in_each_servables_image_on_demand_and_the_lru_image_makes_room(
    custom_stack_factory,
    image,  # noqa: F811
    tmp_path,
):
    images = {k: copy_image(image, tmp_path / f"img-{k}", k) for k in "abc"}
    endpoint = {
        **endpoint_config({"type": "charliecloud", "image": image}),
        "images": {f"site:{k}": path for k, path in images.items()},
        "image_cache": {"allow_pull": False},
    }
    cs = custom_stack_factory(endpoint=endpoint, name="imgswap", workers=2)
    ex = cs.executor()
    tag = uuid.uuid4().hex[:6]
    with Client(cs.manager.api.url, cs.token, home=str(cs.home)) as client:
        refs = {
            k: client.publish(
                Servable.from_function(
                    which_image,
                    **meta(f"{k}-{tag}", f"site:{k}", [((1,), {"x": 1, "image": k, "marker": True})]),
                )
            )
            for k in "ab"
        }
        # verification already ran each inside its image (a worker started there for it)
        assert all(client.describe(r)["status"] == "ready" for r in refs.values())
        # interleaved calls, each in its own image; a bare call in the pool's own image
        futures = [(k, i, ex.submit(refs[k], i)) for i in range(6) for k in "ab"]
        for k, i, fut in futures:
            out = fut.result(TIMEOUT_S)
            assert out == {"x": i, "image": k, "marker": True}, (k, out)
        wait_until(
            lambda: cs.status().get("image_workers") == {images["a"]: 1, images["b"]: 1},
            10,
            what="one worker in each image",
        )
        bare = ex.submit(which_image, 5).result(TIMEOUT_S)
        assert bare == {"x": 5, "image": None, "marker": True}
        # a warm image's call starts nothing; a third image retires the LRU one (a, used first)
        assert ex.submit(refs["b"], 7).result(TIMEOUT_S)["image"] == "b"
        starts = cs.status()["image_starts"]
        refs["c"] = client.publish(
            Servable.from_function(
                which_image, **meta(f"c-{tag}", "site:c", [((1,), {"x": 1, "image": "c", "marker": True})])
            )
        )
        assert ex.submit(refs["c"], 8).result(TIMEOUT_S) == {"x": 8, "image": "c", "marker": True}
        wait_until(lambda: images["c"] in cs.status().get("image_workers", {}), 10, what="a worker in c")
        status = cs.status()
        assert images["a"] not in status["image_workers"], status  # a was used longest ago
        assert status["workers"] <= 2 and status["image_starts"] > starts, status
        # a, retired, comes back on demand, still only inside its own image
        assert ex.submit(refs["a"], 9).result(TIMEOUT_S) == {"x": 9, "image": "a", "marker": True}


def test_an_image_uri_is_pulled_into_the_cache_at_verification_and_a_failed_pull_fails_it(
    custom_stack_factory,
    image,  # noqa: F811
    tmp_path,
):
    """``dir://`` and ``file://`` go through the image cache like a registry pull (offline): the
    servable's image is fetched when it is verified, so its first call finds it there; a fetch
    that fails (a tarball tar cannot unpack) fails the verification with the reason."""
    from dlhub.endpoint.images import ImageCache

    source = copy_image(image, tmp_path / "img-d", "d")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is no tarball" * 100)
    endpoint = {
        **endpoint_config({"type": "charliecloud", "image": image}, workers=1),
        "images": {"site:d": f"dir://{source}"},  # a record names no dir:// itself
        "image_cache": {"allow_pull": True},
    }
    cs = custom_stack_factory(endpoint=endpoint, name="imgpull", workers=1)
    ex = cs.executor()
    tag = uuid.uuid4().hex[:6]
    uri = f"dir://{source}"
    with Client(cs.manager.api.url, cs.token, home=str(cs.home)) as client:
        ref = client.publish(
            Servable.from_function(
                which_image, **meta(f"d-{tag}", "site:d", [((1,), {"x": 1, "image": "d", "marker": True})])
            )
        )
        cache = ImageCache(cs.endpoint_dir / "images", 10**10)
        (entry,) = [e for e in cache.entries() if e.ref == uri]
        assert ex.submit(ref, 2).result(TIMEOUT_S) == {"x": 2, "image": "d", "marker": True}
        with pytest.raises(PublishError) as failed:
            client.publish(
                Servable.from_function(which_image, **meta(f"j-{tag}", f"file://{junk}", [((1,), None)]))
            )
        assert "pull failed" in str(failed.value) and "cannot unpack" in str(failed.value), str(failed.value)
        assert client.describe(failed.value.ref)["status"] == "failed"
    assert [e.ref for e in cache.entries()] == [uri]  # the first fetch only; nothing left of the junk


def test_podman_workers_start_in_a_servables_image_and_no_replaced_container_is_left(
    podman_image,  # noqa: F811
    image,  # noqa: F811
    custom_stack_factory,
    monkeypatch,
    tmp_path,
):
    """The same with podman, for real: a servable in a second imported image gets a worker
    (a container) started in it on demand; the replaced worker's container is removed."""
    for k, v in podman_image.items():
        monkeypatch.setenv(k, v)
    source = copy_image(image, tmp_path / "img-p", "p")
    tar = subprocess.Popen(["tar", "-C", source, "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        ["podman", "import", "-q", "-", "localhost/dlhub-img-p"],
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        timeout=120,
    )
    tar.wait()
    assert imported.returncode == 0, imported.stderr
    endpoint = {
        **endpoint_config({"type": "podman", "image": "localhost/dlhub-test-image"}),
        "images": {"site:p": "localhost/dlhub-img-p"},
    }
    cs = custom_stack_factory(endpoint=endpoint, name="imgpodman", workers=2)
    ex = cs.executor()
    tag = uuid.uuid4().hex[:6]
    with Client(cs.manager.api.url, cs.token, home=str(cs.home)) as client:
        ref = client.publish(
            Servable.from_function(
                which_image, **meta(f"p-{tag}", "site:p", [((1,), {"x": 1, "image": "p", "marker": True})])
            )
        )
    futures = [(ex.submit(ref, i), ex.submit(which_image, i)) for i in range(4)]
    for i, (in_p, bare) in enumerate(futures):
        assert in_p.result(TIMEOUT_S) == {"x": i, "image": "p", "marker": True}
        assert bare.result(TIMEOUT_S) == {"x": i, "image": None, "marker": True}
    wait_until(lambda: len(podman_containers(podman_image)) == 2, 30, what="one container per worker")


PROBE_VERSION = "1.2.3"
SHADOW = "texttable"  # in the endpoint's environment (another version); dlhub never imports it


def probe(x):
    import os

    import dlhub_probe_pkg
    import texttable

    return {
        "x": x,
        "probe": dlhub_probe_pkg.VERSION,
        "probe_file": dlhub_probe_pkg.__file__,
        "shadow": texttable.__version__,
        "marker": os.path.exists("/dlhub-test-image"),
    }


def build_meta(name: str, requirements: list[str], examples=()) -> dict:
    return {
        "name": name,
        "title": "runs in an image built from its requirements",
        "authors": ["Doe, Jane"],
        "requirements": requirements,
        "examples": list(examples),
    }


def test_a_servable_runs_in_an_image_built_from_its_requirements(
    podman_image,  # noqa: F811
    custom_stack_factory,
    monkeypatch,
    tmp_path,
):
    assert importlib.util.find_spec("dlhub_probe_pkg") is None  # not in the endpoint's environment
    host_shadow = importlib.metadata.version(SHADOW)
    shadow_version = "0.0.1.dev7"
    assert host_shadow != shadow_version
    wheels = tmp_path / "wheelhouse"
    make_wheel(wheels, "dlhub_probe_pkg", PROBE_VERSION, f"VERSION = {PROBE_VERSION!r}\n")
    make_wheel(wheels, SHADOW, shadow_version, f"__version__ = {shadow_version!r}\n")
    for k, v in podman_image.items():
        monkeypatch.setenv(k, v)
    endpoint = {
        **endpoint_config({"type": "podman", "image": "localhost/dlhub-test-image"}),
        "image_cache": {"build": True},
        "build": {
            "base": {"podman": "localhost/dlhub-test-image"},
            "pip_options": ["--no-index", "--find-links", str(wheels)],
        },
    }
    cs = custom_stack_factory(endpoint=endpoint, name="build", workers=2)
    ex = cs.executor()
    tag = uuid.uuid4().hex[:6]
    requirements = [f"dlhub_probe_pkg=={PROBE_VERSION}", f"{SHADOW}=={shadow_version}"]
    inside = {
        "probe": PROBE_VERSION,
        "probe_file": "/dlhub/requirements/dlhub_probe_pkg.py",  # installed in the image
        "shadow": shadow_version,  # the requirement's version, not the endpoint's
        "marker": True,  # in the test image (the base)
    }
    with Client(cs.manager.api.url, cs.token, home=str(cs.home)) as client:
        # its example runs at verification, inside the image built for it
        example = [((1,), {"x": 1, **inside})]
        ref = client.publish(
            Servable.from_function(probe, **build_meta(f"built-{tag}", requirements, example))
        )
        assert client.describe(ref)["status"] == "ready"
        out = ex.submit(ref, 7).result(TIMEOUT_S)
        assert out == {"x": 7, **inside}, out
        # the same requirements in another order: the same image, built once
        again = client.publish(
            Servable.from_function(probe, **build_meta(f"again-{tag}", requirements[::-1]))
        )
        assert ex.submit(again, 8).result(TIMEOUT_S)["probe"] == PROBE_VERSION
        # a requirement no index has: verification fails with pip's reason, never ready
        with pytest.raises(PublishError) as failed:
            client.publish(
                Servable.from_function(
                    probe, **build_meta(f"bad-{tag}", ["dlhub-no-such-package==9"], [((1,), None)])
                )
            )
        reason = str(failed.value)
        assert (
            "build failed" in reason
            and "No matching distribution found for dlhub-no-such-package==9" in reason
        )
        assert client.describe(failed.value.ref)["status"] == "failed"
    index = json.loads((cs.endpoint_dir / "images" / "index.json").read_text())["entries"]
    built = [e for e in index.values() if e["ref"].startswith("build://")]
    assert len(built) == 1 and built[0]["runtime"] == "podman", index
    tagged = subprocess.run(
        [
            "podman",
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}}",
            "--filter",
            "reference=localhost/dlhub-build",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    assert len(tagged) == 1, tagged  # one image for both servables
    assert ex.submit(probe, 1).exception(TIMEOUT_S) is not None  # not in the pool's own image


def test_apptainer_builds_from_the_definition_file_spython_writes(
    custom_stack_factory,
    image,  # noqa: F811
    shim_path,  # noqa: F811
    tmp_path,
):
    """The same through dlhub's Apptainer path: ``apptainer build DEST.sif image.def`` (the line
    spython's build runs) reaches the recording wrapper and tests/bin's ch-run shim, which builds
    the definition file spython's SingularityWriter wrote (Bootstrap: localimage FROM the test
    image, %files, %post run with ``ch-run -w``); workers then ``apptainer exec`` the built image."""
    shadow_version = "0.0.1.dev7"
    wheels = tmp_path / "wheelhouse"
    make_wheel(wheels, "dlhub_probe_pkg", PROBE_VERSION, f"VERSION = {PROBE_VERSION!r}\n")
    make_wheel(wheels, SHADOW, shadow_version, f"__version__ = {shadow_version!r}\n")
    endpoint = {
        **endpoint_config({"type": "apptainer", "image": image}),
        "image_cache": {"build": True},
        "build": {"base": {"apptainer": image}, "pip_options": ["--no-index", "--find-links", str(wheels)]},
    }
    cs = custom_stack_factory(endpoint=endpoint, name="buildsif", workers=2)
    inside = {
        "probe": PROBE_VERSION,
        "probe_file": "/dlhub/requirements/dlhub_probe_pkg.py",
        "shadow": shadow_version,
        "marker": True,
    }
    requirements = [f"dlhub_probe_pkg=={PROBE_VERSION}", f"{SHADOW}=={shadow_version}"]
    with Client(cs.manager.api.url, cs.token, home=str(cs.home)) as client:
        ref = client.publish(
            Servable.from_function(
                probe, **build_meta(f"sif-{uuid.uuid4().hex[:6]}", requirements, [((1,), {"x": 1, **inside})])
            )
        )
    assert cs.executor().submit(ref, 5).result(TIMEOUT_S) == {"x": 5, **inside}
    calls = shim_path.read_text().splitlines()
    (build,) = [c.split() for c in calls if c.startswith("build ")]
    assert build[-1].endswith("/context/image.def") and build[-2].endswith("/image.sif"), build
    index = json.loads((cs.endpoint_dir / "images" / "index.json").read_text())["entries"]
    (key,) = [k for k, e in index.items() if e["ref"].startswith("build://")]
    sif = str(cs.endpoint_dir / "images" / "entries" / key / "image.sif")
    recipe = (cs.endpoint_dir / "images" / "entries" / key / "recipe.image.def").read_text()
    assert recipe.startswith(f"Bootstrap: localimage\nFrom: {image}\nStage: spython-base\n"), recipe
    assert any(c.startswith("exec ") and f" {sif} python3 " in c for c in calls), calls  # a worker in it
