#!/usr/bin/env bash
# A real single-node SLURM on this machine (Debian 12, root, no systemd), for
# tests/test_slurm.py and for trying experiments/slurm/pong.sbatch.
#
#   bash .ci/slurm.sh install          # apt-get the Debian packages (once; no services start)
#   bash .ci/slurm.sh start            # write slurm.conf, start munged, slurmctld, slurmd
#   bash .ci/slurm.sh status           # daemons, node state, queue
#   bash .ci/slurm.sh stop             # stop the daemons by their PID files
#   bash .ci/slurm.sh install start    # subcommands run in order
#
# Authentication is munge (as on a real cluster): munged runs as the munge user with the
# key the package's postinst made. State, spool, logs and PID files live in
# $GORILA_SLURM_DIR (default /tmp/gorila-slurm); the config goes to /etc/slurm/slurm.conf,
# the path the Slurm tools read by default.
#
# The node advertises CPUs=8 whatever the machine has (SlurmdParameters=config_overrides):
# with the real 2 CPUs `srun -n 3` waits for resources forever. TaskPlugin=task/none pins
# nothing, so the extra CPUs are only bookkeeping.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
STATE_ROOT="${GORILA_SLURM_DIR:-/tmp/gorila-slurm}"
SLURM_CONF=/etc/slurm/slurm.conf
MUNGE_RUN_DIR=/run/munge
MUNGE_PID_FILE="$MUNGE_RUN_DIR/munged.pid"
MUNGE_SOCKET="$MUNGE_RUN_DIR/munge.socket.2"
CTLD_PID_FILE="$STATE_ROOT/slurmctld.pid"
SLURMD_PID_FILE="$STATE_ROOT/slurmd.pid"
POLICY_RC=/usr/sbin/policy-rc.d
START_TIMEOUT_SECONDS="${GORILA_SLURM_START_TIMEOUT:-60}"
NODE_NAME="$(hostname -s)"

