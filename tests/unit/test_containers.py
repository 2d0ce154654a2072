"""The container runtime layer (endpoint/containers.py): the command lines dlhub runs for each
runtime, recorded by fake runtime executables on PATH (the recipe's recording binary; real
containers run in tests/integration/test_container_pools.py), the errors for a missing runtime or
bind, the dlhub bundle imported by a Python that is not the endpoint's, and the config keys."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dlhub.endpoint import containers as c
from dlhub.endpoint.config import ConfigError, parse_config

# Records its argv and the environment it was started with, then answers like the runtime would.
FAKE = """#!{py}
import json, os, sys
with open({rec!r}, "a") as f:
    f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:],
                         "env": dict(os.environ)}}) + "\\n")
args = [a for a in sys.argv[1:] if a not in ("--quiet", "--debug")]
if args[:1] == ["--version"]:
    print("apptainer version 1.3.4")
"""
RUNTIMES = ("singularity", "apptainer", "ch-run", "podman", "docker")


@pytest.fixture
def fake_runtimes(tmp_path, monkeypatch):
    """Recording ``singularity``, ``apptainer``, ``ch-run``, ``podman`` and ``docker`` first on
    PATH; returns a function giving the recorded calls (``--version`` probes left out)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rec = tmp_path / "calls.jsonl"
    for name in RUNTIMES:
        p = bin_dir / name
        p.write_text(FAKE.format(py=sys.executable, rec=str(rec)))
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def calls():
        lines = rec.read_text().splitlines() if rec.exists() else []
        return [c for c in map(json.loads, lines) if c["argv"][1:] != ["--version"]]

    return calls


def run(launch: c.Launch) -> None:
    subprocess.run(launch.argv, env=launch.env, check=True, stdin=subprocess.DEVNULL)


WORKER = ["python3", "-m", "dlhub.endpoint.worker", "--config", "/dev/stdin"]


@pytest.mark.parametrize("runtime", ["singularity", "apptainer"])
def test_singularity_line_is_the_one_spython_execute_runs(fake_runtimes, tmp_path, runtime):
    """Our exec line equals what spython's own Client.execute runs for the same binds, options
    and image (for apptainer: with argv[0] replaced, since spython hardcodes singularity)."""
    from spython.main import get_client

    data = tmp_path / "data"
    data.mkdir()
    spec = c.ContainerSpec(type=runtime, image="/img.sif", options=("--cleanenv",), binds=(f"{data}:/data",))
    launch = c.worker_launch(spec, WORKER, {"DLHUB_WORKER_ID": "w1"}, [f"{tmp_path}:/opt"])
    run(launch)
    client = get_client()
    client.quiet = False
    client.execute(
        "/img.sif",
        WORKER,
        bind=[f"{data}:/data", f"{tmp_path}:/opt"],
        options=["--env", "DLHUB_WORKER_ID=w1", "--cleanenv"],
    )
    ours, spythons = (call["argv"] for call in fake_runtimes())
    assert ours == [runtime, *spythons[1:]]
    assert spythons == [
        "singularity",
        "exec",
        "--bind",
        f"{data}:/data",
        "--bind",
        f"{tmp_path}:/opt",
        "--env",
        "DLHUB_WORKER_ID=w1",
        "--cleanenv",
        "/img.sif",
        *WORKER,
    ]


@pytest.mark.parametrize(("gpu", "flag"), [("nvidia", "--nv"), ("rocm", "--rocm")])
def test_singularity_gpu_flag_workdir_and_comma_values(fake_runtimes, gpu, flag):
    spec = c.ContainerSpec(type="apptainer", image="/img.sif", gpu=gpu, workdir="/scratch")
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "DLHUB_WORKER_ID": "w"}
    run(c.worker_launch(spec, WORKER, env))
    (call,) = fake_runtimes()
    assert call["argv"] == ["apptainer", "exec", flag, "--env", "DLHUB_WORKER_ID=w", "--pwd", "/scratch",
                            "/img.sif", *WORKER]  # fmt: skip
    # --env splits on commas: such a value travels as APPTAINERENV_<KEY>
    assert call["env"]["APPTAINERENV_CUDA_VISIBLE_DEVICES"] == "0,1"


