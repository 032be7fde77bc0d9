#!/usr/bin/env bash
# A throw-away SLURM cluster on this machine, for the harness's SLURM tests
# and for trying preemption by hand: one node (the machine itself), or N
# nodes that are network namespaces on a bridge.
#
#   bash slurm/local-cluster.sh start              # install if needed, start, wait until the node is idle
#   bash slurm/local-cluster.sh start --nodes 2    # two nodes n1, n2 (network namespaces)
#   bash slurm/local-cluster.sh stop               # cancel every job, stop the daemons, remove the nodes
#   bash slurm/local-cluster.sh status             # exit 0 if up (prints the nodes), non-zero otherwise
#   bash slurm/local-cluster.sh exec n1 CMD...     # run CMD "on" node n1 (e.g. torchrun), see below
#
# Only one cluster runs at a time (the ports are fixed): `start` with another
# node count than the running cluster's refuses and says to `stop` first
# (stopping cancels every job, which start should never do behind your back).
#
# Several nodes (--nodes N, N >= 2): a bridge $BRIDGE (10.77.0.1/24) in the
# machine's namespace, and per node a network namespace nK with a veth
# (10.77.0.1K, e.g. n1 = 10.77.0.11), `lo` up (gloo hangs without it), no
# default route, no forwarding, no NAT: traffic stays on these addresses.
# munged and slurmctld run in the machine's namespace (slurmctld at
# 10.77.0.1); each slurmd runs in its node's network namespace with its own
# hostname and its own /etc/hosts (etc/hosts here, bind-mounted in a private
# mount namespace: the machine's /etc/hosts is never changed). Its jobs
# inherit all three, so gloo finds its peers by node name. From the machine's
# namespace use the addresses (n1, n2 do not resolve there), or run inside a
# node with `exec NODE CMD...` (its network, hostname and /etc/hosts, like slurmd's).
# (`ip netns exec` is not used for slurmd: it remounts /sys, which hides the
# cgroup fs, and slurmd 22.05 then refuses to start.)
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
#   etc/hosts       (several nodes) the nodes' /etc/hosts
#   run/nodes       the node count of the running cluster
#
# `stop` puts back an /etc/slurm/slurm.conf that was there before `start`.
#
# The cluster: partitions `debug` (default, low priority, jobs preemptible by
# requeue after a grace time) and `urgent` (high priority: its jobs preempt
# `debug` jobs), both over all nodes.
#
# Other settings from the environment:
#   HARNESS_SLURM_GRACE_TIME     seconds a preempted `debug` job keeps running
#                                after the preemption signal (its --signal, e.g.
#                                submitit's USR2, else SIGTERM) before SLURM kills
#                                it (SIGCONT+SIGTERM, SIGKILL 5 s later) and
#                                requeues it (default 30)
#   HARNESS_SLURM_START_TIMEOUT  seconds `start` waits for idle nodes (default 60)
#   HARNESS_SLURM_NODE_CPUS      (several nodes) CPUs each node offers (default
#                                1, so N nodes do not oversubscribe the cores;
#                                2 lets a job run nproc_per_node=2)

set -euo pipefail

DIR="${HARNESS_SLURM_DIR:-/var/tmp/harness-slurm}"
DIR="${DIR%/}"
GRACE_TIME="${HARNESS_SLURM_GRACE_TIME:-30}"
START_TIMEOUT="${HARNESS_SLURM_START_TIMEOUT:-60}"
NODE_CPUS="${HARNESS_SLURM_NODE_CPUS:-1}"
# Several nodes: the bridge, its subnet and the nodes' addresses (node K: $SUBNET.1K).
BRIDGE=hsbr0
SUBNET=10.77.0
CTLD_ADDR=$SUBNET.1
NETNS_DIR=/run/netns

