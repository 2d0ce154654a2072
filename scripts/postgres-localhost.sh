#!/usr/bin/env bash
# postgres-localhost.sh - the project's own copy of the shared recipe: install and start a REAL PostgreSQL for tests on 127.0.0.1,
# without systemd, and create a test role + database with password auth on loopback.
#
# Debian 12 (bookworm): PostgreSQL 15 from the `postgresql` package. Runs as root; the server
# itself runs as the `postgres` user (postgres refuses to run as root). It does NOT use the
# Debian cluster 15/main: it runs initdb + pg_ctl on its own data directory (one per port), so
# an existing 15/main cluster is left alone and several ports can run side by side.
#
# Idempotent: a second run finds the running server and leaves it alone (restarts it only if
# the generated settings changed), re-asserts the role password and database owner, re-runs the
# smoke test. Leaves the server running. Exits non-zero with an "ERROR:" line on failure.
#
# Usage:
#   postgres-localhost.sh            install (if needed), initdb (if needed), start, create role+db, smoke-test
#   postgres-localhost.sh --stop     stop the server of this recipe's data directory (for $PGPORT)
#   postgres-localhost.sh --status   show whether it runs, its pid and the connection URL
#   postgres-localhost.sh --purge    --stop, then delete the data directory
#
# Environment knobs (all optional):
#   PGPORT=5432              TCP port on 127.0.0.1 (use another one when 5432 is taken)
#   PG_USER=dlhub            test role (LOGIN CREATEDB, password auth over TCP)
#   PG_PASSWORD=dlhub        its password
#   PG_DB=dlhub_test         test database, owned by PG_USER
#   PG_MAJOR=15              server major version; binaries in /usr/lib/postgresql/$PG_MAJOR/bin
#   PG_BIN=...               override that bin directory
#   PG_DATA_DIR=/tmp/dlhub-pg-$PGPORT   data directory (also holds the unix socket and server.log)
#   PG_FAST=1                fsync/synchronous_commit/full_page_writes off (throwaway test data);
#                            PG_FAST=0 keeps the durable defaults
#   PG_SKIP_SMOKE=1          skip the psql smoke test (tsvector + GIN + websearch_to_tsquery)
#   PG_WAIT_SECS=60          how long pg_ctl waits for start/stop
#   APT_LOCK_TIMEOUT=600     seconds apt-get waits for the dpkg lock
set -Eeuo pipefail

PGPORT=${PGPORT:-5432}
PG_USER=${PG_USER:-dlhub}
PG_PASSWORD=${PG_PASSWORD:-dlhub}
PG_DB=${PG_DB:-dlhub_test}
PG_MAJOR=${PG_MAJOR:-15}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/$PG_MAJOR/bin}
PG_DATA_DIR=${PG_DATA_DIR:-/tmp/dlhub-pg-$PGPORT}
PG_FAST=${PG_FAST:-1}
PG_SKIP_SMOKE=${PG_SKIP_SMOKE:-0}
PG_WAIT_SECS=${PG_WAIT_SECS:-60}
APT_LOCK_TIMEOUT=${APT_LOCK_TIMEOUT:-600}
export PGPORT

LOGFILE=$PG_DATA_DIR/server.log
DIE_SHOWS_LOG=0 # set to 1 once the server is being started: errors then show the tail of its log
CONF_NAME=dlhub-localhost.conf # generated settings, included from postgresql.conf
APT_LOG=/tmp/postgres-localhost-apt.log

log() { echo "[postgres-localhost] $*"; }
die() {
    trap - ERR
    echo "[postgres-localhost] ERROR: $*" >&2
    if [ "$DIE_SHOWS_LOG" = 1 ] && [ -s "$LOGFILE" ] && [ -r "$LOGFILE" ]; then
        echo "---- last lines of $LOGFILE ----" >&2
        tail -n 15 "$LOGFILE" >&2
    fi
    exit 1
}
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# run a command as the postgres user, from a directory it can read, with its own HOME
as_pg() { (cd / && runuser -u postgres -- env HOME=/var/lib/postgresql "$@"); }

# admin psql: unix socket in the data dir, peer auth as postgres
pg_admin() { as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_DATA_DIR" -p "$PGPORT" -d postgres "$@"; }

# proc_live PID: the process exists and is not a zombie
proc_live() {
    local st
    st=$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# procs_in_datadir: pids of live processes whose working directory is the data dir (postgres
# processes chdir there)
procs_in_datadir() {
    local d p
    d=$(readlink -f "$PG_DATA_DIR")
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/cwd" 2>/dev/null)" = "$d" ] && proc_live "${p#/proc/}" && echo "${p#/proc/}"
    done
    return 0
}

# postmaster_pid: prints the pid from $PG_DATA_DIR/postmaster.pid if that process is a live postgres
postmaster_pid() {
    local pid
    [ -s "$PG_DATA_DIR/postmaster.pid" ] || return 1
    pid=$(head -n 1 "$PG_DATA_DIR/postmaster.pid" | tr -dc '0-9')
    [ -n "$pid" ] && proc_live "$pid" || return 1
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in postgres | postmaster) ;; *) return 1 ;; esac
    echo "$pid"
}

