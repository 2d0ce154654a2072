"""The README's snippets, run exactly as a user types them, against a fresh `dlhub up`.

Blocks are read from README.md (never copied here), so the README and this test cannot drift.
Each Python block runs in a fresh interpreter with every expression statement recorded (as the
REPL would show it); a comment on the same line that is a Python literal (`# 49`,
`# "admin/composition-featurizer:1", verified`) is what the user must see there.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"

# Runs a block with each expression statement wrapped in __record__(line, value); prints the
# records as JSON on the last line of stdout.
DRIVER = r"""
import ast, json, sys
source = sys.stdin.read()
records = []
def __record__(line, value):
    try:
        json.dumps(value)
        shown = value
    except TypeError:
        shown = repr(value)
    records.append([line, shown])
    return value
def record(node, value):
    return ast.Call(ast.Name("__record__", ast.Load()), [ast.Constant(node.lineno), value], [])
class Wrap(ast.NodeTransformer):
    def visit_Expr(self, node):
        value = node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "print" and len(value.args) == 1:
            value.args = [record(node, value.args[0])]  # print(x): what is shown is x
            return node
        return ast.copy_location(ast.Expr(record(node, value)), node)
    def visit_Assign(self, node):
        if len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
            return node
        shown = ast.Expr(record(node, ast.Name(node.targets[0].id, ast.Load())))
        return [node, ast.copy_location(shown, node)]
tree = ast.fix_missing_locations(Wrap().visit(ast.parse(source)))
exec(compile(tree, "<README block>", "exec"), {"__name__": "__main__", "__record__": __record__})
print(json.dumps(records))
"""


def readme_block(heading: str, language: str, index: int = 0) -> str:
    """The ``index``-th fenced ``language`` block under the README section ``heading``."""
    text = README.read_text()
    match = re.search(rf"^##+ {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no section {heading!r}"
    blocks = re.findall(rf"^```{language}\n(.*?)^```", match.group(1), re.M | re.S)
    assert len(blocks) > index, f"README section {heading!r} has no {language} block #{index}"
    return blocks[index]


def expected_comment(line: str) -> tuple[bool, Any]:
    """(True, value) when the line's trailing comment starts with a Python literal."""
    code, sep, comment = line.partition("  # ")
    if not sep:
        return False, None
    comment = comment.strip()
    for candidate in (comment, comment.split(",")[0], comment.split(" ")[0]):
        try:
            return True, ast.literal_eval(candidate)
        except (ValueError, SyntaxError):
            continue
    return False, None


def run_python_block(source: str, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run a README block; return {stripped source line: recorded value} and check its comments."""
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER], input=source, capture_output=True, text=True, env=env, cwd=cwd,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, f"README block failed:\n{source}\n{proc.stdout}\n{proc.stderr}"
    lines = source.splitlines()
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    values: dict[str, Any] = {}
    for lineno, value in records:
        line = lines[lineno - 1]
        values[line.partition("  # ")[0].strip()] = value
        has_literal, expected = expected_comment(line)
        if has_literal and not isinstance(expected, str | int | float | list | dict):
            continue
        if has_literal:
            assert value == expected, f"README line {line.strip()!r} shows {value!r}"
    return values


@pytest.fixture(scope="module")
def up(stack_factory, tmp_path_factory):
    """A fresh `dlhub up` (its repository is empty, as for a new user) and the user's env."""
    s = stack_factory()
    env = {**os.environ, "DLHUB_HOME": str(s.home)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return s, env, tmp_path_factory.mktemp("readme-cwd")


def test_the_use_it_snippet_prints_what_its_comments_say(up):
    _, env, cwd = up
    values = run_python_block(readme_block("Use it", "python"), env, cwd)
    assert values["print(fut.result())"] == 49
    proc = subprocess.run(
        [sys.executable, "-c", readme_block("Use it", "python")], env=env, cwd=cwd, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    squares = [x * x for x in range(10)]
    assert proc.stdout.splitlines() == ["49", str(squares), str(sum(x * x for x in range(2000)))], proc.stderr
    assert "map square: 2,000/2,000 done in" in proc.stderr  # progress=True: a summary, stderr is a pipe


def test_the_publish_snippet_gets_version_1_and_runs_the_users_function(up):
    _, env, cwd = up
    values = run_python_block(readme_block("Publish, find and run servables", "python"), env, cwd)
    assert values["ref = client.publish(s)"] == "admin/composition-featurizer:1"
    assert values['ex.submit("admin/composition-featurizer", "NaCl").result()'] == {"elements": 2}
    assert values['ex.submit("admin/composition-featurizer:1", "KCl").result()'] == {"elements": 2}
    hits = values['client.search("featurizer", domain="materials")']
    assert any(h["owner"] == "admin" and h["name"] == "composition-featurizer" for h in hits), hits
    described = values['client.describe("admin/composition-featurizer")']
    assert described["status"] == "ready", described
    assert [v["version"] for v in described["versions"]] == [1], described


def test_the_shell_snippet_publishes_runs_and_deletes(up):
    _, env, cwd = up
    block = readme_block("Publish, find and run servables", "bash")
    assert "dlhub publish chem.py:count_atoms" in block
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    publish_comment = re.search(r"# -> (\S+)", block).group(1)
    assert publish_comment in out, out  # the comment shows what `dlhub publish` prints
    assert "5" in out, out  # dlhub run admin/count-atoms Fe2O3
    assert (cwd / "chem.py").is_file()


def test_the_batching_snippet_runs_as_written(up):
    _, env, cwd = up
    values = run_python_block(readme_block("Batching and caching", "python"), env, cwd)
    assert values['list(ex.map("admin/summer", [[1, 2]] * 1000, batch_size=100))'] == [3] * 1000
    assert 'ex.with_options(cache=False).submit("admin/summer", [1, 2])' in values


def test_the_publish_help_example_makes_a_ready_version(up):
    """`dlhub publish --help` shows a chem.py and a command: both, as shown, give a ready version."""
    _, env, cwd = up
    help_text = subprocess.run(
        ["dlhub", "publish", "--help"], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    shown = re.search(r"chem.py holding\n(.*?)\n\s*run:\n\s*(dlhub publish .*?)\n", help_text, re.S)
    assert shown, help_text
    workdir = cwd / "help-example"
    workdir.mkdir()
    (workdir / "chem.py").write_text(textwrap.dedent(shown.group(1)) + "\n")
    command = shown.group(2).replace("dlhub publish", "dlhub publish --name count-atoms-help", 1)
    proc = subprocess.run(
        ["bash", "-c", command], env=env, cwd=workdir, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "admin/count-atoms-help:1", proc.stdout
