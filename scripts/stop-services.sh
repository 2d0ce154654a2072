#!/usr/bin/env bash
# stop-services.sh - stop what scripts/test.sh leaves running for the next run: the local Slurm
# (munged, MariaDB, slurmdbd, slurmctld, slurmd) and the test PostgreSQL on 127.0.0.1.
# Only daemons those scripts started are stopped (by their recorded pids). Start them again with
# `bash scripts/slurm-localhost.sh; bash scripts/postgres-localhost.sh` (or just scripts/test.sh).
#
# Usage: bash scripts/stop-services.sh [--status]   (--status: only say what runs)
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    --status)
        bash scripts/slurm-localhost.sh --status 2>/dev/null | grep -E '^[a-z]+d: '
        bash scripts/postgres-localhost.sh --status 2>/dev/null | grep '^postgres:'
        exit 0
        ;;
    "") ;;
    *) echo "usage: $0 [--status]" >&2; exit 2 ;;
esac
rc=0
bash scripts/slurm-localhost.sh --stop || rc=1
bash scripts/postgres-localhost.sh --stop || rc=1
exit "$rc"
