#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for tests and CI: Debian's slurm-wlm and munge, slurmctld and slurmd on
# 127.0.0.1, a gres of fake GPUs, no accounting database (so job status comes from squeue, as on clusters without
# slurmdbd). The fake GPUs are character devices with NVIDIA's major number in our own folder: SLURM allocates them
# and sets CUDA_VISIBLE_DEVICES for a job as it would for real ones; nothing opens them.
#
#   tests/slurm/cluster.sh start    install the packages when missing (root + apt), start munge and slurm
#   tests/slurm/cluster.sh stop     stop the daemons started here
#
# Everything lives under $TUNEWISE_SLURM_DIR (default /tmp/tunewise-slurm). /etc/slurm/slurm.conf and gres.conf
# become links to it, because a job's inner `srun` (snakemake-executor-plugin-slurm-jobstep) drops SLURM_* from its
# environment, SLURM_CONF included, and then only finds the default path. A slurm.conf there that is not one of
# our links belongs to a real cluster: the script stops instead of touching it.
set -euo pipefail

DIR=${TUNEWISE_SLURM_DIR:-/tmp/tunewise-slurm}
CONF=$DIR/slurm.conf
GPUS=${TUNEWISE_SLURM_GPUS:-2}
# more CPUs than the host has, so several small jobs run at once (slurmd accepts it with config_overrides)
CPUS=${TUNEWISE_SLURM_CPUS:-8}
NODE=$(hostname -s)

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return 0
    [ "$(id -u)" = 0 ] || die "slurmctld/slurmd/munge are not installed and this is not root: cannot install them"
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munge are not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    local pkgs="slurmctld slurmd slurm-client munge"
    apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $pkgs >/dev/null; } \
        || die "apt-get install $pkgs failed"
}

write_config() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    local mem
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat > "$CONF" <<CONF
ClusterName=tunewise
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=${TUNEWISE_SLURMCTLD_PORT:-6817}
SlurmdPort=${TUNEWISE_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
GresTypes=gpu
# finished jobs stay visible to squeue for 5 minutes: the executor plugin reads their final state there
MinJobAge=300
SchedulerParameters=sched_interval=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem Gres=gpu:fake:$GPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
    mkdir -p "$DIR/dev"
    for i in $(seq 0 $((GPUS - 1))); do
        # where mknod is not allowed (some containers) a plain file still gives SLURM its count: slurmd logs
        # that it is no device, and allocates it all the same
        [ -e "$DIR/dev/nvidia$i" ] || mknod "$DIR/dev/nvidia$i" c 195 "$i" 2>/dev/null || touch "$DIR/dev/nvidia$i"
    done
    cat > "$DIR/gres.conf" <<CONF
NodeName=$NODE Name=gpu Type=fake File=$DIR/dev/nvidia[0-$((GPUS - 1))]
CONF
    mkdir -p /etc/slurm
    for f in slurm.conf gres.conf; do
        if [ -e "/etc/slurm/$f" ] && [ "$(readlink "/etc/slurm/$f")" != "$DIR/$f" ]; then
            die "/etc/slurm/$f exists and is not this test cluster's: not touching a real cluster's configuration"
        fi
        ln -sfn "$DIR/$f" "/etc/slurm/$f"
    done
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || /usr/sbin/create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged did not start"
}

start_slurm() {
    if sinfo -h >/dev/null 2>&1; then return 0; fi
    # -c: a clean start, without the job and node state (a drained node, say) of an earlier cluster here
    /usr/sbin/slurmctld -c -f "$CONF" || die "slurmctld failed: $(tail -5 "$DIR/log/slurmctld.log" 2>/dev/null)"
    /usr/sbin/slurmd -f "$CONF" || die "slurmd failed: $(tail -5 "$DIR/log/slurmd.log" 2>/dev/null)"
    for _ in $(seq 100); do
        if [ "$(sinfo -h -n "$NODE" -o %t 2>/dev/null)" = idle ]; then return 0; fi
        sleep 0.2
    done
    die "the node did not become idle: $(sinfo 2>&1 | tail -3); $(tail -5 "$DIR/log/slurmd.log" 2>/dev/null)"
}

stop_slurm() {
    for pid in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
        [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
    done
}

case "${1:-}" in
    start)
        install_packages
        write_config
        start_munge
        start_slurm
        echo "cluster.sh: one node ($NODE) with $GPUS fake GPUs is up; config $CONF"
        ;;
    stop) stop_slurm ;;
    restart) stop_slurm; sleep 1; "$0" start ;;
    *) die "usage: $0 start|stop|restart" ;;
esac
