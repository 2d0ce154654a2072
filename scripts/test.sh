#!/usr/bin/env bash
# README command 2: from a fresh clone, install the dev dependencies, start the local Slurm the
# cluster tests use, and run the test suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash scripts/slurm-localhost.sh || echo "scripts/test.sh: Slurm did not come up (above); tests/cluster will fail" >&2
.venv/bin/python -m pytest "$@"
