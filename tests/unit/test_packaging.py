"""The project's build backend: an editable install makes a wheel and prints no setuptools notice."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BUILD = """
import json, sys, warnings
sys.path.insert(0, "scripts/build")
import dlhub_build_backend as backend
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    name = backend.build_editable(sys.argv[1])
print(json.dumps({"wheel": name, "warnings": [str(w.message) for w in caught]}))
"""


def test_editable_build_makes_a_wheel_without_the_editable_notice(tmp_path):
    tree = tmp_path / "tree"  # a copy: building writes egg-info and build/ next to the sources
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    out = tmp_path / "wheels"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", BUILD, str(out)], cwd=tree, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out / report["wheel"]).is_file() and report["wheel"].startswith("dlhub-")
    assert not [w for w in report["warnings"] if "Editable installation" in w], report["warnings"]
