#!/usr/bin/env bash
# A throw-away, one-node SLURM cluster on this machine, for the harness's
# SLURM tests and for trying preemption by hand.
#
#   bash slurm/local-cluster.sh start    # install if needed, start, wait until the node is idle
#   bash slurm/local-cluster.sh stop     # cancel every job, stop the daemons
#   bash slurm/local-cluster.sh status   # exit 0 if up (prints sinfo), non-zero otherwise
#
# It needs root (it installs Debian packages and runs the daemons as root)
# and works without systemd or cgroups (containers, CI machines).
#
# Everything it writes lives under one folder, $HARNESS_SLURM_DIR
# (default /var/tmp/harness-slurm):
#   etc/slurm.conf  the config (symlinked from /etc/slurm/slurm.conf, so plain
#                   sbatch/squeue/scontrol and submitit find it without SLURM_CONF)
#   munge/          munge key, socket, pid and log (a private munged, so it
#                   never fights with a system one)
#   state/          slurmctld state; spool/: slurmd spool; log/ and run/: logs, pid files
#
# The cluster: partitions `debug` (default, low priority, jobs preemptible by
# requeue after a grace time) and `urgent` (high priority: its jobs preempt
# `debug` jobs) on the single node.
#
# Other settings from the environment:
#   HARNESS_SLURM_GRACE_TIME     seconds a preempted `debug` job keeps running
#                                after the preemption signal (its --signal, e.g.
#                                submitit's USR2, else SIGTERM) before SLURM kills
#                                it (SIGCONT+SIGTERM, SIGKILL 5 s later) and
#                                requeues it (default 30)
#   HARNESS_SLURM_START_TIMEOUT  seconds `start` waits for an idle node (default 60)

set -euo pipefail

DIR="${HARNESS_SLURM_DIR:-/var/tmp/harness-slurm}"
DIR="${DIR%/}"
GRACE_TIME="${HARNESS_SLURM_GRACE_TIME:-30}"
START_TIMEOUT="${HARNESS_SLURM_START_TIMEOUT:-60}"

CONF="$DIR/etc/slurm.conf"
# Slurm clients read this path when SLURM_CONF is not set.
SYSTEM_CONF=/etc/slurm/slurm.conf
MUNGE_DIR="$DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MUNGE_PID="$MUNGE_DIR/munged.pid"
CTLD_PID="$DIR/run/slurmctld.pid"
SLURMD_PID="$DIR/run/slurmd.pid"
# The short host name (uname: `hostname` is not on every minimal image).
NODE="$(uname -n)"
NODE="${NODE%%.*}"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "local-cluster: $*"; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }

usage() {
    cat >&2 <<EOF
usage: bash $0 start|stop|status

  start   install SLURM (Debian packages) if needed and start a one-node
          cluster (partitions: debug [default, preemptible], urgent);
          a no-op if it is already running
  stop    cancel all jobs and stop the daemons; a no-op if already stopped
  status  print the daemons and sinfo; exit 0 if the cluster is up

State, config and logs live in \$HARNESS_SLURM_DIR (now: $DIR).
EOF
    exit 2
}

# --- processes ---------------------------------------------------------------

