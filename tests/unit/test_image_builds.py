"""Images the endpoint builds from a servable's requirements (endpoint/images.py, BuildSpec):
the key (runtime, base, sorted requirements), the recipes spython's writers write (Dockerfile,
Singularity/Apptainer definition file), the builders' command lines (recorded by fake runtime
executables on PATH; the host's pip runs for real, offline, from a wheel made here), a build
asked for by two threads at once done once, a warm cache building nothing, a failed build's
reason, and the config keys (image_cache.build, build.*). podman builds for real in
tests/integration/test_servable_images.py."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from pathlib import Path

import pytest
from buildwheel import make_wheel

from dlhub.endpoint.config import ConfigError, parse_config
from dlhub.endpoint.containers import ContainerError
from dlhub.endpoint.images import (
    BuildSpec,
    ImageCache,
    build_spec_for,
    cache_for,
    servable_build,
    write_recipe,
)

# Records argv, cwd and the recipe it was given, then acts like the builder: podman/docker
# `build ... -f Dockerfile CTX` prints steps and an id ($FAKE_BUILD_FAIL: 20 lines, exit 1),
# `image inspect` answers an id or a size; apptainer/singularity `build DEST DEF` writes DEST.
FAKE = """#!{py}
import json, os, sys, time
args = sys.argv[1:]
if args[:1] == ["--version"]:
    print("apptainer version 1.3.4"); sys.exit(0)
rec = {{"argv": [os.path.basename(sys.argv[0])] + args, "cwd": os.getcwd()}}
if args[:1] == ["build"]:
    recipe = args[args.index("-f") + 1] if "-f" in args else args[-1]
    rec["recipe"] = open(recipe).read()
    ctx = args[-1] if "-f" in args else os.path.dirname(recipe)
    rec["context"] = sorted(os.listdir(ctx))
    rec["wheels"] = sorted(os.listdir(os.path.join(ctx, "wheels")))
    rec["requirements"] = open(os.path.join(ctx, "requirements.txt")).read()
with open({rec_path!r}, "a") as f:
    f.write(json.dumps(rec) + "\\n")
if args[:1] == ["build"]:
    time.sleep(float(os.environ.get("FAKE_BUILD_S", "0")))
    if os.environ.get("FAKE_BUILD_FAIL"):
        for i in range(20):
            print("STEP line %d" % i)
        print("ERROR: No matching distribution found for nothing-here", file=sys.stderr)
        sys.exit(1)
    if "-f" in args:
        print("COMMIT"); print("sha256:" + "be" * 32)
    else:
        open(args[-2], "wb").write(b"SIF" * 100)
elif args[:2] == ["image", "inspect"]:
    print("4242" if "{{{{.Size}}}}" in args else "sha256:" + "be" * 32)
"""


@pytest.fixture
def builders(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rec = tmp_path / "calls.jsonl"
    for name in ("podman", "docker", "apptainer", "singularity"):
        p = bin_dir / name
        p.write_text(FAKE.format(py=sys.executable, rec_path=str(rec)))
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def calls():
        return [json.loads(line) for line in rec.read_text().splitlines()] if rec.exists() else []

    return calls


@pytest.fixture
def wheels(tmp_path) -> Path:
    """A wheelhouse with a package the endpoint's environment does not have (offline pip)."""
    folder = tmp_path / "wheelhouse"
    make_wheel(folder, "dlhub_probe_pkg", "1.2.3", "VERSION = '1.2.3'\n")
    return folder


def offline(wheels: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(wheels))


def test_the_key_is_runtime_base_and_sorted_requirements():
    a = BuildSpec("podman", "localhost/base", ("numpy>=1.20", "six", "six"))
    b = BuildSpec(
        "podman", " localhost/base", (" six", "numpy>=1.20"), python="/usr/bin/python3", options=("--x",)
    )
    assert a.requirements == ("numpy>=1.20", "six") and a.key == b.key  # order, dupes, how to build: same
    assert a.ref == f"build://{a.key}" and a.tag == f"localhost/dlhub-build:{a.key[:16]}"
    others = [
        BuildSpec("docker", "localhost/base", ("six", "numpy>=1.20")),
        BuildSpec("podman", "localhost/base2", ("six", "numpy>=1.20")),
        BuildSpec("podman", "localhost/base", ("six", "numpy>=1.21")),
    ]
    assert len({a.key, *(o.key for o in others)}) == 4
    assert BuildSpec.from_dict(json.loads(json.dumps(b.to_dict()))) == b