CONF="$DIR/etc/slurm.conf"
# Slurm clients read this path when SLURM_CONF is not set.
SYSTEM_CONF=/etc/slurm/slurm.conf
MUNGE_DIR="$DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MUNGE_PID="$MUNGE_DIR/munged.pid"
CTLD_PID="$DIR/run/slurmctld.pid"
SLURMD_PID="$DIR/run/slurmd.pid"
NODES_FILE="$DIR/run/nodes"
NODE_HOSTS="$DIR/etc/hosts"
# Present when our first `ip netns add` made $NETNS_DIR a mount point (stop unmounts it then).
NETNS_MOUNT_MARK="$DIR/run/netns-mount"
# How many node namespaces (n1..nK) setup_network made: what stop removes.
NETNS_FILE="$DIR/run/netns-nodes"
# The short host name (uname: `hostname` is not on every minimal image).
NODE="$(uname -n)"
NODE="${NODE%%.*}"
PACKAGES=(slurmctld slurmd slurm-client munge)
# The node count: from `start --nodes N`, else that of the running cluster.
NODES=1

log() { echo "local-cluster: $*"; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }

usage() {
    cat >&2 <<EOF
usage: bash $0 start [--nodes N] | stop | status | exec NODE CMD...

  start   install SLURM (Debian packages) if needed and start a cluster of
          N nodes (default 1: this machine; N >= 2: network namespaces
          n1..nN) with partitions debug [default, preemptible] and urgent;
          a no-op if it is already running with N nodes, an error if it
          runs with another node count (stop it first)
  stop    cancel all jobs, stop the daemons, remove the node namespaces and
          put back the /etc/slurm/slurm.conf from before start
  status  print the daemons and the nodes; exit 0 if the cluster is up
  exec NODE CMD...
          run CMD as if on node NODE (n1, ...): its network namespace,
          hostname and /etc/hosts; e.g. to start torchrun's agent there

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

# --- nodes -------------------------------------------------------------------

# The node names: this machine's name for one node, else n1..nN.
node_names() {
    local i
    if ((NODES == 1)); then
        echo "$NODE"
    else
        for ((i = 1; i <= NODES; i++)); do echo "n$i"; done
    fi
}

node_addr() { echo "$SUBNET.1${1#n}"; }  # n2 -> 10.77.0.12

# slurmd's pid file: slurm.conf's SlurmdPidFile with %n filled in.
slurmd_pidfile() {
    if ((NODES == 1)); then echo "$SLURMD_PID"; else echo "$DIR/run/slurmd-$1.pid"; fi
}

# Node count of the running (or last started) cluster; 1 if none was recorded.
recorded_nodes() {
    local n=1
    [[ -s $NODES_FILE ]] && n=$(<"$NODES_FILE")
    [[ $n =~ ^[0-9]+$ ]] || n=1
    echo "$n"
}

# Each running job step has a socket in its slurmd's spool folder until its
# slurmstepd has exited.
steps_left() { find "$DIR/spool" -maxdepth 2 -type s 2>/dev/null | wc -l; }

# Slurm commands, always pointed at our config (even if /etc/slurm/slurm.conf
# was changed behind our back) and with a short timeout so that polling a dead
# controller fails fast.
sl() { SLURM_CONF="$CONF" timeout 10 "$@"; }

ctld_up() { sl scontrol ping 2>/dev/null | grep -q 'UP'; }

# node_state NAME: the node's state in lower case, e.g. idle, mixed, allocated, down*, idle+drain.
node_state() { sl sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n1 | tr '[:upper:]' '[:lower:]'; }

node_usable() {
    case "$(node_state "$1")" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

slurmds_alive() {
    local n
    for n in $(node_names); do pid_alive "$(slurmd_pidfile "$n")" slurmd || return 1; done
}

cluster_up() {
    local n
    pid_alive "$MUNGE_PID" munged && pid_alive "$CTLD_PID" slurmctld && slurmds_alive && ctld_up || return 1
    for n in $(node_names); do node_usable "$n" || return 1; done
}

show_logs() {
    local f
    for f in "$DIR/log/slurmctld.log" "$DIR"/log/slurmd*.log "$MUNGE_DIR/munged.log"; do
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

# cpu_count: the CPUs this machine lets us run on. Plain `nproc` honours
# OMP_NUM_THREADS and OMP_THREAD_LIMIT (GNU coreutils): with OMP_NUM_THREADS=1
# exported, the node would offer 1 CPU and every 2-rank job would be refused.
# Without them, nproc still counts only the CPUs in our affinity mask (cgroups).
cpu_count() {
    env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc
}

write_config() {
    local cpus mem_mb ctld_host nodes_lines slurmd_paths names n
    cpus=$(cpu_count)
    # Leave ~10% of memory to the OS; SLURM refuses a node that reports less
    # memory than RealMemory. Several nodes share the machine's memory.
    mem_mb=$(awk -v n="$NODES" '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9 / n}' /proc/meminfo)
    if ((NODES == 1)); then
        ctld_host="$NODE(127.0.0.1)"
        names=$NODE
        slurmd_paths="SlurmdSpoolDir=$DIR/spool/slurmd
SlurmdPidFile=$SLURMD_PID
SlurmdLogFile=$DIR/log/slurmd.log"
        nodes_lines="NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    else
        # slurmctld on the bridge; every node's slurmd has its own files (%n: the node's name).
        ctld_host="$NODE($CTLD_ADDR)"
        names="n[1-$NODES]"
        slurmd_paths="SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log"
        nodes_lines=""
        for n in $(node_names); do
            nodes_lines+="NodeName=$n NodeAddr=$(node_addr "$n") NodeHostname=$n CPUs=$NODE_CPUS RealMemory=$mem_mb State=UNKNOWN"$'\n'
        done
        nodes_lines=${nodes_lines%$'\n'}
    fi

    mkdir -p "$DIR/etc"
    cat >"$CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh; rewritten on every start.
ClusterName=harness
# Nodes and controller by address so that no DNS is needed ($NODES node(s)).
SlurmctldHost=$ctld_host
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
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=$DIR/log/slurmctld.log
$slurmd_paths
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

$nodes_lines
PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME
PartitionName=urgent Nodes=$names Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
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

# Undo write_config's link: put back the config that was there before start.
restore_system_conf() {
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then
        rm -f "$SYSTEM_CONF"
    fi
    if [[ -e $SYSTEM_CONF.before-harness && ! -e $SYSTEM_CONF ]]; then
        mv "$SYSTEM_CONF.before-harness" "$SYSTEM_CONF"
        log "restored the earlier $SYSTEM_CONF"
    fi
}

# --- network namespaces (several nodes) ---------------------------------------

# The nodes' /etc/hosts: their own names, and the controller's on the bridge.
write_hosts() {
    local n
    {
        echo "# Written by slurm/local-cluster.sh: /etc/hosts inside the node namespaces."
        echo "127.0.0.1 localhost"
        echo "$CTLD_ADDR $NODE"
        for n in $(node_names); do echo "$(node_addr "$n") $n"; done
    } >"$NODE_HOSTS"
}

# A bridge with the controller's address; per node a namespace, a veth pair
# (h-nK on the bridge, eth0 inside) and lo. No route out, no forwarding, no NAT.
setup_network() {
    local n
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    # `ip netns add` bind-mounts $NETNS_DIR onto itself the first time: remember whether that was us.
    if ! mountpoint -q "$NETNS_DIR" 2>/dev/null && [[ ! -e $NETNS_MOUNT_MARK ]]; then
        touch "$NETNS_MOUNT_MARK"
    fi
    local made=0
    [[ -s $NETNS_FILE ]] && made=$(<"$NETNS_FILE")
    [[ $made =~ ^[0-9]+$ ]] && ((made > NODES)) || echo "$NODES" >"$NETNS_FILE"
    for n in $(node_names); do
        [[ -e $NETNS_DIR/$n ]] || ip netns add "$n"
        if ! ip link show "h-$n" >/dev/null 2>&1; then
            ip link add "h-$n" type veth peer name eth0 netns "$n"
            ip link set "h-$n" master "$BRIDGE"
            ip -n "$n" addr add "$(node_addr "$n")/24" dev eth0
        fi
        ip link set "h-$n" up
        ip -n "$n" link set lo up
        ip -n "$n" link set eth0 up
    done
}

# Remove every namespace and link setup_network made (their slurmds are gone).
teardown_network() {
    local ns made=0 i
    [[ -s $NETNS_FILE ]] && made=$(<"$NETNS_FILE")
    [[ $made =~ ^[0-9]+$ ]] || made=0
    for ((i = 1; i <= made; i++)); do
        ns=n$i
        ip link del "h-$ns" 2>/dev/null || true
        [[ -e $NETNS_DIR/$ns ]] || continue
        ip netns del "$ns" && log "removed node namespace $ns"
    done
    rm -f "$NETNS_FILE"
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE" && log "removed bridge $BRIDGE"
    fi
    if [[ -e $NETNS_MOUNT_MARK ]] && [[ -z $(ls -A "$NETNS_DIR" 2>/dev/null) ]]; then
        umount "$NETNS_DIR" 2>/dev/null && rmdir "$NETNS_DIR" 2>/dev/null && log "unmounted $NETNS_DIR"
        rm -f "$NETNS_MOUNT_MARK"
    fi
}

# Processes left in node NAME's network namespace (job steps outliving slurmd).
netns_pids() { ip netns pids "$1" 2>/dev/null || true; }

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
    if ((NODES == 1)); then
        if ! pid_alive "$SLURMD_PID" slurmd; then
            SLURM_CONF="$CONF" /usr/sbin/slurmd -c -N "$NODE"
        fi
        return 0
    fi
    write_hosts
    setup_network
    local n
    for n in $(node_names); do
        mkdir -p "$DIR/spool/$n"
        pid_alive "$(slurmd_pidfile "$n")" slurmd && continue
        # Own network (the namespace), own hostname and /etc/hosts (a private
        # mount namespace: the bind mount is gone with the last process in it).
        # slurmd daemonizes; its jobs inherit all three.
        SLURM_CONF="$CONF" nsenter --net="$NETNS_DIR/$n" -- \
            unshare --uts --mount --propagation slave -- \
            sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && exec /usr/sbin/slurmd -c -N "$2"' \
            sh "$NODE_HOSTS" "$n"
    done
}

wait_ready() {
    local deadline=$((SECONDS + START_TIMEOUT)) n pending resumed=" "
    while ((SECONDS < deadline)); do
        if ctld_up; then
            pending=0
            for n in $(node_names); do
                case "$(node_state "$n")" in
                    idle | mixed | allocated) ;;
                    *drain* | down*)
                        pending=1
                        # A node remembered as down/drained comes back here.
                        if [[ $resumed != *" $n "* ]] && pid_alive "$(slurmd_pidfile "$n")" slurmd; then
                            sl scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
                            resumed+="$n "
                        fi
                        ;;
                    *) pending=1 ;;
                esac
            done
            ((pending)) || return 0
        fi
        pid_alive "$MUNGE_PID" munged || { log "munged is not running"; return 1; }
        pid_alive "$CTLD_PID" slurmctld || { log "slurmctld is not running"; return 1; }
        for n in $(node_names); do
            pid_alive "$(slurmd_pidfile "$n")" slurmd || { log "slurmd of $n is not running"; return 1; }
        done
        sleep 0.2
    done
    for n in $(node_names); do log "node $n state after ${START_TIMEOUT}s: '$(node_state "$n")'"; done
    return 1
}

