#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for `kiln sweep --slurm` and its end-to-end test.
#
#   scripts/slurm-local.sh start   install (Debian: slurmctld slurmd slurm-client munge), configure, start
#   scripts/slurm-local.sh stop    stop the daemons this script started
#   scripts/slurm-local.sh status  sinfo
#
# Needs root (package install, munge key, daemons). Everything it writes lives under
# /etc/munge, /etc/slurm and $STATE (default /tmp/kiln-slurm); the daemons' PIDs are in
# $STATE/*.pid so `stop` ends exactly those.
set -euo pipefail

STATE="${KILN_SLURM_STATE:-/tmp/kiln-slurm}"
HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.8 }' /proc/meminfo)"

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1
        apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
    }
}

configure() {
    mkdir -p "$STATE"/{spool,state,log} /etc/slurm /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    cat > /etc/slurm/slurm.conf <<EOF
# Written by kiln's scripts/slurm-local.sh: one node, this machine.
ClusterName=kiln
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    install
    configure
    if ! pgrep -x munged >/dev/null; then
        # Debian's munged runs as the munge user; started by root it drops privileges itself.
        if id munge >/dev/null 2>&1; then
            su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$STATE/munged.pid.tmp" 2>/dev/null \
                || /usr/sbin/munged --force
        else
            /usr/sbin/munged --force
        fi
        sleep 0.5
        pgrep -x munged > "$STATE/munged.pid" || true
    fi
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 1 40); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qE 'idle|mixed|allocated'; then
            echo "slurm: node $HOST up ($(sinfo -h -o '%P %D %T %c' | head -1))"
            return 0
        fi
        sleep 0.5
    done
    echo "slurm: the node did not come up; logs in $STATE/log" >&2
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sinfo >&2 || true
    return 1
}

stop() {
    for name in slurmd slurmctld munged; do
        if [ -s "$STATE/$name.pid" ]; then
            # shellcheck disable=SC2046
            kill $(cat "$STATE/$name.pid") 2>/dev/null || true
            rm -f "$STATE/$name.pid"
        fi
    done
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
