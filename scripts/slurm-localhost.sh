#!/usr/bin/env bash
# slurm-localhost.sh - install and start a REAL single-node Slurm cluster on localhost for the
# cluster tests (tests/cluster/): munged + MariaDB + slurmdbd + slurmctld + slurmd, so that
# sbatch/squeue/scancel work and `sacct` reports why a job ended (COMPLETED, CANCELLED, TIMEOUT...).
# No systemd, no cgroups. Also installs Debian's slurm-wlm-torque (qsub/qstat/qdel wrappers
# around Slurm) when it installs cleanly; that part is optional and never fails the script.
#
# Debian 12 (bookworm) packages: slurm 22.05.8, munge 0.5.15, MariaDB 10.11. Runs as root.
# Idempotent: a re-run finds the running daemons through their pid files and leaves them alone
# (restarting the Slurm daemons only if a generated config changed); when everything is already
# up it only checks `sinfo`/`sacct` (well under a second). The daemons keep running after it
# exits. On failure it prints "[slurm-localhost] ERROR: ..." plus the last log lines and exits 1.
#
# Usage:
#   scripts/slurm-localhost.sh            install (if needed), configure, start, check
#   scripts/slurm-localhost.sh --smoke    same, and always run the srun/sbatch/scancel/sacct smoke test
#   scripts/slurm-localhost.sh --status   show daemon pids and sinfo
#   scripts/slurm-localhost.sh --stop     stop the daemons this script started (by their recorded pids)
#
# Environment knobs (all optional):
#   SLURM_PARTITION=debug         partition name (Default=YES, MaxTime=INFINITE)
#   SLURM_CLUSTER_NAME=localcluster
#   SLURM_WAIT_SECS=60            how long to wait for each daemon / the node to come up
#   SLURM_TORQUE=1                try to install slurm-wlm-torque (0: don't)
#   APT_LOCK_TIMEOUT=600          seconds apt-get waits for the dpkg lock
#
# Slurm settings chosen for tests (see also docs in tests/cluster/):
#   SchedulerParameters=batch_sched_delay=0   sbatch jobs start in ~0.5 s instead of on a 3 s tick
#   OverTimeLimit=0, KillWait=2               a job is signalled at its time limit and killed 2 s later
#   MinJobAge=600                             finished jobs stay visible to scontrol/squeue -t all
#   the partition has no MaxTime / DefaultTime floor, so 1-minute jobs are fine
#
# Everything lives in standard system paths: /etc/slurm/{slurm,slurmdbd}.conf, /etc/munge/munge.key,
# /run/{munge,slurm,mysqld}, /var/spool/slurm{ctld,d}, /var/log/slurm, /var/lib/mysql.
set -Eeuo pipefail

PARTITION=${SLURM_PARTITION:-debug}
CLUSTER=${SLURM_CLUSTER_NAME:-localcluster}
WAIT_SECS=${SLURM_WAIT_SECS:-60}
WANT_TORQUE=${SLURM_TORQUE:-1}
APT_LOCK_TIMEOUT=${APT_LOCK_TIMEOUT:-600}

CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurm/slurmctld.pid
SLURMD_PID=/run/slurm/slurmd.pid
DBD_PID=/run/slurm/slurmdbd.pid
MYSQL_PID=/run/mysqld/mysqld.pid
MYSQL_SOCK=/run/mysqld/mysqld.sock
LOGDIR=/var/log/slurm
APTLOG=/tmp/slurm-localhost-apt.log
# copies of the pids of the daemons THIS script started; --stop only stops those
MARK=/run/slurm-localhost
# remembers a failed slurm-wlm-torque install so that re-runs stay fast
TORQUE_FAILED=/var/lib/slurm-localhost/torque-install-failed
# local-only DB password: MariaDB runs with --skip-networking (unix socket only)
DB_PASS=slurmdbd-localhost

log() { echo "[slurm-localhost] $*"; }
die() {
    trap - ERR
    echo "[slurm-localhost] ERROR: $*" >&2
    echo "[slurm-localhost] ERROR: Slurm is NOT usable; the cluster tests (tests/cluster) will fail." >&2
    for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" "$LOGDIR/slurmdbd.log" /var/log/mysql/error.log; do
        if [ -s "$f" ] && [ -r "$f" ]; then echo "---- last lines of $f ----" >&2; tail -n 12 "$f" >&2; fi
    done
    exit 1
}
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# proc_live PID: the process exists and is not a zombie (a killed daemon stays a zombie until
# PID 1 reaps it, and PID 1 in a container/sandbox may be slow to do so)
proc_live() {
    local st
    st=$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# pid_alive PIDFILE COMM -> prints the pid and returns 0 if PIDFILE names a live process named COMM
pid_alive() {
    local pidfile=$1 comm=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] && proc_live "$pid" || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
    echo "$pid"
}