# proc_alive PID NAME: PID is a live (not zombie) process called NAME.
proc_alive() {
    local pid=$1 name=$2 comm stat
    { read -r comm <"/proc/$pid/comm" && read -r stat <"/proc/$pid/stat"; } 2>/dev/null || return 1
    [[ $comm == "$name" ]] || return 1
    # The field after "(comm)" is the state; Z means it has exited already.
    [[ ${stat##*) } != Z* ]]
}

# pid_alive PIDFILE NAME: the pid in PIDFILE is alive and is really NAME
# (the check on the name guards against a stale pid file whose pid was reused).
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] && proc_alive "$pid" "$name"
}

# stop_pid PIDFILE NAME: SIGTERM, wait for it to exit, SIGKILL after 15 s.
# By pid only, never by name. The daemons delete their own pid file while
# shutting down, so the wait is on the pid, not on the file.
stop_pid() {
    local pidfile=$1 name=$2 pid i
    if ! pid_alive "$pidfile" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        proc_alive "$pid" "$name" || break
        sleep 0.1
    done
    if proc_alive "$pid" "$name"; then
        log "$name ($pid) still running 15 s after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    log "stopped $name ($pid)"
}

# Each running job step has a socket in slurmd's spool folder until its
# slurmstepd has exited.
steps_left() { find "$DIR/spool/slurmd" -maxdepth 1 -type s 2>/dev/null | wc -l; }

# Slurm commands, always pointed at our config (even if /etc/slurm/slurm.conf
# was changed behind our back) and with a short timeout so that polling a dead
# controller fails fast.
sl() { SLURM_CONF="$CONF" timeout 10 "$@"; }

ctld_up() { sl scontrol ping 2>/dev/null | grep -q 'UP'; }

# The node's state in lower case, e.g. idle, mixed, allocated, down*, idle+drain.
node_state() { sl sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 | tr '[:upper:]' '[:lower:]'; }

node_usable() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

cluster_up() {
    pid_alive "$MUNGE_PID" munged && pid_alive "$CTLD_PID" slurmctld &&
        pid_alive "$SLURMD_PID" slurmd && ctld_up && node_usable
}

show_logs() {
    local f
    for f in "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" "$MUNGE_DIR/munged.log"; do
        [[ -f $f ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

# --- install -----------------------------------------------------------------

ensure_installed() {
    local missing=() bin
    for bin in slurmctld slurmd sbatch srun scontrol sinfo squeue scancel munged; do
        command -v "$bin" >/dev/null || missing+=("$bin")
    done
    ((${#missing[@]} == 0)) && return 0

    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    local apt_log="$DIR/log/apt.log"
    mkdir -p "$DIR/log"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have no package lists at all; an old one may have
    # stale lists that point at versions no longer on the mirror: update then.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt_quiet "$apt_log" update
    fi
    # --no-install-recommends: just the daemons and clients, without the
    # extras (docs, mail, MPI libraries) that recommends would bring.
    if ! apt_quiet "$apt_log" install -y --no-install-recommends "${PACKAGES[@]}"; then
        apt_quiet "$apt_log" update
        apt_quiet "$apt_log" install -y --no-install-recommends "${PACKAGES[@]}" ||
            { tail -n 30 "$apt_log" >&2; die "could not install ${PACKAGES[*]} (log: $apt_log)"; }
    fi
}

# apt_quiet LOG ARGS...: apt-get ARGS with its chatter appended to LOG.
apt_quiet() {
    local log_file=$1
    shift
    apt-get -q "$@" >>"$log_file" 2>&1
}

# --- config ------------------------------------------------------------------

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    # Leave ~10% of memory to the OS; SLURM refuses a node that reports less
    # memory than RealMemory.
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)

    mkdir -p "$DIR/etc"
    cat >"$CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh; rewritten on every start.
ClusterName=harness
# Node and controller on the loopback address so that no DNS is needed.
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root

# A private munged (socket in our folder). cred_expire=10: without it a
# requeued job is held ~120 s (the default credential lifetime) before it can
# run again on the same node.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10

StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# No systemd, no cgroups, no accounting daemon: track job processes through
# /proc and do no task binding or accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true

SelectType=select/cons_tres
SelectTypeParameters=CR_Core

# Preemption: jobs in a higher-PriorityTier partition requeue the jobs of a
# lower one. preempt_send_user_signal makes SLURM also send the job's
# --signal (e.g. submitit's USR2) when it is preempted. (In 22.05 this goes
# here: a PreemptParameters= line is an unknown key and stops every daemon.)
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1

# Fast turnaround for tests: short kill wait, quick scheduling passes, and a
# node that was down comes back as soon as its slurmd registers.
KillWait=5
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdTimeout=30
InactiveLimit=0
# Finished jobs stay visible to scontrol show job for 5 minutes.
MinJobAge=300

NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME
PartitionName=urgent Nodes=$NODE Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    mv "$CONF.tmp" "$CONF"

    # Let clients find the config at their default path. A config that is not
    # ours is kept aside rather than overwritten.
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    if [[ -e $SYSTEM_CONF && ! -L $SYSTEM_CONF ]]; then
        log "moving the existing $SYSTEM_CONF to $SYSTEM_CONF.before-harness"
        mv "$SYSTEM_CONF" "$SYSTEM_CONF.before-harness"
    fi
    ln -sfn "$CONF" "$SYSTEM_CONF"
}

# --- daemons -----------------------------------------------------------------

start_munged() {
    pid_alive "$MUNGE_PID" munged && return 0
    # munged runs as the unprivileged munge user that the package created. It
    # refuses a key, socket or log in a folder that others can write to, and a
    # socket folder that others cannot enter (clients need o+x).
    install -d -m 0711 -o munge -g munge "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0400 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$MUNGE_PID"
    runuser -u munge -- /usr/sbin/munged \
        --key-file="$MUNGE_DIR/munge.key" \
        --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGE_PID" \
        --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed"
}

start_daemons() {
    mkdir -p "$DIR/state" "$DIR/spool/slurmd" "$DIR/log" "$DIR/run"
    chmod 0755 "$DIR"
    start_munged
    # -c: start from a clean slate (no jobs left over from an earlier run or a
    # machine that went away with the cluster up), so tests see only their jobs.
    if ! pid_alive "$CTLD_PID" slurmctld; then
        SLURM_CONF="$CONF" /usr/sbin/slurmctld -c
    fi
    if ! pid_alive "$SLURMD_PID" slurmd; then
        SLURM_CONF="$CONF" /usr/sbin/slurmd -c -N "$NODE"
    fi
}

wait_ready() {
    local deadline=$((SECONDS + START_TIMEOUT)) state resumed=0
    while ((SECONDS < deadline)); do
        if ctld_up; then
            state=$(node_state)
            case "$state" in
                idle | mixed | allocated) return 0 ;;
                *drain* | down*)
                    # A node remembered as down/drained comes back here.
                    if ((!resumed)) && pid_alive "$SLURMD_PID" slurmd; then
                        sl scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                        resumed=1
                    fi
                    ;;
            esac
        fi
        for d in "$MUNGE_PID munged" "$CTLD_PID slurmctld" "$SLURMD_PID slurmd"; do
            # shellcheck disable=SC2086
            pid_alive $d || { log "${d#* } is not running"; return 1; }
        done
        sleep 0.2
    done
    log "node state after ${START_TIMEOUT}s: '$(node_state)'"
    return 1
}

# --- commands ----------------------------------------------------------------

cmd_start() {
    if cluster_up; then
        log "already running (config $CONF); nothing to do"
        sl sinfo
        return 0
    fi
    local t0=$EPOCHREALTIME
    ensure_installed
    write_config
    start_daemons
    if ! wait_ready; then
        log "the cluster did not come up"
        show_logs
        exit 1
    fi
    log "up in $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}")s: node $NODE, partitions debug (default) and urgent; state in $DIR"
    sl sinfo
}

cmd_stop() {
    local any=0 i
    for p in "$SLURMD_PID slurmd" "$CTLD_PID slurmctld" "$MUNGE_PID munged"; do
        # shellcheck disable=SC2086
        pid_alive $p && any=1
    done
    if ((!any)); then
        log "not running; nothing to do"
        return 0
    fi
    # Cancel jobs first: slurmstepd and the job processes outlive slurmd, so
    # stopping the daemons alone would leave them running.
    if ctld_up; then
        local jobs
        jobs=$(sl squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086
            sl scancel $jobs >/dev/null 2>&1 || true
        fi
        for ((i = 0; i < 150; i++)); do
            [[ -z $(sl squeue -h -t running,completing,configuring 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    # The job is gone from squeue a moment before its slurmstepd has killed
    # the job's processes and exited: wait for that too (slurmd must still
    # be up for a clean step teardown).
    for ((i = 0; i < 100; i++)); do
        (($(steps_left) == 0)) && break
        sleep 0.2
    done
    (($(steps_left) == 0)) || log "warning: $(steps_left) job step(s) still running after 20 s"
    stop_pid "$SLURMD_PID" slurmd
    stop_pid "$CTLD_PID" slurmctld
    stop_pid "$MUNGE_PID" munged
    log "stopped"
}

cmd_status() {
    local p rc=0
    for p in "$MUNGE_PID munged" "$CTLD_PID slurmctld" "$SLURMD_PID slurmd"; do
        # shellcheck disable=SC2086
        if pid_alive $p; then
            echo "${p#* }: running (pid $(<"${p%% *}"))"
        else
            echo "${p#* }: not running"
            rc=1
        fi
    done
    if ctld_up; then
        sl sinfo || rc=1
        node_usable || { echo "node $NODE is $(node_state)"; rc=1; }
    else
        echo "slurmctld does not answer"
        rc=1
    fi
    return $rc
}

[[ $# -eq 1 ]] || usage
# slurm.conf has no quoting: a path with blanks cannot be written into it.
[[ $DIR == /* && $DIR != *[[:space:]]* ]] ||
    die "HARNESS_SLURM_DIR must be an absolute path without blanks (got '$DIR')"
if [[ $EUID -ne 0 ]]; then
    die "needs root (it installs packages and runs the SLURM daemons as root)"
fi
# The daemons live in /usr/sbin, which a non-login shell may lack in PATH.
export PATH="/usr/sbin:/sbin:$PATH"
case "$1" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) usage ;;
esac
