#!/usr/bin/env bash
# A SLURM cluster of N hosts simulated on this one machine (Debian 12, root), for
# tests/test_multihost.py and for trying multi-host runs by hand.
#
#   bash .ci/cluster.sh up                # build it: hosts h1..hN, a controller, links, daemons
#   bash .ci/cluster.sh status            # daemons, links, node states, queue (exit 1: not up)
#   bash .ci/cluster.sh exec HOST [CMD]   # run CMD (default: a shell) on HOST: ctl, h1..hN
#   bash .ci/cluster.sh down              # remove all that up made; safe when nothing is up
#   bash .ci/cluster.sh check             # can a cluster be built here? (exit 1 says why not)
#
# GORILA_CLUSTER_HOSTS=N hosts (default 2); GORILA_CLUSTER_RATE=1gbit limits every host's
# link to that rate in both directions (tc tbf; units bit, kbit, mbit, gbit); state, logs,
# config and PID files in GORILA_CLUSTER_DIR (default /tmp/gorila-cluster).
#
# A host is a Linux network namespace gorila-hK (address 198.18.0.1K; 198.18.0.(10+K) in
# general) with its own hostname hK and hosts file, entered by its slurmd. The controller
# `ctl` (198.18.0.2) runs slurmctld in namespace gorila-ctl and doubles as the login node:
# run srun/sbatch there (`exec ctl srun ...`). Each namespace's eth0 is one end of a veth
# pair whose other end, named after the host (h1, ctl), is a port of the bridge br0 in
# namespace gorila-br: `ip -n gorila-br link set h2 down` cuts host h2 off, `up` brings it
# back. Only 198.18.0.0/24 (for benchmark networks) is used, and only inside these
# namespaces: the machine's own network (root namespace) gets no address, route or link.
#
# Each host also has a disk of its own: LOCAL_DIR (/var/lib/gorila-cluster-local) is, inside
# host hK's mount namespace, a directory only hK sees (kept as $STATE_ROOT/local/hK), so
# a run directory under it is not shared between hosts, as on nodes without a shared file
# system; everything else on the machine is seen by every host.
#
# Its own munged (own socket, key /etc/munge/munge.key), slurmctld and slurmds (own config
# via -f and SLURM_CONF, own ports 6917/6918), so it runs beside .ci/slurm.sh's single-node
# SLURM and neither one's start or stop touches the other.
set -euo pipefail

HOSTS="${GORILA_CLUSTER_HOSTS:-2}"
RATE="${GORILA_CLUSTER_RATE:-}"
LOCAL_DIR=/var/lib/gorila-cluster-local
STATE_ROOT="${GORILA_CLUSTER_DIR:-/tmp/gorila-cluster}"
START_TIMEOUT_SECONDS="${GORILA_CLUSTER_START_TIMEOUT:-60}"
CONF="$STATE_ROOT/slurm.conf"
MARKER="$STATE_ROOT/.made-by-gorila-cluster"
MUNGE_DIR="$STATE_ROOT/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MUNGE_PID_FILE="$MUNGE_DIR/munged.pid"
CTLD_PID_FILE="$STATE_ROOT/pid/slurmctld.pid"
NS_PREFIX=gorila-
BRIDGE_NS=gorila-br
CTL=ctl
CTL_ADDRESS=198.18.0.2
NETWORK_BITS=24
CTLD_PORT=6917
SLURMD_PORT=6918
CPUS_PER_HOST=4
MAX_HOSTS=50

say() { printf 'cluster.sh: %s\n' "$*"; }
die() {
    printf 'cluster.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

# ---- names and addresses -------------------------------------------------------------------

host_names() {
    local k
    for ((k = 1; k <= HOSTS; k++)); do
        printf 'h%d\n' "$k"
    done
}

host_address() {
    local host="$1"
    if [[ "$host" == "$CTL" ]]; then
        printf '%s\n' "$CTL_ADDRESS"
    else
        printf '198.18.0.%d\n' "$((10 + ${host#h}))"
    fi
}

namespace_of() { printf '%s%s\n' "$NS_PREFIX" "$1"; }

slurmd_pid_file() { printf '%s/pid/slurmd-%s.pid\n' "$STATE_ROOT" "$1"; }

# Our namespaces that exist now, whatever N they were made with.
our_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NS_PREFIX}(br|ctl|h[0-9]+)$" || true
}