def test_charliecloud_and_empty_specs_are_clear_errors():
    with pytest.raises(ContainerError, match="charliecloud cannot build images here: ch-image comes with"):
        BuildSpec("charliecloud", "/img", ("six",))
    with pytest.raises(ContainerError, match="no base image"):
        BuildSpec("podman", " ", ("six",))
    with pytest.raises(ContainerError, match="no requirements"):
        BuildSpec("podman", "b", (" ",))


def test_dockerfile_is_spythons_docker_writer_and_requirements_stay_off_shell_lines(tmp_path):
    reqs = ("scikit-learn>=1.0,<1.2; python_version >= '3'", "USERlib", "six")
    spec = BuildSpec("podman", "docker://python:3.11-slim", reqs)
    text = write_recipe(spec, "docker", tmp_path)
    assert text.splitlines() == [
        "FROM python:3.11-slim AS spython-base",
        "ADD requirements.txt /dlhub-build/requirements.txt",
        "ADD wheels /dlhub-build/wheels",
        "ADD pip.zip /dlhub-build/pip.zip",
        f"LABEL org.dlhub.build={spec.key}",
        "ENV PYTHONPATH=/dlhub/requirements",
        "RUN python3 /dlhub-build/pip.zip/pip install --no-index --find-links /dlhub-build/wheels "
        "--target /dlhub/requirements --no-warn-script-location --disable-pip-version-check "
        "--root-user-action=ignore -r /dlhub-build/requirements.txt && "
        "python3 -c 'import shutil; shutil.rmtree(\"/dlhub-build\")'",
    ]
    for req in reqs:  # a requirement's '<', ';' or "USER" (which the writer treats as a USER line)
        assert req not in text


@pytest.mark.parametrize(
    "base, header",
    [
        ("docker://python:3.11-slim", "Bootstrap: docker\nFrom: python:3.11-slim\n"),
        ("oras://ghcr.io/x/py:1", "Bootstrap: oras\nFrom: ghcr.io/x/py:1\n"),
        ("library://sylabs/py", "Bootstrap: library\nFrom: sylabs/py\n"),
        ("/sw/images/base.sif", "Bootstrap: localimage\nFrom: /sw/images/base.sif\n"),
    ],
)
def test_definition_file_is_spythons_singularity_writer(tmp_path, base, header):
    spec = BuildSpec("apptainer", base, ("six",), python="/usr/bin/python3")
    text = write_recipe(spec, "singularity", tmp_path / "ctx")
    assert text.startswith(header + "Stage: spython-base\n"), text
    sections = {}
    for block in text.split("\n%")[1:]:
        head, *body = block.splitlines()
        sections[head] = body
    assert sections["files"] == [
        f"{tmp_path}/ctx/requirements.txt /dlhub-build/requirements.txt",
        f"{tmp_path}/ctx/wheels /dlhub-build/wheels",
        f"{tmp_path}/ctx/pip.zip /dlhub-build/pip.zip",
    ]
    assert sections["labels"] == [f"org.dlhub.build {spec.key}"]
    assert sections["environment"] == ["export PYTHONPATH=/dlhub/requirements"]
    (post,) = sections["post"]
    assert post.startswith("/usr/bin/python3 /dlhub-build/pip.zip/pip install --no-index ")
    assert sections["runscript"] == sections["startscript"] == ['exec /usr/bin/python3 "$@"']
    with pytest.raises(ContainerError, match="cannot start a build from https://"):
        write_recipe(BuildSpec("apptainer", "https://x/y.sif", ("six",)), "singularity", tmp_path)


