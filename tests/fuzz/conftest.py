"""Settings for the fuzzing suite (tests/fuzz): how hard it fuzzes, and hypothesis' profile.

The default run is sized to take about a minute for the whole folder; set ``DLHUB_FUZZ_FRAMES``
(frames per manager port and mode, default 20,000) and ``DLHUB_FUZZ_EXAMPLES`` (hypothesis
examples per decoder test, default 150) to fuzz longer.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FRAMES = int(os.environ.get("DLHUB_FUZZ_FRAMES", "20000"))
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
