"""A user's script with helper modules next to it submits functions that use them (issue 9, item 1):
every call succeeds on every worker, whether or not that worker ran one of the helpers before.

The script runs as ``python script.py`` in tmp_path, beside its helpers, exactly as a user runs it;
the session stack's two workers cannot import those files (their names are unique per run, so no
other test's modules of the same name sit in a warm worker).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import sys
    import time

    from dlhub.executor import Executor
    from helper_a_SUFFIX import triple
    import helper_b_SUFFIX
    import helper_c_SUFFIX
    import helper_pkg_SUFFIX.core
    import helper_broken_SUFFIX

    def via_name(x):
        return triple(x)

    def via_module(x):
        return helper_b_SUFFIX.scale(x)

    def where(x):
        time.sleep(0.2)  # long enough that calls spread over both workers (never prefetched)
        return helper_c_SUFFIX.combined(triple(x)), helper_pkg_SUFFIX.core.half(x), os.getpid()

    def via_broken(x):
        return helper_broken_SUFFIX.VALUE + x

    def outcome(future):
        try:
            return ["ok", future.result(60)]
        except Exception as exc:
            return ["error", f"{type(exc).__name__}: {exc}"]

    with Executor(endpoint="local", home=sys.argv[1]) as ex:
        first = outcome(ex.submit(triple, 2))  # one worker imports helper_a this way
        names = [outcome(f) for f in [ex.submit(via_name, i) for i in range(20)]]
        modules = [outcome(f) for f in [ex.submit(via_module, i) for i in range(20)]]
        spread = [outcome(f) for f in [ex.submit(where, i) for i in range(8)]]
        broken = outcome(ex.submit(via_broken, 1))
    print(json.dumps({"first": first, "names": names, "modules": modules, "spread": spread,
                      "broken": broken}))
    """
)

HELPERS = {
    "helper_a_SUFFIX.py": "def triple(x):\n    return 3 * x\n",
    "helper_b_SUFFIX.py": "def scale(x):\n    return 10 * x\n",
    "helper_c_SUFFIX.py": "import helper_d_SUFFIX\n\ndef combined(x):\n    return helper_d_SUFFIX.BASE + x\n",
    "helper_d_SUFFIX.py": "BASE = 100\n",
    "helper_pkg_SUFFIX/__init__.py": "from .core import half\n",
    "helper_pkg_SUFFIX/core.py": "def half(x):\n    return x / 2\n",
    "helper_broken_SUFFIX.py": (
        "import os\nif os.environ.get('DLHUB_TEST_CLIENT') != '1':\n"
        "    import dlhub_package_the_worker_lacks  # noqa: F401\nVALUE = 1\n"
    ),
}


def test_a_scripts_helper_modules_travel_to_every_worker(stack, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    for rel, text in HELPERS.items():
        path = tmp_path / rel.replace("SUFFIX", suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("SUFFIX", suffix))
    (tmp_path / "script.py").write_text(SCRIPT.replace("SUFFIX", suffix))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DLHUB_TEST_CLIENT"] = "1"
    proc = subprocess.run(
        [sys.executable, "script.py", str(stack.home)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["first"] == ["ok", 6]
    assert out["names"] == [["ok", 3 * i] for i in range(20)]
    assert out["modules"] == [["ok", 10 * i] for i in range(20)]
    assert [r[:2] for r in (o[1] for o in out["spread"])] == [[100 + 3 * i, i / 2] for i in range(8)]
    assert len({o[1][2] for o in out["spread"]}) == 2, "the calls should have reached both workers"
    state, message = out["broken"]
    assert state == "error" and "NameError" not in message
    assert "ModuleNotFoundError" in message and "dlhub_package_the_worker_lacks" in message