def test_podman_build_once_for_two_threads_then_warm_and_evicted_with_rmi(builders, wheels, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    spec = BuildSpec("podman", "localhost/base", ("dlhub_probe_pkg==1.2.3",), pip_options=offline(wheels))
    ref = cache.register_build(spec)
    os.environ["FAKE_BUILD_S"] = "0.5"
    try:
        got: list[str] = []
        threads = [
            threading.Thread(target=lambda: got.append(cache.image_for(ref, "podman"))) for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        del os.environ["FAKE_BUILD_S"]
    image_id = "sha256:" + "be" * 32
    assert got == [image_id, image_id]
    builds = [c for c in builders() if c["argv"][1] == "build"]
    assert len(builds) == 1 and cache.fetches == 1  # two threads, one build
    (build,) = builds
    ctx = build["argv"][-1]
    assert build["argv"] == [
        "podman",
        "build",
        "--network=none",
        "-t",
        spec.tag,
        "-f",
        f"{ctx}/Dockerfile",
        ctx,
    ]
    assert build["recipe"].startswith("FROM localhost/base AS spython-base\n")
    assert build["context"] == ["Dockerfile", "pip.zip", "requirements.txt", "wheels"]
    assert build["wheels"] == ["dlhub_probe_pkg-1.2.3-py3-none-any.whl"]  # by the host's pip, offline
    assert build["requirements"] == "dlhub_probe_pkg==1.2.3\n"
    (entry,) = cache.entries()
    assert entry.ref == ref and entry.digest == image_id and entry.size == 4242
    folder = cache.root / "entries" / entry.key
    assert sorted(os.listdir(folder)) == ["image.id", "recipe.Dockerfile", "recipe.requirements.txt"]
    assert not os.path.exists(ctx)  # the context (wheels) is not kept
    # warm: another process's cache (the pool's) builds nothing; the spec is on disk
    again = ImageCache(tmp_path / "cache")
    assert again.image_for(ref, "podman") == image_id and again.fetches == 0
    assert len([c for c in builders() if c["argv"][1] == "build"]) == 1
    cache.prune(everything=True)
    assert ["podman", "rmi", image_id] in [c["argv"] for c in builders()]
    # evicted, then asked for again (a pool starting a worker in it): built again from builds/KEY.json
    assert again.image_for(ref, "podman") == image_id
    assert len([c for c in builders() if c["argv"][1] == "build"]) == 2


def test_apptainer_build_is_the_line_spython_builds(builders, wheels, tmp_path):
    runtime = "apptainer"
    cache = ImageCache(tmp_path / "cache")
    spec = BuildSpec(runtime, "docker://python:3.11-slim", ("dlhub_probe_pkg",), options=("--fakeroot",))
    spec = BuildSpec.from_dict({**spec.to_dict(), "pip_options": list(offline(wheels))})
    ref = cache.register_build(spec)
    image = cache.image_for(ref, runtime)
    (entry,) = cache.entries()
    assert image == str(cache.root / "entries" / entry.key / "image.sif")
    assert Path(image).read_bytes() == b"SIF" * 100
    (build,) = [c for c in builders() if c["argv"][1] == "build"]
    ctx = build["cwd"]
    tmp_sif = build["argv"][-2]
    assert build["argv"] == [runtime, "build", "--fakeroot", tmp_sif, f"{ctx}/image.def"]
    assert tmp_sif.endswith("/image.sif") and "/tmp/" in tmp_sif  # written in tmp/, renamed complete
    assert build["recipe"].startswith("Bootstrap: docker\nFrom: python:3.11-slim\n")
    assert f"{ctx}/wheels /dlhub-build/wheels" in build["recipe"]
    assert (cache.root / "entries" / entry.key / "recipe.image.def").read_text() == build["recipe"]


def test_a_failed_build_says_the_builders_last_lines_and_leaves_nothing(
    builders, wheels, tmp_path, monkeypatch
):
    monkeypatch.setenv("FAKE_BUILD_FAIL", "1")
    cache = ImageCache(tmp_path / "cache")
    ref = cache.register_build(
        BuildSpec("podman", "localhost/base", ("dlhub_probe_pkg",), pip_options=offline(wheels))
    )
    with pytest.raises(ContainerError) as failed:
        cache.get(ref, "podman")
    message = str(failed.value)
    assert message.startswith(
        f"image {ref} (dlhub_probe_pkg on localhost/base, podman): podman build failed (exit 1)"
    )
    assert "No matching distribution found for nothing-here" in message and "STEP line 19" in message
    assert "STEP line 5" not in message  # the last lines, not the whole log
    assert cache.entries() == [] and os.listdir(cache.root / "tmp") == []


def test_an_unknown_package_fails_at_the_hosts_pip_with_its_reason(builders, wheels, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    ref = cache.register_build(
        BuildSpec("podman", "b", ("dlhub-no-such-package==9",), pip_options=offline(wheels))
    )
    with pytest.raises(
        ContainerError, match=r"pip wheel \(on the endpoint host\) failed \(exit 1\)"
    ) as failed:
        cache.get(ref, "podman")
    assert "No matching distribution found for dlhub-no-such-package==9" in str(failed.value)
    assert not [c for c in builders() if c["argv"][1] == "build"]  # the builder never ran


def test_a_ref_without_its_recipe_or_for_another_runtime_is_a_clear_error(tmp_path):
    cache = ImageCache(tmp_path / "cache")
    with pytest.raises(ContainerError, match="no build recipe for it"):
        cache.get("build://" + "0" * 64, "podman")
    ref = cache.register_build(BuildSpec("podman", "b", ("six",)))
    with pytest.raises(ContainerError, match="is built for podman, not docker"):
        cache.get(ref, "docker")


BASE = {"name": "e", "manager": {"address": "tcp://h:1", "token": "t"}}
PODMAN = {"pool": {"container": {"type": "podman", "image": "localhost/pool"}}}


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"image_cache": {"build": True}},
            "  image_cache.build: true needs a container runtime for the default pool",
        ),
        (
            {"image_cache": {"build": True}, "pool": {"container": {"type": "charliecloud", "image": "/i"}}},
            "  image_cache.build: charliecloud cannot build images here: ch-image comes with",
        ),
        (
            {"image_cache": {"build": True}, **PODMAN},
            "  build.base: no base image for podman (pool.container.type)",
        ),
        (
            {"image_cache": {"build": True}, **PODMAN, "build": {"base": {"apptainer": "docker://python"}}},
            "build.base: {podman: IMAGE}",
        ),
        ({"image_cache": {"build": "yes"}}, "  image_cache.build: must be true or false (got 'yes')"),
        (
            {"build": {"base": {"ch-run": "x"}}},
            "  build.base: base key 'ch-run' is not a runtime dlhub builds with",
        ),
        ({"build": {"bases": "x"}}, "  build.bases: unknown key; did you mean build.base?"),
        ({"build": {"timeout_s": 0}}, "  build.timeout_s: Input should be greater than 0"),
    ],
)
def test_config_errors_name_the_keys(extra, message):
    with pytest.raises(ConfigError) as failed:
        parse_config({**BASE, **extra})
    assert message in str(failed.value), str(failed.value)


