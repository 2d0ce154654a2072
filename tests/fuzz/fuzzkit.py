"""Settings for the fuzzing suite (tests/fuzz): how hard it fuzzes, hypothesis' profile, and the
fuzzers' private hub. Imported by each fuzz module (not a conftest.py: a second module named
``conftest`` would shadow tests/conftest.py for every test module collected after it).

The default run is sized to take about a minute for the whole folder; set ``DLHUB_FUZZ_FRAMES``
(frames per manager port and mode, default 20,000) and ``DLHUB_FUZZ_EXAMPLES`` (hypothesis
examples per decoder test, default 150) to fuzz longer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

# hypothesis keeps caches in .hypothesis/ under the working directory: not in the checkout
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), f"dlhub-hypothesis-{os.getuid()}"))

EXAMPLES = int(os.environ.get("DLHUB_FUZZ_EXAMPLES", "150"))

# no example database: the suite must not leave a .hypothesis folder in the checkout, and a
# failure prints the falsifying example anyway; no deadline: the test machines are shared
settings.register_profile(
    "dlhub-fuzz",
    database=None,
    deadline=None,
    max_examples=EXAMPLES,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.load_profile("dlhub-fuzz")


def user_add(home, name: str, role: str) -> str:
    """``dlhub-manager user add``: the new user's token."""
    proc = subprocess.run(
        [sys.executable, "-m", "dlhub.manager.cli", "user", "add", name, "--role", role]
        + ["--home", str(home / "manager")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1].split()[-1]


@pytest.fixture(scope="session")
def fuzz_hub(stack_factory):
    """A private ``dlhub up`` stack for the fuzzers (they must not disturb the shared one), with
    an ordinary user and an endpoint-role user: (stack, {"client": token, "endpoint": token})."""
    stack = stack_factory(workers=1)
    tokens = {
        "client": user_add(stack.home, "fuzzer", "user"),
        "endpoint": user_add(stack.home, "ep-fuzz", "endpoint"),
    }
    return stack, tokens