# stop_by_pidfile PIDFILE COMM: SIGTERM the pid in PIDFILE (only if it really is COMM), wait, then SIGKILL
stop_by_pidfile() {
    local pidfile=$1 comm=$2 pid
    if pid=$(pid_alive "$pidfile" "$comm"); then
        log "stopping $comm (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 150); do proc_live "$pid" || break; sleep 0.1; done
        if proc_live "$pid"; then
            log "$comm (pid $pid) still alive after 15s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    else
        log "$comm: nothing to stop (no live pid in $pidfile)"
    fi
    rm -f "$pidfile"
}

# started NAME PIDFILE COMM: wait for the daemon's own pid file, then remember the pid as ours
started() {
    local name=$1 pidfile=$2 comm=$3 pid
    wait_for "$WAIT_SECS" pid_alive "$pidfile" "$comm" || die "$comm did not write a live pid to $pidfile"
    pid=$(pid_alive "$pidfile" "$comm")
    install -d -m 0755 "$MARK"
    echo "$pid" >"$MARK/$name.pid"
    log "$comm started (pid $pid)"
}

# wait_for SECONDS CMD...: poll CMD every 0.1 s until it succeeds
wait_for() {
    local limit=$1
    shift
    for _ in $(seq 1 $((limit * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}

do_stop() {
    # stops only daemons whose pid this script recorded in $MARK when it started them
    if pid_alive "$MARK/slurmctld.pid" slurmctld >/dev/null; then
        # cancel leftover jobs so no slurmstepd / job processes outlive slurmd
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
        for _ in $(seq 1 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    stop_by_pidfile "$MARK/slurmd.pid" slurmd
    stop_by_pidfile "$MARK/slurmctld.pid" slurmctld
    stop_by_pidfile "$MARK/slurmdbd.pid" slurmdbd
    stop_by_pidfile "$MARK/mariadbd.pid" mariadbd
    stop_by_pidfile "$MARK/munged.pid" munged
}

do_status() {
    local p pid
    for p in "$MUNGE_PID:munged" "$MYSQL_PID:mariadbd" "$DBD_PID:slurmdbd" "$CTLD_PID:slurmctld" "$SLURMD_PID:slurmd"; do
        if pid=$(pid_alive "${p%%:*}" "${p##*:}"); then echo "${p##*:}: running (pid $pid)"; else echo "${p##*:}: not running"; fi
    done
    if command -v qsub >/dev/null 2>&1; then echo "slurm-wlm-torque: installed ($(command -v qsub))"; else echo "slurm-wlm-torque: not installed"; fi
    sinfo 2>/dev/null || true
}

FORCE_SMOKE=0
case "${1:-}" in
    --stop) do_stop; exit 0 ;;
    --status) do_status; exit 0 ;;
    --smoke) FORCE_SMOKE=1 ;;
    "" | --start) ;;
    *) echo "usage: $0 [--start|--smoke|--stop|--status]" >&2; exit 2 ;;
esac

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts system daemons)"
command -v apt-get >/dev/null || die "apt-get not found (this script is for Debian 12)"
T_ALL=$(now)
# anything started or reconfigured in this run -> run the smoke test at the end
changed=0

apt_get() {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" "$@"
}

# ---------------------------------------------------------------- 1. install
T0=$(now)
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
BINS="/usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/sacct /usr/sbin/munged /usr/bin/munge
      /usr/sbin/slurmdbd /usr/sbin/mariadbd /usr/bin/mariadb-admin"
need_install=0
for b in $BINS; do [ -x "$b" ] || need_install=1; done
apt_updated=0
if [ "$need_install" = 1 ]; then
    changed=1
    log "installing $PKGS (apt-get)"
    apt_get update -qq >"$APTLOG" 2>&1 || { tail -n 20 "$APTLOG" >&2; die "apt-get update failed"; }
    apt_updated=1
    # Without systemd the postinst scripts cannot start the services (a policy-rc.d, if present,
    # forbids it anyway). We start the daemons ourselves below.
    # shellcheck disable=SC2086
    apt_get install -y -qq --no-install-recommends $PKGS >>"$APTLOG" 2>&1 \
        || { tail -n 30 "$APTLOG" >&2; die "apt-get install failed (log: $APTLOG)"; }
    for b in $BINS; do [ -x "$b" ] || die "$b missing after apt-get install"; done