def test_host_python_variables_never_reach_the_runtime_or_the_image(fake_runtimes, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/host/lib")
    monkeypatch.setenv("VIRTUAL_ENV", "/host/venv")
    monkeypatch.setenv("PYTHONHOME", "/host/home")
    monkeypatch.setenv("SECRET_OF_THE_HOST", "x")
    for runtime in ("singularity", "charliecloud", "podman"):
        spec = c.ContainerSpec(type=runtime, image="/img")
        env = c.worker_env("w1", None, {"PYTHONPATH": "/opt:/opt/site"})
        env["VIRTUAL_ENV"] = "/host/venv"  # even when a caller passes it
        run(c.worker_launch(spec, WORKER, env))
    for call in fake_runtimes():
        for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "SECRET_OF_THE_HOST"):
            assert var not in call["env"], (call["argv"][0], var)
        line = " ".join(call["argv"])
        assert "PYTHONPATH=/opt:/opt/site" in line and "/host/" not in line, line


def test_charliecloud_line(fake_runtimes, tmp_path, monkeypatch):
    monkeypatch.delenv("USER", raising=False)
    image = tmp_path / "img"
    (image / "ch").mkdir(parents=True)
    (image / "ch" / "environment").write_text("PATH=/usr/bin:/bin\n")
    spec = c.ContainerSpec(type="charliecloud", image=str(image), options=("-t",), binds=(f"{tmp_path}",))
    run(c.worker_launch(spec, WORKER, {"DLHUB_WORKER_ID": "w1", "PYTHONPATH": "/opt"}, [f"{tmp_path}:/opt"]))
    (call,) = fake_runtimes()
    assert call["argv"] == [
        "ch-run",
        f"--bind={tmp_path}:{tmp_path}",
        f"--bind={tmp_path}:/opt",
        "--unset-env=*",
        "--set-env",  # the image's own ch/environment
        "--set-env=DLHUB_WORKER_ID=w1",
        "--set-env=PYTHONPATH=/opt",
        "-t",
        str(image),
        "--",
        *WORKER,
    ]
    assert call["env"]["USER"]  # ch-run refuses to start without $USER


@pytest.mark.parametrize("runtime", ["podman", "docker"])
def test_oci_line_and_removal(fake_runtimes, tmp_path, runtime):
    spec = c.ContainerSpec(
        type=runtime,
        image="localhost/pyimg",
        options=("--ulimit=nofile=4096:4096",),
        gpu="nvidia",
        workdir="/w",
    )
    launch = c.worker_launch(spec, WORKER, {"DLHUB_WORKER_ID": "p.1.2"}, [f"{tmp_path}:/opt"], ["3"], "p/1.2")
    assert launch.name == "dlhub-p-1.2"
    run(launch)
    c.remove_container(spec, launch.name)
    run_call, rm_call = fake_runtimes()
    assert run_call["argv"] == [
        runtime, "run", "--rm", "-i", "--init", "--network=host", "--name", "dlhub-p-1.2",
        "-v", f"{tmp_path}:/opt", "-e", "DLHUB_WORKER_ID=p.1.2", "-w", "/w",
        "--device", "nvidia.com/gpu=3", "--ulimit=nofile=4096:4096", "localhost/pyimg", *WORKER,
    ]  # fmt: skip
    rm = ["rm", "-f", "--time", "2"] if runtime == "podman" else ["rm", "-f"]
    assert rm_call["argv"] == [runtime, *rm, "dlhub-p-1.2"]


@pytest.mark.parametrize(
    ("runtime", "binary"),
    [("apptainer", "apptainer"), ("singularity", "singularity"), ("charliecloud", "ch-run"),
     ("podman", "podman"), ("docker", "docker")],
)  # fmt: skip
def test_missing_runtime_is_a_clear_error(tmp_path, monkeypatch, runtime, binary):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    spec = c.ContainerSpec(type=runtime, image="/img")
    with pytest.raises(c.ContainerError) as info:
        c.worker_launch(spec, WORKER, {})
    msg = str(info.value)
    assert f"container runtime {runtime!r}" in msg and f"executable {binary!r} not found" in msg


def test_container_binary_overrides_the_executable(fake_runtimes, tmp_path):
    spec = c.ContainerSpec(type="apptainer", image="/img", binary="singularity")
    run(c.worker_launch(spec, WORKER, {}))
    assert fake_runtimes()[0]["argv"][:2] == ["singularity", "exec"]
    with pytest.raises(c.ContainerError, match="executable '/nowhere/apptainer' not found"):
        c.worker_launch(
            c.ContainerSpec(type="apptainer", image="/img", binary="/nowhere/apptainer"), WORKER, {}
        )


