"""``dlhub-endpoint images list|prune NAME`` through the real CLI, on a cache in a temp home
filled with real fetches (file:// tarballs unpacked into the cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from dlhub.endpoint.images import ImageCache, entry_key

CLI = [sys.executable, "-m", "dlhub.endpoint.cli"]


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def tarball(tmp_path: Path, name: str) -> str:
    root = tmp_path / name
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "marker").write_bytes(os.urandom(100_000))
    tgz = tmp_path / f"{name}.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root, arcname=".")
    return f"file://{tgz}"


def test_images_list_and_prune(tmp_path):
    home = tmp_path / "home"
    run_dir = home / "endpoints" / "ep"
    run_dir.mkdir(parents=True)
    config = {"name": "ep", "manager": {"address": "tcp://127.0.0.1:5581", "token": "t"}}
    config["image_cache"] = {"budget_gb": 0.5}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))

    out = cli(home, "images", "list", "ep")
    assert out.returncode == 0 and "no images cached" in out.stdout, out

    cache = ImageCache(run_dir / "images", 500_000_000)
    refs = [tarball(tmp_path, f"img{i}") for i in range(3)]
    for ref in refs:
        cache.get(ref, "charliecloud")
    index = json.loads(cache.index_path.read_text())
    index["entries"][entry_key(refs[0], "charliecloud")]["last_used"] -= 10 * 86400
    cache.index_path.write_text(json.dumps(index))
    pool = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cache.pin(refs[2], "charliecloud", pid=pool.pid)  # a running pool's image

        out = cli(home, "images", "list", "ep")
        assert out.returncode == 0, out
        lines = out.stdout.splitlines()
        assert lines[0].split() == ["REF", "RUNTIME", "SIZE", "LAST", "USED", "IN", "USE"]
        assert [line.split()[0] for line in lines[1:4]] == [refs[2], refs[1], refs[0]]  # MRU first
        assert "charliecloud" in lines[1] and lines[1].rstrip().endswith("yes")
        assert "10.0 days ago" in lines[3] and " s ago" in lines[1], lines
        assert "of 0.50 GB (image_cache.budget_gb)" in lines[-1]

        rows = json.loads(cli(home, "images", "list", "ep", "--json").stdout)
        assert rows["budget_bytes"] == 500_000_000
        assert [(r["ref"], r["pinned"]) for r in rows["entries"]] == [
            (refs[2], True),
            (refs[1], False),
            (refs[0], False),
        ]
        assert all(r["size"] > 100_000 for r in rows["entries"])

        out = cli(home, "images", "prune", "ep")  # within budget: nothing
        assert out.returncode == 0 and "removed 0 image(s); 3 left" in out.stdout, out
        out = cli(home, "images", "prune", "ep", "--older-than-days", "7")
        assert f"removed {refs[0]}" in out.stdout and "removed 1 image(s); 2 left" in out.stdout, out
        out = cli(home, "images", "prune", "ep", "--all")
        assert f"removed {refs[1]}" in out.stdout and "removed 1 image(s); 1 left" in out.stdout, out
        assert [e.ref for e in cache.entries()] == [refs[2]]  # the pinned one stays
    finally:
        pool.kill()
        pool.wait()
    out = cli(home, "images", "prune", "ep", "--all")
    assert "removed 1 image(s); 0 left" in out.stdout, out
    assert list((run_dir / "images" / "entries").iterdir()) == []

    out = cli(home, "images", "prune", "ep", "--all", "--older-than-days", "1")
    assert out.returncode != 0 and "exclude each other" in out.stderr
    out = cli(home, "images", "list", "nope")
    assert out.returncode != 0 and "no endpoint config" in out.stderr


ROOT = Path(__file__).resolve().parents[2]


def test_a_cached_tarball_runs_under_ch_run_and_a_warm_cache_does_not_fetch(tmp_path):
    """The test image (scripts/build-test-image.sh) as a rootfs tarball: the cache unpacks it
    once, ch-run runs the image's own Python from the cache entry, and a second cache on the
    same folder (the endpoint started again) gets it without unpacking."""
    import shutil
    import time

    if shutil.which("ch-run") is None:
        if os.environ.get("DLHUB_REQUIRE_CONTAINERS") == "1":
            pytest.fail("ch-run is not installed (DLHUB_REQUIRE_CONTAINERS=1)")
        pytest.skip("ch-run is not installed")
    src = os.environ.get("SERVABLE_TEST_IMAGE") or str(tmp_path / "img")
    env = {**os.environ, "INSTALL": "0"}
    env.setdefault("USER", "root" if os.getuid() == 0 else str(os.getuid()))
    build = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-test-image.sh"), src],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, (build.stdout + build.stderr)[-2000:]
    tgz = tmp_path / "img.tar.gz"
    subprocess.run(["tar", "-C", src, "-czf", str(tgz), "."], check=True, timeout=300)
    ref = f"file://{tgz}"

    cache = ImageCache(tmp_path / "images", 10**9)
    t0 = time.monotonic()
    image = cache.image_for(ref, "charliecloud")
    cold = time.monotonic() - t0
    assert cache.fetches == 1 and Path(image, "dlhub-test-image").exists()
    run = subprocess.run(
        [
            "ch-run",
            "--unset-env=*",
            "--set-env=PATH=/usr/bin:/bin",
            image,
            "--",
            "python3",
            "-c",
            "import os, sys; print(os.path.exists('/dlhub-test-image'), sys.version.split()[0])",
        ],
        env={"PATH": os.environ["PATH"], "USER": env["USER"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and run.stdout.split()[0] == "True", run.stderr

    again = ImageCache(tmp_path / "images", 10**9)
    t0 = time.monotonic()
    assert again.image_for(ref, "charliecloud") == image
    warm = time.monotonic() - t0
    assert again.fetches == 0
    print(
        f"cold get (unpack {tgz.stat().st_size / 1e6:.0f} MB tarball) {cold:.2f} s, "
        f"warm get {warm * 1e3:.1f} ms"
    )