pid_alive() {
    local pid_file="$1" pid
    [[ -s "$pid_file" ]] || return 1
    pid="$(<"$pid_file")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# ---- checks --------------------------------------------------------------------------------

# Why a cluster cannot be built here (one line), or nothing.
why_not() {
    local tool
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "needs root (network namespaces, daemons); try: sudo bash $0 up"
        return
    fi
    for tool in ip tc nsenter unshare runuser; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            echo "$tool is not installed (iproute2, util-linux)"
            return
        fi
    done
    if ! ip netns list >/dev/null 2>&1; then
        echo "'ip netns' does not work here (iproute2 without netns support?)"
        return
    fi
    for tool in slurmctld slurmd munged sinfo srun sbatch; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            echo "SLURM is not installed ($tool missing): run bash .ci/slurm.sh install"
            return
        fi
    done
    if [[ ! -s /etc/munge/munge.key ]]; then
        echo "/etc/munge/munge.key is missing: reinstall munge (bash .ci/slurm.sh install)"
        return
    fi
}

# Whether this kernel lets us make a network namespace (a container may refuse).
can_make_namespace() {
    local probe="${NS_PREFIX}probe-$$" ok=0
    if ip netns add "$probe" 2>/dev/null; then
        ip -n "$probe" link set lo up 2>/dev/null || ok=1
        ip netns delete "$probe" 2>/dev/null || true
    else
        ok=1
    fi
    return "$ok"
}

cmd_check() {
    local reason
    reason="$(why_not)"
    if [[ -z "$reason" ]] && ! can_make_namespace; then
        reason="cannot create a network namespace here (ip netns add refused: a container without CAP_SYS_ADMIN?)"
    fi
    if [[ -n "$reason" ]]; then
        say "check: no cluster here: $reason"
        return 1
    fi
    say "check: a cluster can be built here"
}

validate_settings() {
    if ! [[ "$HOSTS" =~ ^[1-9][0-9]*$ ]] || ((HOSTS > MAX_HOSTS)); then
        die "GORILA_CLUSTER_HOSTS=$HOSTS: needs a whole number of hosts from 1 to $MAX_HOSTS"
    fi
    if [[ -n "$RATE" ]]; then
        [[ "$RATE" =~ ^[1-9][0-9]*(bit|kbit|mbit|gbit)$ ]] ||
            die "GORILA_CLUSTER_RATE=$RATE: needs a rate like 100mbit or 1gbit (units bit, kbit, mbit, gbit)"
    fi
    [[ "$STATE_ROOT" == /* && "$STATE_ROOT" != / ]] ||
        die "GORILA_CLUSTER_DIR=$STATE_ROOT: needs an absolute path other than /"
}

# ---- up ------------------------------------------------------------------------------------

UP_FINISHED=0

undo_failed_up() {
    local status=$?
    if ((UP_FINISHED == 0)); then
        say "up: failed half way (exit $status): removing what it made" >&2
        cmd_down >&2 || true
    fi
    exit "$status"
}

write_hosts_file() {
    local namespace="$1" host
    mkdir -p "/etc/netns/$namespace"
    {
        printf '# Written by .ci/cluster.sh: the simulated cluster (198.18.0.0/24).\n'
        printf '127.0.0.1\tlocalhost\n'
        printf '::1\tlocalhost ip6-localhost ip6-loopback\n'
        printf '%s\t%s\n' "$CTL_ADDRESS" "$CTL"
        for host in $(host_names); do
            printf '%s\t%s\n' "$(host_address "$host")" "$host"
        done
    } >"/etc/netns/$namespace/hosts"
}

# Burst of the tbf: 10 ms at the rate, at least 32 KiB.
tbf_burst_bytes() {
    local number="${RATE%%[a-z]*}" unit="${RATE##*[0-9]}" bits
    case "$unit" in
        bit) bits=$number ;;
        kbit) bits=$((number * 1000)) ;;
        mbit) bits=$((number * 1000000)) ;;
        gbit) bits=$((number * 1000000000)) ;;
    esac
    local burst=$((bits / 8 / 100))
    ((burst >= 32768)) || burst=32768
    printf '%d\n' "$burst"
}

make_network() {
    local host namespace burst=""
    [[ -z "$RATE" ]] || burst="$(tbf_burst_bytes)"
    ip netns add "$BRIDGE_NS"
    ip -n "$BRIDGE_NS" link set lo up
    ip -n "$BRIDGE_NS" link add br0 type bridge
    ip -n "$BRIDGE_NS" link set br0 up
    for host in "$CTL" $(host_names); do
        namespace="$(namespace_of "$host")"
        ip netns add "$namespace"
        ip -n "$namespace" link set lo up
        # Both ends are made inside namespaces: nothing appears in the root namespace.
        ip -n "$BRIDGE_NS" link add "$host" type veth peer name eth0 netns "$namespace"
        ip -n "$BRIDGE_NS" link set "$host" master br0 up
        ip -n "$namespace" addr add "$(host_address "$host")/$NETWORK_BITS" dev eth0
        ip -n "$namespace" link set eth0 up
        write_hosts_file "$namespace"
        if [[ -n "$RATE" && "$host" != "$CTL" ]]; then
            # Egress of each end: the host's sends and what it receives are both limited.
            tc -n "$namespace" qdisc add dev eth0 root tbf rate "$RATE" burst "$burst" latency 50ms
            tc -n "$BRIDGE_NS" qdisc add dev "$host" root tbf rate "$RATE" burst "$burst" latency 50ms
        fi
    done
    say "up: network: bridge br0 in $BRIDGE_NS, $CTL at $CTL_ADDRESS, hosts $(host_names | tr '\n' ' ')(198.18.0.11..$((10 + HOSTS)))${RATE:+, links limited to $RATE}"
}

start_munged() {
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"
    runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_PID_FILE" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
        </dev/null >"$STATE_ROOT/log/munged.start" 2>&1 ||
        {
            show_logs "$STATE_ROOT/log/munged.start" "$MUNGE_DIR/munged.log"
            die "munged did not start (see $MUNGE_DIR/munged.log)"
        }
    wait_for_pid_file munged "$MUNGE_PID_FILE" "$MUNGE_DIR/munged.log" "$STATE_ROOT/log/munged.start"
}

write_config() {
    local host
    {
        cat <<EOF
# Written by .ci/cluster.sh up: a simulated cluster of $HOSTS host(s) on this machine.
ClusterName=gorilacluster
SlurmctldHost=$CTL($CTL_ADDRESS)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket=$MUNGE_SOCKET
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
# sbatch --wait sleeps 2 s between polls, then 8, then 32, growing only while its sleep is
# below MinJobAge/3: with 12 it stays at 8 s, so a test learns a job ended within 8 s, not
# 32. Finished jobs leave squeue and scontrol show job after about 12 s (default 300).
MinJobAge=12
SlurmdParameters=config_overrides
StateSaveLocation=$STATE_ROOT/state
SlurmdSpoolDir=$STATE_ROOT/spool/%n
SlurmctldPidFile=$CTLD_PID_FILE
SlurmdPidFile=$STATE_ROOT/pid/slurmd-%n.pid
SlurmctldLogFile=$STATE_ROOT/log/slurmctld.log
SlurmdLogFile=$STATE_ROOT/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# $CPUS_PER_HOST CPUs per host whatever the machine has (config_overrides; task/none pins nothing).
EOF
        for host in $(host_names); do
            printf 'NodeName=%s NodeAddr=%s CPUs=%d State=UNKNOWN\n' \
                "$host" "$(host_address "$host")" "$CPUS_PER_HOST"
        done
        printf 'PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n'
    } >"$CONF"
}

wait_for_pid_file() {
    local name="$1" pid_file="$2" log_file="$3" waited=0
    shift 2
    until pid_alive "$pid_file"; do
        if ((waited++ >= 100)); then
            show_logs "$@"
            die "$name wrote no PID file to $pid_file in 10 s (see $log_file)"
        fi
        sleep 0.1
    done
    say "up: $name started (pid $(<"$pid_file"))"
}

# Start a daemon inside host $1's network namespace, with its own hostname and hosts file
# (`ip netns exec` would remount /sys and hide /sys/fs/cgroup, which slurmd needs).
start_in_host() {
    local host="$1" output="$2" namespace
    shift 2
    namespace="$(namespace_of "$host")"
    # The daemon's early complaints (before it logs to its file) go to $output; nothing of
    # it stays attached to our stdout, so a caller reading it sees the end.
    # shellcheck disable=SC2016  # $1, $2 and $@ are the inner shell's
    SLURM_CONF="$CONF" nsenter --net="/run/netns/$namespace" unshare --mount --uts \
        sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && mount --bind "$3" "$4" &&
            shift 4 && exec "$@"' \
        sh "$host" "/etc/netns/$namespace/hosts" "$STATE_ROOT/local/$host" "$LOCAL_DIR" "$@" \
        </dev/null >"$output" 2>&1
}

# The last lines of a daemon's start-up output and log, for a failure message.
show_logs() {
    local file
    for file in "$@"; do
        [[ -s "$file" ]] || continue
        printf 'cluster.sh: --- last lines of %s:\n' "$file" >&2
        tail -n 15 "$file" >&2
    done
}

# Where a host's daemon runs: `exec` enters its namespaces.
daemon_pid_of() {
    local host="$1" pid_file
    if [[ "$host" == "$CTL" ]]; then
        pid_file="$CTLD_PID_FILE"
    else
        pid_file="$(slurmd_pid_file "$host")"
    fi
    pid_alive "$pid_file" || return 1
    cat "$pid_file"
}

in_ctl() { nsenter --target "$(daemon_pid_of "$CTL")" --net --mount --uts env SLURM_CONF="$CONF" "$@"; }

idle_nodes() { in_ctl sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 == "idle" {n++} END {print n + 0}'; }

scheduler_cycles() {
    in_ctl sdiag 2>/dev/null | awk -F: '/^Main schedule statistics/ {main = 1} main && /Total cycles/ {gsub(/ /, "", $2); print $2; exit}'
}

wait_until_ready() {
    local deadline=$((SECONDS + START_TIMEOUT_SECONDS)) idle=0 cycles=""
    while ((SECONDS < deadline)); do
        idle="$(idle_nodes || echo 0)"
        cycles="$(scheduler_cycles || true)"
        if ((idle == HOSTS)) && [[ "${cycles:-0}" -gt 0 ]]; then
            say "up: ready: $idle node(s) idle, scheduler has run $cycles cycle(s)"
            return 0
        fi
        sleep 0.5
    done
    die "cluster not ready after ${START_TIMEOUT_SECONDS}s ($idle of $HOSTS node(s) idle, scheduler cycles '${cycles:-none}'); logs in $STATE_ROOT/log"
}

print_usage_hints() {
    cat <<EOF
cluster.sh: up: $HOSTS host(s) ready. Use it:
  export SLURM_CONF=$CONF       # for SLURM tools run inside the cluster
  bash .ci/cluster.sh exec $CTL srun -N 2 -n 3 -l hostname    # from the login node ($CTL)
  bash .ci/cluster.sh exec $CTL sbatch --nodes 2 --wait job.sbatch
  bash .ci/cluster.sh exec h1 bash                             # a shell on host h1
  ip -n $BRIDGE_NS link set h2 down    # cut host h2's link (then: up)
  bash .ci/cluster.sh status | down
(exec enters the host's network, mount and UTS namespaces, keeps the current directory and
environment, and sets SLURM_CONF; the root namespace cannot reach 198.18.0.0/24.)
EOF
}

cmd_up() {
    local host reason wanted="$HOSTS"
    validate_settings
    reason="$(why_not)"
    [[ -z "$reason" ]] || die "up: $reason"
    if [[ -n "$(our_namespaces)" || -e "$MARKER" ]]; then
        if cmd_status >/dev/null 2>&1; then
            # cmd_status read the number of hosts of the cluster that is up.
            ((HOSTS == wanted)) ||
                die "up: a cluster of $HOSTS host(s) is up, not $wanted: run bash $0 down first"
            say "up: already up with $HOSTS host(s), nothing to do (bash $0 status)"
            return 0
        fi
        die "up: a cluster (or what is left of one) is here but not healthy: run bash $0 down first"
    fi
    UP_FINISHED=0
    trap undo_failed_up EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    mkdir -p "$STATE_ROOT"
    touch "$MARKER"
    printf '%d\n' "$HOSTS" >"$STATE_ROOT/hosts"
    mkdir -p "$STATE_ROOT"/{state,spool,log,pid}
    for host in $(host_names) "$CTL"; do
        mkdir -p "$STATE_ROOT/spool/$host" "$STATE_ROOT/local/$host"
    done
    if [[ ! -d "$LOCAL_DIR" ]]; then
        mkdir -p "$LOCAL_DIR"
        touch "$STATE_ROOT/made-local-dir"  # down removes the (empty) mount point again
    fi
    if [[ ! -d /etc/netns ]]; then
        touch "$STATE_ROOT/made-etc-netns"  # down removes /etc/netns again, if empty
    fi
    make_network
    start_munged
    write_config
    say "up: wrote $CONF"
    local log="$STATE_ROOT/log/slurmctld.log" early="$STATE_ROOT/log/slurmctld.start"
    start_in_host "$CTL" "$early" slurmctld -f "$CONF" ||
        { show_logs "$early" "$log"; die "slurmctld did not start (see $log)"; }
    wait_for_pid_file slurmctld "$CTLD_PID_FILE" "$log" "$early"
    for host in $(host_names); do
        log="$STATE_ROOT/log/slurmd-$host.log"
        early="$STATE_ROOT/log/slurmd-$host.start"
        start_in_host "$host" "$early" slurmd -f "$CONF" -N "$host" ||
            { show_logs "$early" "$log"; die "slurmd on $host did not start (see $log)"; }
        wait_for_pid_file "slurmd on $host" "$(slurmd_pid_file "$host")" "$log" "$early"
    done
    wait_until_ready
    UP_FINISHED=1
    trap - EXIT INT TERM
    print_usage_hints
}

# ---- down ----------------------------------------------------------------------------------

daemon_name() {
    local file="${1##*/}"
    file="${file%.pid}"
    case "$file" in
        slurmd-*) printf 'slurmd on %s\n' "${file#slurmd-}" ;;
        *) printf '%s\n' "$file" ;;
    esac
}

