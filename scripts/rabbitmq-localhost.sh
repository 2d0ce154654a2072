#!/usr/bin/env bash
# rabbitmq-localhost.sh - install and start a REAL RabbitMQ (AMQP 0-9-1 broker) for tests on
# 127.0.0.1, without systemd, like postgres-localhost.sh and slurm-localhost.sh.
#
# Debian 12 (bookworm): `rabbitmq-server` (3.10) from Debian. Runs as root; the broker runs as the
# `rabbitmq` user, node rabbit@localhost, with its own config and data under $RMQ_DIR (not the
# Debian default node). Everything listens on loopback only: AMQP ($RMQ_PORT), the management
# HTTP API ($RMQ_MGMT_PORT, used by dlhub's manager to create per-user credentials), epmd (4369)
# and Erlang distribution ($RMQ_DIST_PORT). The guest user is deleted; an administrator
# $RMQ_ADMIN_USER / $RMQ_ADMIN_PASSWORD is (re)created.
#
# Idempotent: a second run finds the running broker and leaves it alone (restarts it only if the
# generated config changed), re-asserts the admin user, re-runs the smoke test.
#
# Usage:
#   rabbitmq-localhost.sh            install (if needed), start, create the admin user, smoke-test
#   rabbitmq-localhost.sh --stop     stop the broker
#   rabbitmq-localhost.sh --status   whether it runs, and the URLs
#
# Environment knobs (all optional):
#   RMQ_PORT=5672  RMQ_MGMT_PORT=15672  RMQ_DIST_PORT=25672
#   RMQ_ADMIN_USER=dlhub-admin  RMQ_ADMIN_PASSWORD=dlhub-admin
#   RMQ_DIR=/tmp/dlhub-rabbitmq-$RMQ_PORT   config, data (mnesia) and logs
#   RMQ_WAIT_SECS=90   APT_LOCK_TIMEOUT=600
set -Eeuo pipefail

RMQ_PORT=${RMQ_PORT:-5672}
RMQ_MGMT_PORT=${RMQ_MGMT_PORT:-15672}
RMQ_DIST_PORT=${RMQ_DIST_PORT:-25672}
RMQ_ADMIN_USER=${RMQ_ADMIN_USER:-dlhub-admin}
RMQ_ADMIN_PASSWORD=${RMQ_ADMIN_PASSWORD:-dlhub-admin}
RMQ_DIR=${RMQ_DIR:-/tmp/dlhub-rabbitmq-$RMQ_PORT}
RMQ_WAIT_SECS=${RMQ_WAIT_SECS:-90}
APT_LOCK_TIMEOUT=${APT_LOCK_TIMEOUT:-600}
APT_LOG=/tmp/rabbitmq-localhost-apt.log

