"""The examples `dlhub up` publishes live under their own owner `examples`: a user's servable of the
same name starts at version 1, runs the user's code, and the example pipeline keeps its featurizer.

One `dlhub up --examples` (the six examples published in the background, as for a new user); the
README's blocks are read from README.md, so the README and these tests cannot drift. The tests
run in file order: the last one publishes a wrong `examples/noop` on purpose.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import wait_until

from dlhub.executor import AccessDenied, Client, Servable
from dlhub.executor.examples import BUILDS, featurize

OWNER = "examples"  # the owner `dlhub up` publishes its examples for
EXAMPLE_NAMES = [name for name, _, _ in BUILDS]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def readme_block(heading: str, language: str) -> str:
    section = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", README.read_text(), re.M | re.S)
    assert section, f"README has no section {heading!r}"
    block = re.search(rf"^```{language}\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, f"README section {heading!r} has no {language} block"
    return block.group(1)


@pytest.fixture(scope="module")
def published(stack_factory):
    """A `dlhub up` whose background publisher has put all six examples up, and its user's env."""
    s = stack_factory(examples=True)
    client = Client(home=str(s.home))
    pid = int((s.home / "examples.pid").read_text())
    wait_until(lambda: not _running(pid), 300, interval=0.5, what="the example publisher to finish")
    found = sorted(h["name"] for h in client.search(owner=OWNER, limit=100))
    log = (s.home / "examples.log").read_text()
    assert found == sorted(EXAMPLE_NAMES), f"ready under {OWNER}/: {found}; examples.log:\n{log}"
    env = {**os.environ, "DLHUB_HOME": str(s.home)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return s, client, env


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def versions(client: Client, ref: str) -> list[tuple[int, str]]:
    return [(v["version"], v["status"]) for v in client.versions(ref)]


def test_the_users_composition_featurizer_is_version_1_and_the_example_pipeline_keeps_its_own(
    published, tmp_path
):
    s, client, env = published
    before = {name: versions(client, f"{OWNER}/{name}") for name in EXAMPLE_NAMES}
    assert all(v == [(1, "ready")] for v in before.values()), before
    # the README's publish block, as a user runs it
    script = readme_block("Publish, find and run servables", "python") + "\nprint(ref)\n"
    proc = subprocess.run(
        [sys.executable, "-"],
        input=script,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "admin/composition-featurizer:1"
    assert versions(client, "admin/composition-featurizer") == [(1, "ready")]

    ex = s.executor()
    assert ex.submit("admin/composition-featurizer:1", "KCl").result(timeout=60) == {"elements": 2}
    assert ex.submit("admin/composition-featurizer", "NaCl").result(timeout=60) == {"elements": 2}
    assert ex.submit(f"{OWNER}/composition-featurizer", "KCl").result(timeout=60) == featurize("KCl")
    pipeline = client.describe(f"{OWNER}/composition-pipeline")["record"]
    assert pipeline["steps"] == [f"{OWNER}/composition-featurizer:1", f"{OWNER}/composition-rf:1"]
    expected = float(client.run(f"{OWNER}/composition-rf", [featurize("Fe2O3")])[0])
    assert ex.submit(f"{OWNER}/composition-pipeline", "Fe2O3").result(timeout=60) == pytest.approx(expected)

    # the next `dlhub up` publishes nothing: every example is already there, the user's untouched
    again = subprocess.run(
        [sys.executable, "-m", "dlhub.executor.examples", "--home", str(s.home)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    lines = dict(line.split(None, 1) for line in again.stdout.splitlines())
    assert lines == {name: f"{OWNER}/{name}:1 (already published)" for name in EXAMPLE_NAMES}, again.stdout
    assert {name: versions(client, f"{OWNER}/{name}") for name in EXAMPLE_NAMES} == before
    assert versions(client, "admin/composition-featurizer") == [(1, "ready")]
    assert {h["owner"] for h in client.search(owner="admin", limit=100)} <= {"admin"}
    assert [h["name"] for h in client.search(owner="admin", limit=100)] == ["composition-featurizer"]


def test_the_readme_rest_snippet_runs_the_example_pipeline(published, tmp_path):
    s, client, env = published
    block = readme_block("REST API", "bash")
    assert f"/servables/{OWNER}/composition-pipeline/run" in block
    # the runnable lines (the last one needs a task id of the user's), continuation lines joined
    script = "\n".join(line for line in block.replace("\\\n", " ").splitlines() if "<task_id>" not in line)
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    search, run = json_documents(proc.stdout)  # curl -s prints each body without a newline
    assert any(h["owner"] == OWNER and h["name"] == "composition-featurizer" for h in search["results"])
    expected = float(client.run(f"{OWNER}/composition-rf", [featurize("Fe2O3")])[0])
    assert run["state"] == "succeeded" and run["result"] == pytest.approx(expected)


def json_documents(text: str) -> list:
    decoder, out, at = json.JSONDecoder(), [], 0
    while at < len(text.strip()):
        value, at = decoder.raw_decode(text, at)
        out.append(value)
        while at < len(text) and text[at].isspace():
            at += 1
    return out


def test_only_an_admin_may_publish_for_another_owner(published):
    s, client, _ = published
    made = subprocess.run(
        [sys.executable, "-m", "dlhub.manager.cli", "create-user", "bob", "--home", str(s.home / "manager")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    bob = Client(client.url, made.stdout.strip())
    servable = Servable.from_function(
        featurize,
        name="bobs-featurizer",
        title="t",
        authors=["Doe, Jane"],
        examples=[(("NaCl",), featurize("NaCl"))],
    )
    with pytest.raises(AccessDenied, match="bob may not publish for examples"):
        bob.publish(servable, owner=OWNER)
    with httpx.Client(base_url=client.url, timeout=30) as http:
        r = http.post(
            "/api/v1/servables",
            data={"record": '{"name": "x"}', "owner": OWNER},
            headers={"Authorization": f"Bearer {made.stdout.strip()}"},
        )
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")
    assert client.search("bobs-featurizer", owner=OWNER) == []
    # one's own name: fine (the upload is accepted; verifying it on `local`, the admin's endpoint,
    # is refused by that endpoint's default policy: only its owner submits there)
    assert bob.publish(servable, owner="bob", wait=False) == "bob/bobs-featurizer:1"
    with pytest.raises(ValueError, match="form field 'owner'"):
        client.publish(servable, owner="not a name!")
    assert client.publish(servable, owner="lab") == "lab/bobs-featurizer:1"  # an admin may


def test_the_demo_runs_every_example_and_fails_on_a_wrong_answer(published):
    s, client, env = published
    demo = [sys.executable, str(ROOT / "examples" / "servables.py")]
    proc = subprocess.run(demo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"over REST (POST /api/v1/servables/{OWNER}/composition-pipeline/run" in out
    assert "  title:    Composition featurizer: formula to numeric features" in out
    assert "round 1:" in out and "imports scikit-learn and loads the model" in out and "round 2:" in out

    def wrong(x=None):
        return "not what you sent"

    client.publish(
        Servable.from_function(
            wrong, name="noop", title="t", authors=["Doe, Jane"], examples=[((1,), "not what you sent")]
        ),
        owner=OWNER,
    )
    proc = subprocess.run(demo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "WRONG: noop returned 'not what you sent'" in proc.stdout
    assert "1 wrong answer(s)" in proc.stderr