# port_open [PORT]: something accepts TCP connections on 127.0.0.1:PORT (default $PGPORT)
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/${1:-$PGPORT}") 2>/dev/null; }

# die_port_taken: explain who holds 127.0.0.1:$PGPORT and name a free port to use instead
die_port_taken() {
    local who="" p free=""
    command -v ss >/dev/null 2>&1 && who=$(ss -Hltnp "sport = :$PGPORT" 2>/dev/null | grep -o 'users:.*' | head -n 1 || true)
    for p in $(seq 5433 5499); do port_open "$p" || { free=$p; break; }; done
    die "127.0.0.1:$PGPORT is already in use by another process${who:+ ($who)}; rerun with PGPORT=${free:-<free port>}"
}

# urlencode STRING: percent-encode for the userinfo part of a URL (byte-wise)
urlencode() {
    local LC_ALL=C s=$1 out="" c hex i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in [a-zA-Z0-9.~_-]) out+=$c ;; *) printf -v hex '%%%02X' "'$c"; out+=$hex ;; esac
    done
    echo "$out"
}
url() { echo "postgresql+psycopg://$PG_USER:$(urlencode "$PG_PASSWORD")@127.0.0.1:$PGPORT/$PG_DB"; }

do_stop() {
    local pid t0
    t0=$(now)
    if ! pid=$(postmaster_pid); then
        log "nothing to stop: no live postgres recorded in $PG_DATA_DIR/postmaster.pid"
        return 0
    fi
    log "stopping postgres (pid $pid, data $PG_DATA_DIR)"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA_DIR" -m fast -w -t "$PG_WAIT_SECS" stop >/dev/null 2>&1 || true
    # pg_ctl waits for postmaster.pid to go; make sure the process itself is gone (by pid only;
    # an exited postmaster may linger as a zombie until PID 1 reaps it, which is fine)
    for _ in $(seq 1 100); do proc_live "$pid" || break; sleep 0.1; done
    if proc_live "$pid"; then
        log "postgres (pid $pid) still running after pg_ctl stop; sending SIGQUIT (immediate shutdown)"
        kill -QUIT "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do proc_live "$pid" || break; sleep 0.1; done
        proc_live "$pid" && die "could not stop postgres pid $pid"
    fi
    log "stopped in $(secs "$t0" "$(now)") s"
}

do_status() {
    local pid
    if pid=$(postmaster_pid); then
        echo "postgres: running (pid $pid) on 127.0.0.1:$PGPORT, data $PG_DATA_DIR"
        echo "URL: $(url)"
    else
        echo "postgres: not running (data $PG_DATA_DIR)"
        return 3
    fi
}

case "${1:-}" in
    --stop) [ "$(id -u)" -eq 0 ] || die "must run as root"; do_stop; exit 0 ;;
    --status) if do_status; then exit 0; else exit 3; fi ;;
    --purge)
        [ "$(id -u)" -eq 0 ] || die "must run as root"
        do_stop
        case "$PG_DATA_DIR" in /tmp/?* | /var/lib/postgresql/?*) ;; *) die "refusing to delete $PG_DATA_DIR (only under /tmp or /var/lib/postgresql)" ;; esac
        if [ -d "$PG_DATA_DIR" ]; then rm -rf -- "$PG_DATA_DIR"; log "deleted $PG_DATA_DIR"; fi
        exit 0 ;;
    "" | --start) ;;
    *) echo "usage: $0 [--start|--stop|--status|--purge]   (env: PGPORT, PG_USER, PG_PASSWORD, PG_DB, PG_DATA_DIR, ...)" >&2; exit 2 ;;
esac

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and runs the server as user postgres)"
case "$PGPORT" in '' | *[!0-9]*) die "PGPORT must be a number, got '$PGPORT'" ;; esac
[ "$PGPORT" -ge 1 ] && [ "$PGPORT" -le 65535 ] || die "PGPORT out of range: $PGPORT"
for v in PG_USER PG_DB; do
    [[ ${!v} =~ ^[a-z_][a-z0-9_]*$ ]] || die "$v must be a lower-case SQL identifier ([a-z_][a-z0-9_]*), got '${!v}'"
