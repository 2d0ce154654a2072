#!/usr/bin/env bash
# README command 2: from a fresh clone, install the dev dependencies and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash scripts/slurm-localhost.sh || echo "scripts/test.sh: Slurm did not come up (above); tests/cluster will fail" >&2
.venv/bin/python -m pytest "$@"