def test_missing_bind_source_is_a_clear_error_not_spythons_exit(fake_runtimes, tmp_path):
    spec = c.ContainerSpec(type="singularity", image="/img", binds=(f"{tmp_path}/nope:/data",))
    with pytest.raises(
        c.ContainerError, match=r"'singularity': bind .*/nope:/data.*does not exist on this host"
    ):
        c.worker_launch(spec, WORKER, {})
    assert fake_runtimes() == []


def test_none_runs_the_command_itself():
    launch = c.worker_launch(c.ContainerSpec(), [sys.executable, "-c", "pass"], {"DLHUB_WORKER_ID": "w"})
    assert launch.argv == [sys.executable, "-c", "pass"] and launch.env["DLHUB_WORKER_ID"] == "w"


def test_spec_round_trip_and_errors():
    spec = c.ContainerSpec(type="charliecloud", image="/i", options=["-t"], binds=["/a:/b"])
    assert c.ContainerSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(c.ContainerError, match="needs an image"):
        c.ContainerSpec(type="podman")
    with pytest.raises(c.ContainerError, match="not one of"):
        c.ContainerSpec(type="lxc", image="/i")


def test_bundle_imports_with_another_python(tmp_path):
    """The bundle is a plain copy: Debian's /usr/bin/python3 (not the venv's, no editable finder)
    imports the worker from it with the venv's site-packages on PYTHONPATH, as in an image."""
    bundle = c.prepare_bundle(tmp_path / "bundle")
    assert (bundle / "dlhub" / "endpoint" / "worker.py").is_file()
    assert (bundle / "site").is_dir() and (bundle / "cache").is_dir()
    assert not list(bundle.rglob("__pycache__"))
    other = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{bundle}:{c.site_dirs()[0]}"}
    out = subprocess.run(
        [other, "-c", "import dlhub.endpoint.worker as w; print(w.__file__)"],
        env=env, capture_output=True, text=True, cwd=tmp_path, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == str(bundle / "dlhub" / "endpoint" / "worker.py")
    c.prepare_bundle(tmp_path / "bundle")  # replaced again in place
    assert (bundle / "dlhub" / "endpoint" / "worker.py").is_file()


def test_dlhub_binds(tmp_path):
    spec = c.ContainerSpec(type="charliecloud", image="/i", mount="/srv/")
    binds, env = c.dlhub_binds(spec, str(tmp_path / "b"), str(tmp_path / "cache"))
    assert binds == [f"{tmp_path}/b:/srv", f"{c.site_dirs()[0]}:/srv/site", f"{tmp_path}/cache:/srv/cache"]
    # an image built from a servable's requirements keeps them in REQUIREMENTS_DIR: before the
    # endpoint's site-packages, so their versions win
    assert c.REQUIREMENTS_DIR == "/dlhub/requirements"
    assert env == {"PYTHONPATH": "/srv:/dlhub/requirements:/srv/site", "DLHUB_SERVABLE_CACHE": "/srv/cache"}
    assert (tmp_path / "cache").is_dir()
    installed = c.ContainerSpec(type="charliecloud", image="/i", dlhub="installed")
    assert c.dlhub_binds(installed, None, str(tmp_path / "cache")) == ([], {})
    # the endpoint's data cache (inputs/outputs by reference): at <mount>/data, or at its own path
    binds, env = c.dlhub_binds(spec, str(tmp_path / "b"), None, str(tmp_path / "data"))
    assert binds[-1] == f"{tmp_path}/data:/srv/data" and env["DLHUB_DATA_CACHE"] == "/srv/data"
    assert (tmp_path / "data").is_dir() and c.DATA_DIR == "data"
    data = str(tmp_path / "data")
    assert c.dlhub_binds(installed, None, None, data) == ([f"{data}:{data}"], {"DLHUB_DATA_CACHE": data})


def test_compare_versions_names_what_differs():
    mine = {"python": "3.11.7", "dill": "0.4.1", "dlhub": "0.1.0"}
    assert c.compare_versions({"python": "3.11.2", "dill": "0.4.1", "dlhub": "0.1.0"}, mine) == []
    problems = c.compare_versions(
        {"python": "3.12.1", "dill": "0.3.8", "dlhub_error": "ModuleNotFoundError: No module named 'dlhub'"},
        mine,
    )
    assert problems[0].startswith("Python 3.12.1 in the image but 3.11.7 at the endpoint")
    assert problems[1] == "dill 0.3.8 in the image but 0.4.1 at the endpoint"
    assert problems[2] == "dlhub not importable in the image: ModuleNotFoundError: No module named 'dlhub'"


# ---- config: pool.container ---------------------------------------------------------------------

BASE = {"name": "ep", "manager": {"address": "tcp://127.0.0.1:5581", "token": "t"}}


def test_config_takes_the_issue_yaml_and_defaults_to_none():
    import yaml

    cfg = parse_config(
        {
            **BASE,
            **yaml.safe_load(
                """
pool:
  workers_per_node: 4
  container:
    type: apptainer            # apptainer | singularity | charliecloud | podman | docker | none
    image: /sw/images/dlhub-py311.sif
    options: ["--cleanenv"]
    binds: ["/scratch:/scratch"]
"""
            ),
        }
    )
    spec = c.ContainerSpec.from_dict(cfg.pool.container.model_dump())
    assert spec == c.ContainerSpec(
        type="apptainer",
        image="/sw/images/dlhub-py311.sif",
        options=("--cleanenv",),
        binds=("/scratch:/scratch",),
    )
    assert parse_config(BASE).pool.container.type == "none"


@pytest.mark.parametrize(
    ("container", "expected"),
    [
        (
            {"type": "apptainer", "imag": "/x.sif"},
            "pool.container.imag: unknown key; did you mean pool.container.image?",
        ),
        ({"type": "singularty", "image": "/x"}, "pool.container.type: "),
        ({"type": "podman"}, "pool.container: type podman needs an image"),
        ({"type": "charliecloud", "image": "/x", "gpu": "cuda"}, "pool.container.gpu: "),
        ({"type": "charliecloud", "image": "/x", "mount": "opt"}, "pool.container.mount: "),
        (
            {"type": "charliecloud", "image": "/x", "binds": ["data:/data"]},
            "pool.container.binds: 'data:/data': expected /host/path",
        ),
        ({"type": "charliecloud", "image": "/x", "dlhub": "maybe"}, "pool.container.dlhub: "),
    ],
)
def test_config_errors_name_the_key(container, expected):
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "pool": {"container": container}})
    assert expected in str(info.value), str(info.value)