# Stop the daemons of these PID files all at once: SIGTERM, SIGKILL after 10 s.
stop_by_pid_files() {
    local pid_file i waited=0 pids=() files=()
    for pid_file in "$@"; do
        if pid_alive "$pid_file"; then
            pids+=("$(<"$pid_file")")
            files+=("$pid_file")
            kill -TERM "${pids[-1]}" 2>/dev/null || true
        else
            rm -f "$pid_file"
        fi
    done
    for i in "${!pids[@]}"; do
        while kill -0 "${pids[i]}" 2>/dev/null; do
            if ((waited++ >= 100)); then
                say "down: $(daemon_name "${files[i]}") (pid ${pids[i]}) ignored SIGTERM for 10 s, sending SIGKILL"
                kill -KILL "${pids[i]}" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
        rm -f "${files[i]}"
        say "down: $(daemon_name "${files[i]}") stopped (pid ${pids[i]})"
    done
}

# Jobs still in the queue: cancel them while slurmctld and the slurmds can still end them.
cancel_jobs() {
    local jobs waited=0
    daemon_pid_of "$CTL" >/dev/null || return 0
    jobs="$(in_ctl squeue -h -o %A 2>/dev/null | tr '\n' ' ')"
    [[ -n "${jobs// /}" ]] || return 0
    say "down: cancelling job(s) $jobs"
    # shellcheck disable=SC2086
    in_ctl scancel $jobs 2>/dev/null || true
    while [[ -n "$(in_ctl squeue -h -o %A 2>/dev/null)" ]] && ((waited++ < 20)); do
        sleep 0.5
    done
}