def test_servable_build_registers_the_spec_of_the_default_pools_runtime(tmp_path):
    config = parse_config({
        **BASE,
        "pool": {"container": {"type": "podman", "image": "localhost/pool", "python": "python3.11"}},
        "image_cache": {"build": True},
        "build": {"base": {"podman": "localhost/base", "apptainer": "docker://x"},
                  "options": ["--pull=never"]},
    })  # fmt: skip
    assert parse_config(BASE).image_cache.build is False  # off unless asked for
    image, problem = servable_build(["six", "attrs>=20"], config, tmp_path)
    spec = build_spec_for(["attrs>=20", "six"], config)
    assert problem is None and image == spec.ref
    assert (spec.runtime, spec.base, spec.python, spec.options) == (
        "podman",
        "localhost/base",
        "python3.11",
        ("--pull=never",),
    )
    assert cache_for(tmp_path, config).build_spec(image) == spec  # the pool's cache reads it back


def test_the_readme_build_block_is_a_valid_endpoint_config():
    import re

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = re.search(r"^## Containers\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    block = next(
        b for b in re.findall(r"^```yaml\n(.*?)^```", section.group(1), re.M | re.S) if "build: true" in b
    )
    cfg = parse_config({**BASE, **yaml.safe_load(block)})
    assert cfg.image_cache.build and cfg.build.base_for("podman") == "localhost/py311"
