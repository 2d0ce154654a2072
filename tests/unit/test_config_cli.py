"""`dlhub config KEY` and the README's REST snippet: they read the client config of the home the
user chose (DLHUB_HOME or --home), never a fixed ~/.dlhub."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def rest_snippet_setup_lines() -> list[str]:
    """The shell lines of the README's REST block that set variables (read from README.md, so
    README and test cannot drift)."""
    section = re.search(r"^## REST API\n(.*?)(?=^## |\Z)", README.read_text(), re.M | re.S)
    assert section, "README has no section 'REST API'"
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, "README's REST API section has no bash block"
    lines = [line for line in block.group(1).splitlines() if re.match(r"[A-Z_]+=", line)]
    assert [line.split("=")[0] for line in lines] == ["TOKEN", "URL"], lines
    return lines


def write_config(home: Path, token: str, rest_url: str) -> None:
    home.mkdir(parents=True)
    (home / "config.json").write_text(
        json.dumps({"manager": "tcp://127.0.0.1:1", "token": token, "rest_url": rest_url})
    )


def user_env(tmp_path: Path) -> dict[str, str]:
    """A user whose ~/.dlhub holds a different config than the DLHUB_HOME they chose."""
    env = {**os.environ, "HOME": str(tmp_path / "user"), "DLHUB_HOME": str(tmp_path / "chosen")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    write_config(tmp_path / "user" / ".dlhub", "dlh_from-the-default-home", "http://127.0.0.1:1111")
    write_config(tmp_path / "chosen", "dlh_from-dlhub-home", "http://127.0.0.1:2222")
    return env


def test_the_readme_rest_snippet_honours_dlhub_home(tmp_path):
    env = user_env(tmp_path)
    script = "\n".join([*rest_snippet_setup_lines(), 'echo "$TOKEN"', 'echo "$URL"'])
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["dlh_from-dlhub-home", "http://127.0.0.1:2222"]


def test_dlhub_config_prints_each_key_from_the_home_given(tmp_path):
    env = user_env(tmp_path)
    dlhub = [sys.executable, "-m", "dlhub.executor.cli", "config"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*dlhub, *args], env=env, capture_output=True, text=True, timeout=60)

    assert run("manager").stdout == "tcp://127.0.0.1:1\n"
    other = tmp_path / "other"
    write_config(other, "dlh_other", "http://127.0.0.1:3333")
    assert run("rest-url", "--home", str(other)).stdout == "http://127.0.0.1:3333\n"  # --home wins
    missing = run("token", "--home", str(tmp_path / "absent"))
    assert missing.returncode == 1 and str(tmp_path / "absent" / "config.json") in missing.stderr
    assert "dlhub up" in missing.stderr
    (other / "config.json").write_text(json.dumps({"manager": "tcp://127.0.0.1:1"}))
    no_rest = run("rest-url", "--home", str(other))
    assert no_rest.returncode == 1 and "no 'rest_url'" in no_rest.stderr
    bad = run("password")
    assert bad.returncode == 2 and "'password' is not one of" in bad.stderr