def test_named_pools_have_their_own_container():
    cfg = parse_config(
        {
            **BASE,
            "pools": {
                "gpu": {"pool": {"container": {"type": "podman", "image": "localhost/x", "gpu": "nvidia"}}}
            },
        }
    )
    assert cfg.all_pools()["gpu"].pool.container.type == "podman"
    assert cfg.all_pools()["default"].pool.container.type == "none"
    with pytest.raises(ConfigError, match=r"pools\.gpu\.pool\.container\.imgae: unknown key; did you mean"):
        parse_config({**BASE, "pools": {"gpu": {"pool": {"container": {"type": "podman", "imgae": "x"}}}}})


def test_repo_has_the_vendored_image_builder_and_shims():
    root = Path(__file__).resolve().parents[2]
    for rel in ("scripts/build-test-image.sh", "tests/bin/singularity", "tests/bin/apptainer"):
        assert os.access(root / rel, os.X_OK), rel


def test_readme_containers_block_is_a_valid_config():
    import re

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = re.search(r"^## Containers\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert section, "README has no Containers section"
    block = re.findall(r"^```yaml\n(.*?)^```", section.group(1), re.M | re.S)[0]
    cfg = parse_config({**BASE, **yaml.safe_load(block)})
    assert cfg.pool.container.type == "apptainer" and cfg.pool.container.binds == ["/scratch:/scratch"]


def test_worker_env_is_explicit(monkeypatch):
    for var in [v for v in os.environ if v.startswith("DLHUB_")]:  # e.g. DLHUB_REQUIRE_CONTAINERS in CI
        monkeypatch.delenv(var)
    monkeypatch.setenv("DLHUB_HOME", "/h")
    monkeypatch.setenv("DLHUB_SERVABLE_CACHE", "/host/cache")  # a host folder: not in the image
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    monkeypatch.setenv("UNRELATED", "x")
    env = c.worker_env("w.0.1", "2", {"PYTHONPATH": "/opt:/opt/site"})
    assert env == {
        "DLHUB_HOME": "/h",
        "DLHUB_WORKER_ID": "w.0.1",
        "CUDA_VISIBLE_DEVICES": "2",
        "ROCR_VISIBLE_DEVICES": "2",
        "ZE_AFFINITY_MASK": "2",
        "PYTHONPATH": "/opt:/opt/site",
    }
    env = c.worker_env("w.0.1", None, {})  # no per-worker device: the pool's own setting passes
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and "UNRELATED" not in env


# ---- images per servable: the record field, the site catalogue, what verification refuses ------


def _record(**extra):
    from dlhub.executor.servable import Servable

    def f(x):
        return x

    return Servable.from_function(f, name="f", title="F", authors=["Doe, Jane"], **extra)


def test_a_servable_names_its_container_and_records_without_one_keep_their_digest():
    from dlhub.protocol.servable import RecordError, parse_record, record_digest

    plain = _record()
    assert "container" not in plain.record
    rec = plain.validate()
    assert rec.container is None
    # the digest of a record without a container (or data-set links) is the one computed before
    # those fields existed
    import hashlib
    import json

    old = rec.model_dump(mode="json")
    for later_field in ("container", "trained_on", "validated_on"):
        old.pop(later_field)
    expected = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert record_digest(rec) == expected
    for good in (
        "site:materials-2025",
        "docker://python:3.11-slim",
        "oras://ghcr.io/x/y:1",
        "library://a/b/c",
        "file:///sw/x.sif",
        "/sw/images/mat.sif",
    ):
        named = _record(container=good).validate()
        assert named.container == good and record_digest(named) != expected
        assert parse_record(named.model_dump(mode="json")).container == good
    for bad in ("python:3.11", "site:", "docker://", "file://rel/x.sif", "materials", " /x.sif"):
        try:
            _record(container=bad)
        except RecordError as exc:
            assert "container" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")


def _config(tmp_path, **extra):
    from dlhub.endpoint.config import parse_config

    data = {"name": "ep", "manager": {"address": "tcp://127.0.0.1:1", "token": "t"}, **extra}
    return parse_config(data)


def test_the_site_catalogue_is_validated_and_names_a_typo(tmp_path):
    from dlhub.endpoint.config import ConfigError

    cfg = _config(tmp_path, images={"site:materials-2025": "/sw/images/mat.sif"})
    assert cfg.images == {"site:materials-2025": "/sw/images/mat.sif"}
    assert cfg.image_cache.allow_pull is True
    try:
        _config(tmp_path, images={"materials-2025": "/sw/images/mat.sif"})
    except ConfigError as exc:
        assert "images" in str(exc) and "site:materials-2025" in str(exc)
    else:
        raise AssertionError("a key without site: was accepted")
    try:
        _config(tmp_path, image_cache={"allow_pull": "yes"})
    except ConfigError as exc:
        assert "allow_pull" in str(exc)
    else:
        raise AssertionError("allow_pull: 'yes' was accepted")


def test_servable_image_problem_gives_the_reason_or_none(tmp_path):
    from dlhub.endpoint.images import servable_image_problem

    image = tmp_path / "mat.sif"
    image.write_bytes(b"sif")
    pool = {"container": {"type": "apptainer", "image": str(image)}}
    cfg = _config(tmp_path, pool=pool, images={"site:mat": str(image), "site:gone": str(tmp_path / "no.sif")})
    assert servable_image_problem("site:mat", cfg) is None
    assert servable_image_problem(str(image), cfg) is None
    assert "no such image" in servable_image_problem("site:other", cfg)
    assert "site:gone" in servable_image_problem("site:gone", cfg)
    assert "no such file" in servable_image_problem("site:gone", cfg)
    no_pull = _config(tmp_path, pool=pool, image_cache={"allow_pull": False})
    assert "allow_pull: false" in servable_image_problem("docker://python:3.11-slim", no_pull)
    bare = _config(tmp_path, images={"site:mat": str(image)})
    assert "no container runtime" in servable_image_problem("site:mat", bare)


def test_readme_servable_images_block_is_a_valid_config():
    import re

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = re.search(r"^## Containers\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    block = next(
        b for b in re.findall(r"^```yaml\n(.*?)^```", section.group(1), re.M | re.S) if '"site:c"' in b
    )
    cfg = parse_config({**BASE, **yaml.safe_load(block)})
    assert cfg.pool.workers_per_node == 2 and cfg.images["site:c"] == "dir:///sw/trees/c"