# --- commands ----------------------------------------------------------------

cmd_start() {
    local running
    running=$(recorded_nodes)
    if [[ -s $NODES_FILE ]] && ((running != NODES)) && any_daemon_alive; then
        die "a $running-node cluster is running; only one cluster runs at a time (fixed ports). \
HINT: bash $0 stop (cancels its jobs), then bash $0 start --nodes $NODES"
    fi
    if cluster_up; then
        log "already running with $NODES node(s) (config $CONF); nothing to do"
        sl sinfo -N
        return 0
    fi
    local t0=$EPOCHREALTIME
    ensure_installed
    mkdir -p "$DIR/run"
    echo "$NODES" >"$NODES_FILE"
    write_config
    start_daemons
    if ! wait_ready; then
        log "the cluster did not come up"
        show_logs
        exit 1
    fi
    log "up in $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}")s: node(s) $(node_names | paste -sd' '), partitions debug (default) and urgent; state in $DIR"
    sl sinfo -N
}

any_daemon_alive() {
    local n
    pid_alive "$MUNGE_PID" munged || pid_alive "$CTLD_PID" slurmctld && return 0
    for n in $(node_names); do pid_alive "$(slurmd_pidfile "$n")" slurmd && return 0; done
    return 1
}

cmd_stop() {
    local i n pid
    NODES=$(recorded_nodes)
    if any_daemon_alive; then
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
        for n in $(node_names); do stop_pid "$(slurmd_pidfile "$n")" slurmd; done
        stop_pid "$CTLD_PID" slurmctld
        stop_pid "$MUNGE_PID" munged
    else
        log "no daemon running"
    fi
    # Whatever is still in a node namespace (a step that outlived its slurmd,
    # a command from `exec`) goes with the node: by pid, only processes inside
    # our namespaces.
    local made=0
    [[ -s $NETNS_FILE ]] && made=$(<"$NETNS_FILE")
    [[ $made =~ ^[0-9]+$ ]] || made=0
    for ((i = 1; i <= made; i++)); do
        [[ -e $NETNS_DIR/n$i ]] || continue
        for pid in $(netns_pids "n$i"); do
            log "killing leftover process $pid in node n$i"
            kill -KILL "$pid" 2>/dev/null || true
        done
    done
    teardown_network
    restore_system_conf
    rm -f "$NODES_FILE"
    log "stopped"
}