# Whatever still runs in one of our namespaces (job steps, tasks) is ours: stop it by pid.
stop_namespace_processes() {
    local namespace="$1" pids round
    for round in TERM TERM TERM KILL; do
        pids="$(ip netns pids "$namespace" 2>/dev/null | tr '\n' ' ')"
        [[ -n "${pids// /}" ]] || return 0
        if [[ "$round" == KILL ]]; then
            say "down: killing what is left in $namespace (pids $pids)"
        fi
        # shellcheck disable=SC2086
        kill "-$round" $pids 2>/dev/null || true
        sleep 1
    done
}

cmd_down() {
    local namespace
    if [[ "$(id -u)" -ne 0 ]]; then
        die "down: needs root"
    fi
    [[ "$STATE_ROOT" == /* && "$STATE_ROOT" != / ]] ||
        die "GORILA_CLUSTER_DIR=$STATE_ROOT: needs an absolute path other than /"
    cancel_jobs
    shopt -s nullglob
    stop_by_pid_files "$STATE_ROOT"/pid/slurmd-*.pid "$CTLD_PID_FILE"
    shopt -u nullglob
    for namespace in $(our_namespaces); do
        stop_namespace_processes "$namespace"
        ip netns delete "$namespace"
        rm -rf "/etc/netns/${namespace:?}"
        say "down: removed namespace $namespace"
    done
    stop_by_pid_files "$MUNGE_PID_FILE"
    if [[ -e "$STATE_ROOT/made-etc-netns" ]]; then
        rmdir /etc/netns 2>/dev/null || true
    fi
    if [[ -e "$STATE_ROOT/made-local-dir" ]]; then
        rmdir "$LOCAL_DIR" 2>/dev/null || true
    fi
    if [[ -e "$MARKER" ]]; then
        rm -rf "${STATE_ROOT:?}"
        say "down: removed $STATE_ROOT"
    elif [[ -e "$STATE_ROOT" ]]; then
        say "down: left $STATE_ROOT alone (not made by this script: no $MARKER)"
    fi
    say "down: nothing of the cluster is left"
}

# ---- status and exec -----------------------------------------------------------------------

daemon_line() {
    local name="$1" pid_file="$2"
    if pid_alive "$pid_file"; then
        say "status: $name running (pid $(<"$pid_file"))"
    else
        say "status: $name not running"
        return 1
    fi
}

cmd_status() {
    local host healthy=0 namespaces
    namespaces="$(our_namespaces | tr '\n' ' ')"
    if [[ -z "$namespaces" && ! -e "$MARKER" ]]; then
        say "status: no cluster is up (bash $0 up)"
        return 1
    fi
    if [[ -s "$STATE_ROOT/hosts" ]]; then
        HOSTS="$(<"$STATE_ROOT/hosts")"
    fi
    say "status: $HOSTS host(s); namespaces: ${namespaces:-none}"
    daemon_line munged "$MUNGE_PID_FILE" || healthy=1
    daemon_line slurmctld "$CTLD_PID_FILE" || healthy=1
    for host in $(host_names); do
        daemon_line "slurmd on $host" "$(slurmd_pid_file "$host")" || healthy=1
    done
    if ip netns list 2>/dev/null | grep -q "^$BRIDGE_NS\b"; then
        say "status: links (bridge ports in $BRIDGE_NS):"
        ip -n "$BRIDGE_NS" -br link show master br0 || true
        tc -n "$BRIDGE_NS" qdisc show 2>/dev/null | grep tbf || true
    else
        say "status: no bridge namespace $BRIDGE_NS"
        healthy=1
    fi
    if daemon_pid_of "$CTL" >/dev/null; then
        say "status: SLURM_CONF=$CONF; nodes and queue:"
        in_ctl sinfo -N -o '%N %T %C %o' || healthy=1
        in_ctl squeue || true
    fi
    return "$healthy"
}

cmd_exec() {
    local host="${1:-}" pid
    [[ -n "$host" ]] || die "exec: which host? ($CTL, h1..hN)"
    shift
    if [[ -s "$STATE_ROOT/hosts" ]]; then
        HOSTS="$(<"$STATE_ROOT/hosts")"
    fi
    pid="$(daemon_pid_of "$host")" ||
        die "exec: no host $host is up (hosts: $CTL $(host_names | tr '\n' ' ')- bash $0 status)"
    (($# > 0)) || set -- "${SHELL:-/bin/bash}"
    exec nsenter --target "$pid" --net --mount --uts --wd="$PWD" env SLURM_CONF="$CONF" "$@"
}

[[ $# -gt 0 ]] || usage
case "$1" in
    up | down | status | check)
        [[ $# -eq 1 ]] || usage
        "cmd_$1"
        ;;
    exec)
        shift
        cmd_exec "$@"
        ;;
    -h | --help | help) usage ;;
    *)
        printf 'cluster.sh: error: unknown subcommand %q\n' "$1" >&2
        usage
        ;;
esac
