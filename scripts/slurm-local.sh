#!/usr/bin/env bash
# A single-node SLURM on this machine, to try (and test) unet-volume's SLURM path.
#
#   sudo scripts/slurm-local.sh start [DIR]   install slurm-wlm and munge if missing (apt), write a
#                                            one-node configuration, start munged, slurmctld and
#                                            slurmd on 127.0.0.1, wait until the node is idle
#   sudo scripts/slurm-local.sh stop [DIR]    cancel every job, stop what start started
#   scripts/slurm-local.sh status [DIR]       the node and the queue
#
# DIR (default $SLURM_LOCAL_DIR, else /tmp/unet-volume-slurm) holds the state, spool, logs and
# process ids. Beyond the packages, only /etc/slurm (slurm.conf, gres.conf), /etc/munge (a key, if
# there is none) and munge's socket folder /run/munge are written. The daemons listen on SLURM's
# ports (6817, 6818) and the node's address is 127.0.0.1. Idempotent: `start` on a running SLURM checks it and returns;
# `stop` without one does nothing. Partitions: `cpu` (default) and `gpu`, the same node, which
# has a fake GPU GRES (gres.conf points at /dev/null) so that `--gres=gpu:1` jobs schedule.
# Exit codes: 0 done, 1 failed (the logs say why), 3 not possible here (not root, no apt).
set -euo pipefail

ACTION="${1:-status}"
DIR="${2:-${SLURM_LOCAL_DIR:-/tmp/unet-volume-slurm}}"
CONF=/etc/slurm/slurm.conf
NODE="$(hostname -s)"

say() { echo "slurm-local: $*" >&2; }
cannot() { say "$*"; exit 3; }

running() { [[ -f "$DIR/$1.pid" ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1; }

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    [[ $EUID -eq 0 ]] || cannot "slurm-wlm and munge are missing; run as root to install them"
    command -v apt-get >/dev/null || cannot "slurm-wlm and munge are missing and there is no apt-get"
    say "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends slurm-wlm munge >"$DIR/apt.log" 2>&1 || {
        apt-get update >>"$DIR/apt.log" 2>&1
        apt-get install -y --no-install-recommends slurm-wlm munge >>"$DIR/apt.log" 2>&1
    } || cannot "apt-get could not install slurm-wlm and munge (see $DIR/apt.log)"
}

configure() {
    local cpus memory
    cpus="$(nproc)"
    # What SLURM may book: the machine's memory less 1 GiB for the system, in MB.
    memory=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024))
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm
    cat >"$CONF" <<EOF
# Written by unet-volume's scripts/slurm-local.sh: one node, state under $DIR.
ClusterName=unet-volume-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
GresTypes=gpu
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
    # A fake GPU: SLURM books it and sets CUDA_VISIBLE_DEVICES; there is no device behind it.
    echo "NodeName=$NODE Name=gpu File=/dev/null" >/etc/slurm/gres.conf
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        head -c 1024 /dev/urandom >/etc/munge/munge.key
    fi
    chmod 400 /etc/munge/munge.key
}

start() {
    if [[ "$(node_state)" == idle* || "$(node_state)" == mix* ]]; then
        say "already running: node $NODE $(node_state)"
        return
    fi
    [[ $EUID -eq 0 ]] || cannot "starting SLURM needs root (the daemons run as root here)"
    mkdir -p "$DIR"
    install
    configure
    mkdir -p /run/munge # the socket SLURM's clients look for: /run/munge/munge.socket.2
    if ! running munged; then
        munged --force --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munged.seed"
    fi
    running slurmctld || slurmctld -i -f "$CONF"
    running slurmd || slurmd -f "$CONF"
    for _ in $(seq 60); do
        case "$(node_state)" in
        idle* | mix*)
            say "node $NODE idle; partitions cpu (default) and gpu; state in $DIR"
            return
            ;;
        esac
        sleep 0.5
    done
    say "the node did not become idle in 30 s; logs in $DIR/log:"
    tail -5 "$DIR"/log/*.log >&2 || true
    exit 1
}

stop() {
    if command -v scancel >/dev/null && [[ -f $CONF ]]; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    for daemon in slurmd slurmctld munged; do
        if running "$daemon"; then
            kill "$(cat "$DIR/$daemon.pid")"
            for _ in $(seq 20); do running "$daemon" || break; sleep 0.25; done
        fi
        rm -f "$DIR/$daemon.pid"
    done
    say "stopped"
}

status() {
    command -v sinfo >/dev/null || { say "not installed"; exit 1; }
    sinfo -N -o "%N %P %T %c %m %G" && squeue
}

case "$ACTION" in
start) start ;;
stop) stop ;;
status) status ;;
*)
    say "usage: $0 start|stop|status [DIR]"
    exit 2
    ;;
esac
