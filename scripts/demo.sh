#!/usr/bin/env bash
# README command 1: from a fresh clone, set everything up and run the main job on the embedded
# default (manager with SQLite + a `local` endpoint), then stop it again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv all
export DLHUB_HOME=${DLHUB_HOME:-$PWD/.dlhub-demo}
trap '.venv/bin/dlhub down >/dev/null 2>&1 || true' EXIT
.venv/bin/dlhub up --workers 2 --detach
.venv/bin/dlhub status
.venv/bin/python examples/quickstart.py
.venv/bin/python examples/servables.py