say() { printf 'slurm.sh: %s\n' "$*"; }
die() {
    printf 'slurm.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

require_root() {
    [[ "$(id -u)" -eq 0 ]] || die "must run as root (it installs packages and starts daemons); try: sudo bash $0 $*"
}

# ---- install ------------------------------------------------------------------------------

installed() {
    local package
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q '^install ok installed$' ||
            return 1
    done
}

restore_policy_rc() {
    rm -f "$POLICY_RC"
    if [[ -e "$POLICY_RC.gorila-saved" ]]; then
        mv "$POLICY_RC.gorila-saved" "$POLICY_RC"
    fi
}

cmd_install() {
    require_root install
    if installed; then
        say "install: ${PACKAGES[*]} already installed, nothing to do"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install ${PACKAGES[*]} with this system's package manager"
    command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script needs a Debian-like system"
    say "install: apt-get install ${PACKAGES[*]} (services kept from starting by $POLICY_RC)"
    # Exit status 101 from policy-rc.d tells invoke-rc.d not to start services; we start the
    # daemons ourselves, with our config.
    if [[ -e "$POLICY_RC" ]]; then
        mv "$POLICY_RC" "$POLICY_RC.gorila-saved"
    fi
    trap restore_policy_rc EXIT
    printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed: is the package mirror reachable?"
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" ||
        die "apt-get install ${PACKAGES[*]} failed"
    restore_policy_rc
    trap - EXIT
    installed || die "packages still not installed after apt-get: ${PACKAGES[*]}"
    say "install: done ($(dpkg-query -W -f='${Version}' slurmctld 2>/dev/null | sed 's/^/slurm /'))"
}

# ---- daemons ------------------------------------------------------------------------------

pid_alive() {
    local pid_file="$1" pid
    [[ -s "$pid_file" ]] || return 1
    pid="$(<"$pid_file")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

require_installed() {
    local tool
    for tool in slurmctld slurmd munged sinfo; do
        command -v "$tool" >/dev/null 2>&1 || die "SLURM is not installed ($tool missing): run bash $0 install"
    done
}

write_config() {
    mkdir -p /etc/slurm "$STATE_ROOT"/{state,spool,log}
    cat >"$SLURM_CONF" <<EOF
# Written by .ci/slurm.sh: a one-node SLURM for tests. Regenerated on every start.
ClusterName=gorila
SlurmctldHost=$NODE_NAME(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$STATE_ROOT/state
SlurmdSpoolDir=$STATE_ROOT/spool
SlurmctldPidFile=$CTLD_PID_FILE
SlurmdPidFile=$SLURMD_PID_FILE
SlurmctldLogFile=$STATE_ROOT/log/slurmctld.log
SlurmdLogFile=$STATE_ROOT/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# More CPUs than the machine has, so one node runs a server and 2 bundles (see .ci/slurm.sh).
NodeName=$NODE_NAME NodeAddr=127.0.0.1 CPUs=8 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    say "start: wrote $SLURM_CONF (node $NODE_NAME, state in $STATE_ROOT)"
}

start_munged() {
    if pid_alive "$MUNGE_PID_FILE"; then
        say "start: munged already running (pid $(<"$MUNGE_PID_FILE"))"
        return 0
    fi
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing: reinstall munge (bash $0 install)"
    mkdir -p "$MUNGE_RUN_DIR"
    chown munge:munge "$MUNGE_RUN_DIR"
    chmod 755 "$MUNGE_RUN_DIR"
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID_FILE" --socket="$MUNGE_SOCKET" ||
        die "munged did not start (see /var/log/munge/munged.log)"
    say "start: munged started (pid $(<"$MUNGE_PID_FILE"))"
}

start_daemon() {
    local name="$1" pid_file="$2" log_file="$3"
    shift 3
    if pid_alive "$pid_file"; then
        say "start: $name already running (pid $(<"$pid_file"))"
        return 0
    fi
    # Without -D the daemons fork into the background and write their PID files.
    "$@" || die "$name did not start (see $log_file)"
    local waited=0
    until pid_alive "$pid_file"; do
        ((waited++ < 50)) || die "$name wrote no PID file to $pid_file (see $log_file)"
        sleep 0.1
    done
    say "start: $name started (pid $(<"$pid_file"))"
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n 1; }

scheduler_cycles() {
    sdiag 2>/dev/null | awk -F: '/^Main schedule statistics/ {main = 1} main && /Total cycles/ {gsub(/ /, "", $2); print $2; exit}'
}

wait_until_ready() {
    local deadline=$((SECONDS + START_TIMEOUT_SECONDS)) state="" cycles=""
    while ((SECONDS < deadline)); do
        state="$(node_state || true)"
        cycles="$(scheduler_cycles || true)"
        if [[ "$state" == "idle" && "${cycles:-0}" -gt 0 ]]; then
            say "ready: node $NODE_NAME idle, scheduler has run $cycles cycle(s)"
            return 0
        fi
        sleep 0.5
    done
    die "SLURM not ready after ${START_TIMEOUT_SECONDS}s (node state '${state:-unknown}', scheduler cycles '${cycles:-none}'); logs in $STATE_ROOT/log"
}

all_running() {
    pid_alive "$MUNGE_PID_FILE" && pid_alive "$CTLD_PID_FILE" && pid_alive "$SLURMD_PID_FILE"
}

cmd_start() {
    require_root start
    require_installed
    if all_running && [[ -f "$SLURM_CONF" ]]; then
        say "start: already running (slurmctld pid $(<"$CTLD_PID_FILE"), slurmd pid $(<"$SLURMD_PID_FILE")), nothing to do"
        wait_until_ready
        return 0
    fi
    # Rewrite the config only while no Slurm daemon reads it.
    if ! pid_alive "$CTLD_PID_FILE" && ! pid_alive "$SLURMD_PID_FILE"; then
        write_config
    fi
    start_munged
    start_daemon slurmctld "$CTLD_PID_FILE" "$STATE_ROOT/log/slurmctld.log" slurmctld
    start_daemon slurmd "$SLURMD_PID_FILE" "$STATE_ROOT/log/slurmd.log" slurmd -N "$NODE_NAME"
    wait_until_ready
}

stop_by_pid_file() {
    local name="$1" pid_file="$2" pid waited=0
    if ! pid_alive "$pid_file"; then
        say "stop: $name not running"
        rm -f "$pid_file"
        return 0
    fi
    pid="$(<"$pid_file")"
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited++ >= 100)); then
            say "stop: $name (pid $pid) ignored SIGTERM for 10 s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    rm -f "$pid_file"
    say "stop: $name stopped (pid $pid)"
}

cmd_stop() {
    require_root stop
    stop_by_pid_file slurmd "$SLURMD_PID_FILE"
    stop_by_pid_file slurmctld "$CTLD_PID_FILE"
    stop_by_pid_file munged "$MUNGE_PID_FILE"
}

daemon_line() {
    local name="$1" pid_file="$2"
    if pid_alive "$pid_file"; then
        say "status: $name running (pid $(<"$pid_file"))"
    else
        say "status: $name not running"
    fi
}

cmd_status() {
    if ! command -v slurmctld >/dev/null 2>&1; then
        say "status: SLURM is not installed (bash $0 install)"
        return 1
    fi
    daemon_line munged "$MUNGE_PID_FILE"
    daemon_line slurmctld "$CTLD_PID_FILE"
    daemon_line slurmd "$SLURMD_PID_FILE"
    if ! pid_alive "$CTLD_PID_FILE"; then
        return 1
    fi
    say "status: node $NODE_NAME is '$(node_state || true)', scheduler cycles: $(scheduler_cycles || echo '?')"
    sinfo
    squeue
}

[[ $# -gt 0 ]] || usage
for command in "$@"; do
    case "$command" in
        install | start | stop | status) ;;
        -h | --help | help) usage ;;
        *)
            printf 'slurm.sh: error: unknown subcommand %q\n' "$command" >&2
            usage
            ;;
    esac
done
for command in "$@"; do
    "cmd_$command"
done