else
    log "packages already installed ($PKGS)"
fi

# optional: qsub/qstat/qdel/pbsnodes wrappers around Slurm (Debian's slurm-wlm-torque)
TORQUE="not requested"
if [ "$WANT_TORQUE" = 1 ]; then
    if command -v qsub >/dev/null 2>&1 && dpkg -s slurm-wlm-torque >/dev/null 2>&1; then
        TORQUE="installed"
    elif [ -e "$TORQUE_FAILED" ]; then
        TORQUE="install failed earlier (see $TORQUE_FAILED; delete it to retry)"
    else
        log "installing slurm-wlm-torque (optional qsub/qstat wrappers)"
        if { [ "$apt_updated" = 1 ] || apt_get update -qq >>"$APTLOG" 2>&1; } \
            && apt_get install -y -qq --no-install-recommends slurm-wlm-torque >>"$APTLOG" 2>&1 \
            && command -v qsub >/dev/null 2>&1; then
            TORQUE="installed"
        else
            install -d -m 0755 "$(dirname "$TORQUE_FAILED")"
            tail -n 30 "$APTLOG" >"$TORQUE_FAILED" 2>/dev/null || true
            TORQUE="install FAILED (optional; log: $APTLOG)"
            log "WARNING: slurm-wlm-torque did not install; continuing without qsub/qstat"
        fi
    fi
fi
T_INSTALL=$(secs "$T0" "$(now)")

# ---------------------------------------------------------------- 2. munge key + directories
T0=$(now)
id munge >/dev/null 2>&1 || die "user 'munge' missing (munge package broken?)"
id slurm >/dev/null 2>&1 || die "user 'slurm' missing (slurm package broken?)"
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0600 /etc/munge/munge.key
install -d -o slurm -g slurm -m 0755 /run/slurm /var/spool/slurmctld "$LOGDIR"
install -d -o root -g root -m 0755 /var/spool/slurmd /etc/slurm

# ---------------------------------------------------------------- 3. slurm.conf
NODE=$(hostname -s)
[ -n "$NODE" ] || die "hostname -s is empty"
NODELINE=$(slurmd -C 2>/dev/null | grep '^NodeName=' | head -n 1) || true
[ -n "$NODELINE" ] || die "'slurmd -C' did not print a NodeName line"
case "$NODELINE" in "NodeName=$NODE "*) ;; *) die "slurmd -C node name does not match hostname -s ($NODE): $NODELINE" ;; esac

NEWCONF=$(mktemp /tmp/slurm-localhost-conf.XXXXXX)
cat >"$NEWCONF" <<EOF
# Generated by scripts/slurm-localhost.sh: single-node Slurm on localhost, no systemd, no cgroups.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroups / no systemd needed:
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# accounting through slurmdbd (MariaDB), so sacct reports how each job ended
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# default batch_sched_delay=3 batches sbatch scheduling into 3 s ticks; 0 starts jobs sooner
SchedulerParameters=batch_sched_delay=0
# time limits act promptly: no grace minutes, SIGKILL 2 s after the SIGTERM
OverTimeLimit=0
KillWait=2
# finished jobs stay visible to scontrol for 10 minutes (sacct keeps them for good)
MinJobAge=600
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$NODELINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE DefaultTime=01:00:00 State=UP
EOF
conf_changed=0
if ! cmp -s "$NEWCONF" "$CONF"; then
    conf_changed=1
    changed=1
    [ -f "$CONF" ] && cp -p "$CONF" "$CONF.bak.$(date +%Y%m%d%H%M%S)"
    install -o root -g root -m 0644 "$NEWCONF" "$CONF"
    log "wrote $CONF"
fi
rm -f "$NEWCONF"

if [ "$conf_changed" = 1 ]; then
    # running daemons would keep the old config: restart them (only those identified by pid file)
    if pid_alive "$SLURMD_PID" slurmd >/dev/null || pid_alive "$CTLD_PID" slurmctld >/dev/null; then
        log "slurm.conf changed: restarting slurmd/slurmctld"
        stop_by_pidfile "$SLURMD_PID" slurmd
        stop_by_pidfile "$CTLD_PID" slurmctld
        rm -f "$MARK/slurmd.pid" "$MARK/slurmctld.pid"
    fi