# The same three namespaces slurmd gets (start_daemons), for a command of the user's.
cmd_exec() {
    [[ $EXEC_NODE =~ ^n[0-9]+$ && -e $NETNS_DIR/$EXEC_NODE ]] ||
        die "no node '$EXEC_NODE' (start a cluster with: bash $0 start --nodes 2)"
    exec nsenter --net="$NETNS_DIR/$EXEC_NODE" -- \
        unshare --uts --mount --propagation slave -- \
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' \
        sh "$NODE_HOSTS" "$EXEC_NODE" "${EXEC_ARGS[@]}"
}

cmd_status() {
    local p rc=0 n
    NODES=$(recorded_nodes)
    local daemons=("$MUNGE_PID munged" "$CTLD_PID slurmctld")
    for n in $(node_names); do daemons+=("$(slurmd_pidfile "$n") slurmd"); done
    for p in "${daemons[@]}"; do
        # shellcheck disable=SC2086
        if pid_alive $p; then
            echo "${p#* }: running (pid $(<"${p%% *}"), ${p%% *})"
        else
            echo "${p#* }: not running (${p%% *})"
            rc=1
        fi
    done
    if ((NODES > 1)); then
        for n in $(node_names); do
            echo "node $n: $(node_addr "$n") in network namespace $NETNS_DIR/$n" \
                "$([[ -e $NETNS_DIR/$n ]] || echo '(missing)')"
        done
    fi
    if ctld_up; then
        sl sinfo -N -o '%N %P %T %c %m' || rc=1
        for n in $(node_names); do
            node_usable "$n" || { echo "node $n is $(node_state "$n")"; rc=1; }
        done
    else
        echo "slurmctld does not answer"
        rc=1
    fi
    return $rc
}