done
# the unix socket path has a 107-byte limit
[ ${#PG_DATA_DIR} -le 80 ] || die "PG_DATA_DIR is too long for a unix socket path (${#PG_DATA_DIR} > 80 chars)"
T_ALL=$(now)

# ---------------------------------------------------------------- 1. install
T0=$(now)
if [ -x "$PG_BIN/postgres" ] && [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ] && [ -x "$PG_BIN/psql" ]; then
    log "PostgreSQL $PG_MAJOR already installed ($PG_BIN)"
else
    command -v apt-get >/dev/null || die "$PG_BIN/postgres missing and apt-get not found (set PG_BIN to the server's bin directory)"
    if [ "$PG_MAJOR" = 15 ]; then PKGS=postgresql; else PKGS="postgresql-$PG_MAJOR"; fi
    log "installing $PKGS (apt-get update + install; log: $APT_LOG)"
    export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 NEEDRESTART_MODE=l
    apt-get -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" update -qq >"$APT_LOG" 2>&1 \
        || { tail -n 20 "$APT_LOG" >&2; die "apt-get update failed"; }
    log "apt-get update took $(secs "$T0" "$(now)") s"
    # Without systemd (and with unknown runlevel or a policy-rc.d) the postinst does not start the
    # Debian cluster 15/main it creates; this script never uses that cluster anyway.
    apt-get -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" install -y -qq --no-install-recommends "$PKGS" >>"$APT_LOG" 2>&1 \
        || { tail -n 30 "$APT_LOG" >&2; die "apt-get install $PKGS failed (log: $APT_LOG)"; }
    [ -x "$PG_BIN/postgres" ] || die "$PG_BIN/postgres missing after apt-get install $PKGS"
fi
id postgres >/dev/null 2>&1 || die "user 'postgres' missing (postgresql-common not installed?)"
T_INSTALL=$(secs "$T0" "$(now)")

# ---------------------------------------------------------------- 2. initdb (once per data dir)
T0=$(now)
# fail early (before initdb) when another process holds the port
if ! postmaster_pid >/dev/null && port_open; then die_port_taken; fi
if [ -s "$PG_DATA_DIR/PG_VERSION" ]; then
    have=$(cat "$PG_DATA_DIR/PG_VERSION")
    [ "$have" = "$PG_MAJOR" ] || die "$PG_DATA_DIR holds a PostgreSQL $have cluster, not $PG_MAJOR (use --purge or another PG_DATA_DIR)"
    log "data directory exists: $PG_DATA_DIR"
else
    if [ -e "$PG_DATA_DIR" ] && [ -n "$(ls -A "$PG_DATA_DIR" 2>/dev/null)" ]; then
        die "$PG_DATA_DIR exists, is not empty and is not a data directory (remove it or set PG_DATA_DIR)"
    fi
    install -d -o postgres -g postgres -m 0700 "$PG_DATA_DIR"
    log "initdb $PG_DATA_DIR"
    # peer auth on the unix socket (admin: postgres), scram-sha-256 passwords on 127.0.0.1 / ::1.
    # C.UTF-8 is built into Debian's glibc. initdb derives the default text search configuration
    # from the locale (C/en -> english, de_DE -> german, unknown -> simple); pin 'english'.
    as_pg "$PG_BIN/initdb" -D "$PG_DATA_DIR" -U postgres --encoding=UTF8 --locale=C.UTF-8 \
        --text-search-config=pg_catalog.english --auth-local=peer --auth-host=scram-sha-256 \
        >"$PG_DATA_DIR.initdb.log" 2>&1 \
        || { tail -n 20 "$PG_DATA_DIR.initdb.log" >&2; die "initdb failed (log: $PG_DATA_DIR.initdb.log)"; }
    rm -f "$PG_DATA_DIR.initdb.log"
    echo "include_if_exists = '$CONF_NAME'	# added by postgres-localhost.sh" >>"$PG_DATA_DIR/postgresql.conf"
fi
grep -q "^include_if_exists = '$CONF_NAME'" "$PG_DATA_DIR/postgresql.conf" \
    || echo "include_if_exists = '$CONF_NAME'	# added by postgres-localhost.sh" >>"$PG_DATA_DIR/postgresql.conf"
T_INITDB=$(secs "$T0" "$(now)")

# ---------------------------------------------------------------- 3. settings
NEWCONF=$(mktemp /tmp/postgres-localhost-conf.XXXXXX)
{
    echo "# Generated by postgres-localhost.sh; rewritten on every run."
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $PGPORT"
    echo "unix_socket_directories = '$PG_DATA_DIR'"
    echo "unix_socket_permissions = 0700"
    echo "password_encryption = 'scram-sha-256'"
    echo "default_text_search_config = 'pg_catalog.english'"
    if [ "$PG_FAST" = 1 ]; then
        echo "# throwaway test data: trade durability for speed"
        echo "fsync = off"
        echo "synchronous_commit = off"
        echo "full_page_writes = off"
    fi
} >"$NEWCONF"
conf_changed=0
if ! cmp -s "$NEWCONF" "$PG_DATA_DIR/$CONF_NAME"; then
    conf_changed=1
    install -o postgres -g postgres -m 0600 "$NEWCONF" "$PG_DATA_DIR/$CONF_NAME"
    log "wrote $PG_DATA_DIR/$CONF_NAME"
fi
rm -f "$NEWCONF"

# ---------------------------------------------------------------- 4. start
T0=$(now)
DIE_SHOWS_LOG=1
if pid=$(postmaster_pid); then
    if [ "$conf_changed" = 1 ]; then
        log "settings changed: restarting postgres (pid $pid)"
        do_stop
    else
        log "postgres already running (pid $pid)"
    fi
fi
if ! pid=$(postmaster_pid); then
    port_open && die_port_taken
    # Lock files left by a crashed server are stale here (no live postgres holds this data dir and
    # nothing listens on the port). postgres itself would refuse them while the old pid still
    # exists, and a killed postmaster whose parent is PID 1 can stay a zombie for good when PID 1
    # does not reap (as in some sandboxes/containers). The socket lives in the data dir, so its
    # lock file is ours too.
    # Orphaned backends of a killed postmaster exit on their own within moments; wait for them
    # (they are the live processes whose working directory is the data dir).
    for _ in $(seq 1 100); do [ -z "$(procs_in_datadir)" ] && break; sleep 0.1; done
    [ -z "$(procs_in_datadir)" ] || die "processes still run in $PG_DATA_DIR (pids: $(procs_in_datadir | paste -sd ' ')); stop them first"
    for f in "$PG_DATA_DIR/postmaster.pid" "$PG_DATA_DIR"/.s.PGSQL.*.lock; do
        if [ -e "$f" ]; then log "removing stale $f"; rm -f "$f"; fi
    done
    log "starting postgres on 127.0.0.1:$PGPORT (log: $LOGFILE)"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA_DIR" -l "$LOGFILE" -w -t "$PG_WAIT_SECS" start >/dev/null \
        || die "pg_ctl start failed"
    pid=$(postmaster_pid) || die "postgres did not stay up"
    log "postgres started (pid $pid)"
fi
T_START=$(secs "$T0" "$(now)")

# ---------------------------------------------------------------- 5. role + database
T0=$(now)
pg_admin -v user="$PG_USER" -v pass="$PG_PASSWORD" -v db="$PG_DB" <<'SQL' || die "creating role/database failed"
SELECT format('CREATE ROLE %I LOGIN', :'user') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %L', :'user', :'pass') \gexec
-- tests drop their databases WITH (FORCE); an autovacuum worker in one (no role of its own)
-- makes that fail with "must be a member of the role ... or of pg_signal_backend" unless granted
SELECT format('GRANT pg_signal_backend TO %I', :'user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'user') \gexec
SQL
T_SETUP=$(secs "$T0" "$(now)")

# ---------------------------------------------------------------- 6. smoke test over TCP with the password
T0=$(now)
if [ "$PG_SKIP_SMOKE" != 1 ]; then
    out=$(cd / && PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=10 "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$PGPORT" -U "$PG_USER" -d "$PG_DB" 2>&1 <<'SQL'
CREATE TEMP TABLE smoke (body text, tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', body)) STORED);
CREATE INDEX ON smoke USING gin (tsv);
INSERT INTO smoke (body) VALUES ('The quick brown fox jumps'), ('A lazy dog sleeps');
SELECT 'fts=' || count(*) FROM smoke WHERE tsv @@ websearch_to_tsquery('english', 'quick foxes');
SELECT 'user=' || current_user || ' db=' || current_database() || ' ' || split_part(version(), ' ', 2);
SQL
    ) || die "smoke test over 127.0.0.1:$PGPORT as $PG_USER failed: $out"
    echo "$out" | grep -qx 'fts=1' || die "smoke test: unexpected full-text result: $out"
    log "smoke test ok: $(echo "$out" | paste -sd ' ')"
fi
T_SMOKE=$(secs "$T0" "$(now)")

log "TIMING install=${T_INSTALL}s initdb=${T_INITDB}s start=${T_START}s role+db=${T_SETUP}s smoke=${T_SMOKE}s total=$(secs "$T_ALL" "$(now)")s"
log "ready: 127.0.0.1:$PGPORT pid $(postmaster_pid) data $PG_DATA_DIR"
echo "URL: $(url)"