fi

# ---------------------------------------------------------------- 4. start daemons
if pid=$(pid_alive "$MUNGE_PID" munged); then
    log "munged already running (pid $pid)"
else
    changed=1
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
    started munged "$MUNGE_PID" munged
fi
munge_ok() { munge -n | unmunge; }
wait_for 10 munge_ok || die "munge credential round-trip (munge -n | unmunge) failed"

# MariaDB, unix socket only
install -d -o mysql -g mysql -m 0755 /run/mysqld /var/log/mysql
if [ ! -d /var/lib/mysql/mysql ]; then
    log "initialising MariaDB data dir"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/tmp/slurm-localhost-mariadb-init.log 2>&1 \
        || die "mariadb-install-db failed (log: /tmp/slurm-localhost-mariadb-init.log)"
fi
db_started=0
if pid=$(pid_alive "$MYSQL_PID" mariadbd); then
    log "mariadbd already running (pid $pid)"
else
    changed=1
    db_started=1
    log "starting mariadbd (--skip-networking)"
    setsid -f runuser -u mysql -- /usr/sbin/mariadbd --skip-networking --socket="$MYSQL_SOCK" \
        --pid-file="$MYSQL_PID" --log-error=/var/log/mysql/error.log </dev/null >/dev/null 2>&1
    started mariadbd "$MYSQL_PID" mariadbd
fi
wait_for "$WAIT_SECS" mariadb-admin --socket="$MYSQL_SOCK" ping \
    || die "mariadbd did not answer within ${WAIT_SECS}s (see /var/log/mysql/error.log)"
if [ "$db_started" = 1 ] || ! pid_alive "$DBD_PID" slurmdbd >/dev/null; then
    # CREATE USER IF NOT EXISTS keeps an old password, hence the ALTER USER
    mariadb --socket="$MYSQL_SOCK" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost';
        ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" \
        || die "could not create the MariaDB user for slurmdbd"
fi

NEWDBD=$(mktemp /tmp/slurm-localhost-dbd.XXXXXX)
cat >"$NEWDBD" <<EOF
# Generated by scripts/slurm-localhost.sh
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
PidFile=$DBD_PID
LogFile=$LOGDIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
if ! cmp -s "$NEWDBD" "$DBDCONF"; then
    changed=1
    install -o slurm -g slurm -m 0600 "$NEWDBD" "$DBDCONF" # slurmdbd refuses a world-readable file
    log "wrote $DBDCONF"
    if pid_alive "$DBD_PID" slurmdbd >/dev/null; then
        stop_by_pidfile "$DBD_PID" slurmdbd
        rm -f "$MARK/slurmdbd.pid"
    fi
fi
rm -f "$NEWDBD"
if pid=$(pid_alive "$DBD_PID" slurmdbd); then
    log "slurmdbd already running (pid $pid)"
else
    changed=1
    log "starting slurmdbd"
    /usr/sbin/slurmdbd || die "slurmdbd failed to start"
    started slurmdbd "$DBD_PID" slurmdbd
fi
# slurmdbd must be up before slurmctld so that the cluster registers at once
wait_for "$WAIT_SECS" sacctmgr -n list cluster || die "slurmdbd did not answer within ${WAIT_SECS}s"

if pid=$(pid_alive "$CTLD_PID" slurmctld); then
    log "slurmctld already running (pid $pid)"
else
    changed=1
    log "starting slurmctld"
    /usr/sbin/slurmctld || die "slurmctld failed to start"
    started slurmctld "$CTLD_PID" slurmctld
fi
ctld_up() { scontrol ping | grep -q 'is UP'; }
wait_for "$WAIT_SECS" ctld_up || die "slurmctld did not answer 'scontrol ping' within ${WAIT_SECS}s"

if pid=$(pid_alive "$SLURMD_PID" slurmd); then
    log "slurmd already running (pid $pid)"
else
    changed=1
    log "starting slurmd"
    /usr/sbin/slurmd || die "slurmd failed to start"
    started slurmd "$SLURMD_PID" slurmd
fi
ok=0 state=
for _ in $(seq 1 $((WAIT_SECS * 5))); do
    state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n 1) || true
    case "$state" in
        idle | mixed | allocated | completing) ok=1; break ;;
        down* | drain* | fail*)
            # e.g. left DOWN by an earlier unclean stop
            scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
            ;;
    esac
    sleep 0.2