(($# >= 1)) || usage
COMMAND=$1
shift
if [[ $COMMAND == exec ]]; then
    (($# >= 2)) || usage
    EXEC_NODE=$1
    shift
    EXEC_ARGS=("$@")
    set --
fi
while (($#)); do
    case "$1" in
        --nodes) (($# >= 2)) || usage; NODES=$2; shift 2 ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        *) usage ;;
    esac
done
[[ $NODES =~ ^[1-9][0-9]?$ ]] || die "--nodes wants a count from 1 to 99 (got '$NODES')"
[[ $NODE_CPUS =~ ^[1-9][0-9]*$ ]] || die "HARNESS_SLURM_NODE_CPUS wants a CPU count (got '$NODE_CPUS')"
# slurm.conf has no quoting: a path with blanks cannot be written into it.
[[ $DIR == /* && $DIR != *[[:space:]]* ]] ||
    die "HARNESS_SLURM_DIR must be an absolute path without blanks (got '$DIR')"
if [[ $EUID -ne 0 ]]; then
    die "needs root (it installs packages and runs the SLURM daemons as root)"
fi
# The daemons live in /usr/sbin, which a non-login shell may lack in PATH.
export PATH="/usr/sbin:/sbin:$PATH"
case "$COMMAND" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    exec) cmd_exec ;;
    *) usage ;;
esac