log() { echo "[rabbitmq-localhost] $*"; }
die() {
    trap - ERR
    echo "[rabbitmq-localhost] ERROR: $*" >&2
    if [ -d "$RMQ_DIR/log" ]; then
        echo "---- last lines of $RMQ_DIR/log ----" >&2
        tail -n 15 "$RMQ_DIR"/log/*.log 2>/dev/null >&2 || true
    fi
    exit 1
}
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# run a rabbitmq command as user rabbitmq, with this node's environment
as_rmq() {
    (cd / && runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq \
        RABBITMQ_NODENAME=rabbit@localhost \
        RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia" \
        RABBITMQ_LOG_BASE="$RMQ_DIR/log" \
        RABBITMQ_PID_FILE="$RMQ_DIR/rabbit.pid" \
        RABBITMQ_DIST_PORT="$RMQ_DIST_PORT" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        "$@")
}
ctl() { as_rmq rabbitmqctl -q "$@"; }
running() { ctl status >/dev/null 2>&1; }

do_stop() {
    if running; then
        log "stopping rabbit@localhost"
        ctl stop "$RMQ_DIR/rabbit.pid" >/dev/null 2>&1 || ctl stop >/dev/null 2>&1 || true
        log "stopped"
    else
        log "nothing to stop"
    fi
}

case "${1:-}" in
    --stop) [ "$(id -u)" -eq 0 ] || die "must run as root"; do_stop; exit 0 ;;
    --status)
        if running; then
            echo "rabbitmq: running on 127.0.0.1:$RMQ_PORT (management http://127.0.0.1:$RMQ_MGMT_PORT)"
            exit 0
        fi
        echo "rabbitmq: not running"; exit 3 ;;
    "" | --start) ;;
    *) echo "usage: $0 [--start|--stop|--status]   (env: RMQ_PORT, RMQ_MGMT_PORT, RMQ_ADMIN_USER, ...)" >&2; exit 2 ;;
esac

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and runs the broker as user rabbitmq)"
T_ALL=$(now)

# ---------------------------------------------------------------- 1. install
T0=$(now)
if command -v rabbitmq-server >/dev/null && command -v rabbitmqctl >/dev/null; then
    log "rabbitmq-server already installed"
else
    command -v apt-get >/dev/null || die "rabbitmq-server missing and apt-get not found"
    log "installing rabbitmq-server (log: $APT_LOG)"
    export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 NEEDRESTART_MODE=l
    # without systemd (and with a policy-rc.d) the postinst does not start the Debian node
    apt-get -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" install -y -qq --no-install-recommends rabbitmq-server \
        >"$APT_LOG" 2>&1 || {
        apt-get -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" update -qq >>"$APT_LOG" 2>&1 || die "apt-get update failed"
        apt-get -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" install -y -qq --no-install-recommends rabbitmq-server \
            >>"$APT_LOG" 2>&1 || { tail -n 30 "$APT_LOG" >&2; die "apt-get install rabbitmq-server failed"; }
    }
fi
id rabbitmq >/dev/null 2>&1 || die "user 'rabbitmq' missing after install"
T_INSTALL=$(secs "$T0" "$(now)")

# ---------------------------------------------------------------- 2. config
install -d -o rabbitmq -g rabbitmq -m 0750 "$RMQ_DIR" "$RMQ_DIR/mnesia" "$RMQ_DIR/log"
NEWCONF=$(mktemp /tmp/rabbitmq-localhost-conf.XXXXXX)
cat >"$NEWCONF" <<EOF
# Generated by rabbitmq-localhost.sh; rewritten on every run. Loopback only.
listeners.tcp.default = 127.0.0.1:$RMQ_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $RMQ_MGMT_PORT
loopback_users = none
log.file.level = warning
EOF
conf_changed=0
if ! cmp -s "$NEWCONF" "$RMQ_DIR/rabbitmq.conf"; then
    conf_changed=1
    install -o rabbitmq -g rabbitmq -m 0640 "$NEWCONF" "$RMQ_DIR/rabbitmq.conf"
fi
rm -f "$NEWCONF"
echo "[rabbitmq_management]." >"$RMQ_DIR/enabled_plugins"
chown rabbitmq:rabbitmq "$RMQ_DIR/enabled_plugins"

# ---------------------------------------------------------------- 3. start
T0=$(now)
if running && [ "$conf_changed" = 1 ]; then
    log "config changed: restarting"
    do_stop
fi
if running; then
    log "rabbit@localhost already running"
else
    port_open "$RMQ_PORT" && die "127.0.0.1:$RMQ_PORT is already in use by another process; rerun with RMQ_PORT=<free port>"
    log "starting rabbit@localhost on 127.0.0.1:$RMQ_PORT (logs: $RMQ_DIR/log)"
    as_rmq bash -c "nohup rabbitmq-server >'$RMQ_DIR/log/stdout.log' 2>&1 </dev/null &"
    ctl wait --timeout "$RMQ_WAIT_SECS" "$RMQ_DIR/rabbit.pid" >/dev/null 2>&1 || die "rabbitmq did not start"
    ctl await_startup --timeout "$RMQ_WAIT_SECS" >/dev/null || die "rabbitmq did not finish starting"
    log "started"
fi
T_START=$(secs "$T0" "$(now)")

# ---------------------------------------------------------------- 4. admin user
# The list is read into a variable first: `list_users | grep -q` under pipefail fails when grep
# stops reading early (SIGPIPE to the writer), which a long user list makes likely.
users=$(ctl list_users 2>/dev/null | awk '{print $1}') || die "rabbitmqctl list_users failed"
if grep -qx guest <<<"$users"; then ctl delete_user guest >/dev/null; fi
if grep -qx "$RMQ_ADMIN_USER" <<<"$users"; then
    ctl change_password "$RMQ_ADMIN_USER" "$RMQ_ADMIN_PASSWORD" >/dev/null
else
    ctl add_user "$RMQ_ADMIN_USER" "$RMQ_ADMIN_PASSWORD" >/dev/null
fi
ctl set_user_tags "$RMQ_ADMIN_USER" administrator >/dev/null
ctl set_permissions -p / "$RMQ_ADMIN_USER" ".*" ".*" ".*" >/dev/null

# ---------------------------------------------------------------- 5. smoke test (management API)
T0=$(now)
for _ in $(seq 1 "$RMQ_WAIT_SECS"); do port_open "$RMQ_MGMT_PORT" && break; sleep 1; done
python3 - "$RMQ_MGMT_PORT" "$RMQ_ADMIN_USER" "$RMQ_ADMIN_PASSWORD" <<'PY' || die "management API smoke test failed"
import base64, json, sys, urllib.request
port, user, password = sys.argv[1:]
req = urllib.request.Request(f"http://127.0.0.1:{port}/api/overview")
req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
info = json.load(urllib.request.urlopen(req, timeout=10))
print(f"[rabbitmq-localhost] smoke test ok: RabbitMQ {info['rabbitmq_version']}, node {info['node']}")
PY
T_SMOKE=$(secs "$T0" "$(now)")

log "TIMING install=${T_INSTALL}s start=${T_START}s smoke=${T_SMOKE}s total=$(secs "$T_ALL" "$(now)")s"
echo "AMQP: amqp://$RMQ_ADMIN_USER:***@127.0.0.1:$RMQ_PORT/"
echo "MANAGEMENT: http://127.0.0.1:$RMQ_MGMT_PORT/"