done
[ "$ok" = 1 ] || die "node $NODE did not become usable within ${WAIT_SECS}s (state: ${state:-none}; $(scontrol show node "$NODE" 2>/dev/null | grep -o 'Reason=.*' || true))"
wait_for "$WAIT_SECS" sacct -X -n || die "sacct still fails with slurmdbd running"
T_START=$(secs "$T0" "$(now)")
log "cluster up: $(sinfo -h -o '%P %a %l %D %T %N' | tr '\n' ' ')"

# ---------------------------------------------------------------- 5. smoke test
T_SRUN=n/a T_QUEUE=n/a T_RUNSTART=n/a SMOKE_RESULT="skipped (nothing changed; --smoke forces it)"
if [ "$changed" = 1 ] || [ "$FORCE_SMOKE" = 1 ]; then
    SMOKE=$(mktemp -d /tmp/slurm-localhost-smoke.XXXXXX)
    chmod 0755 "$SMOKE"
    T0=$(now)
    out=$(timeout 60 srun -N1 -n1 -t 1 hostname) || die "srun hostname failed"
    T_SRUN=$(secs "$T0" "$(now)")s
    [ "$out" = "$(hostname)" ] || [ "$out" = "$NODE" ] || die "srun hostname printed '$out'"

    T0=$(now)
    jid=$(sbatch --parsable -J slurm-localhost-smoke -t 1 -o "$SMOKE/job-%j.out" \
        --wrap 'date +%s.%N; sleep 1; echo ok') || die "sbatch failed"
    st=PENDING
    for _ in $(seq 1 $((WAIT_SECS * 20))); do
        st=$(squeue -h -j "$jid" -o %T 2>/dev/null) || true
        [ "$st" = PENDING ] || break
        sleep 0.05
    done
    T_QUEUE=$(secs "$T0" "$(now)")s
    [ "$st" != PENDING ] || die "job $jid still PENDING after ${WAIT_SECS}s"
    job_ok() { grep -q '^ok$' "$SMOKE/job-$jid.out"; }
    wait_for "$WAIT_SECS" job_ok || die "batch job $jid did not print 'ok' (out: $(cat "$SMOKE/job-$jid.out" 2>/dev/null || true))"
    T_RUNSTART=$(secs "$T0" "$(head -n 1 "$SMOKE/job-$jid.out")")s

    jid2=$(sbatch --parsable -J slurm-localhost-smoke -t 1 -o /dev/null --wrap 'sleep 300') || die "sbatch (for scancel) failed"
    scancel "$jid2" || die "scancel failed"
    cancelled() { scontrol show job "$jid2" | grep -q 'JobState=CANCELLED'; }
    wait_for 10 cancelled || die "job $jid2 not CANCELLED after scancel"

    acct_done() { sacct -X -n -j "$jid" -o state | grep -q COMPLETED; }
    wait_for 30 acct_done || die "sacct does not show job $jid as COMPLETED"
    acct_cancel() { sacct -X -n -j "$jid2" -o state | grep -q CANCELLED; }
    wait_for 30 acct_cancel || die "sacct does not show job $jid2 as CANCELLED"
    rm -rf "$SMOKE"
    SMOKE_RESULT="ok: srun, sbatch (job $jid), squeue, scancel (job $jid2), sacct (COMPLETED, CANCELLED)"
    log "smoke test $SMOKE_RESULT"
fi

PIDS="munged=$(pid_alive "$MUNGE_PID" munged || true) mariadbd=$(pid_alive "$MYSQL_PID" mariadbd || true)"
PIDS="$PIDS slurmdbd=$(pid_alive "$DBD_PID" slurmdbd || true) slurmctld=$(pid_alive "$CTLD_PID" slurmctld || true)"
PIDS="$PIDS slurmd=$(pid_alive "$SLURMD_PID" slurmd || true)"
cat <<EOF
[slurm-localhost] READY  node=$NODE partition=$PARTITION (default)  $(slurmd -V)  accounting=slurmdbd
[slurm-localhost] slurm-wlm-torque (qsub/qstat): $TORQUE
[slurm-localhost] pids: $PIDS
[slurm-localhost] TIMING install=${T_INSTALL}s start(daemons -> node idle, sacct ok)=${T_START}s srun_hostname=${T_SRUN} sbatch->not_PENDING=${T_QUEUE} sbatch->script_running=${T_RUNSTART} total=$(secs "$T_ALL" "$(now)")s
EOF
