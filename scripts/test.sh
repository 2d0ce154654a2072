#!/usr/bin/env bash
# README command 2: from a fresh clone, install the dev dependencies, start the local Slurm and
# PostgreSQL the tests use, and run the test suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv dev
# Slurm (with MariaDB) and PostgreSQL stay up for the next run: say so at the end, pass or fail
left_running() {
  local running
  running=$(bash scripts/stop-services.sh --status 2>/dev/null | sed -n 's/^/  /; /: running/p')
  if [ -n "$running" ]; then
    printf '\nscripts/test.sh: still running (kept for the next run):\n%s\nstop them with: bash scripts/stop-services.sh\n' \
      "$running" >&2
  fi
}
trap left_running EXIT
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash scripts/slurm-localhost.sh || echo "scripts/test.sh: Slurm did not come up (above); tests/cluster will fail" >&2
# a real PostgreSQL on 127.0.0.1 for the [postgresql] variants of the store and repository tests
if pg_out=$(bash scripts/postgres-localhost.sh 2>&1); then
  export DLHUB_TEST_PG_URL=${DLHUB_TEST_PG_URL:-$(printf '%s\n' "$pg_out" | sed -n 's/^URL: //p' | tail -n 1)}
else
  printf '%s\n' "$pg_out" >&2
  echo "scripts/test.sh: PostgreSQL did not come up (above); the [postgresql] tests will fail" >&2
fi
.venv/bin/python -m pytest "$@"
