#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for pacha's scheduler tests and for trying the job scripts.
#
#   deploy/slurm/local-cluster.sh start   # install slurm-wlm + munge if missing (Debian), start munged,
#                                         # slurmctld and slurmd on localhost; waits until the node is idle
#   deploy/slurm/local-cluster.sh stop    # stop the daemons
#
# Needs root (it writes /etc/slurm/slurm.conf and runs the daemons as root, SlurmUser=root). State, spool
# and logs live under $PACHA_SLURM_DIR (default /tmp/pacha-slurm). Not for production clusters: those have
# their own configuration; pacha's job scripts (tiles.sbatch, merge.sbatch, submit.sh) need nothing from
# this one.
set -euo pipefail
D=${PACHA_SLURM_DIR:-/tmp/pacha-slurm}
CONF=/etc/slurm/slurm.conf

stop() {
  for p in slurmd slurmctld; do pkill -x "$p" 2>/dev/null || true; done
}

start() {
  if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || { echo "slurm-wlm and munge are missing and apt-get is not available" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  stop
  mkdir -p "$D/state" "$D/spool" "$D/log" /etc/slurm /run/munge /var/lib/munge /var/log/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chmod 0400 /etc/munge/munge.key
  if ! pgrep -x munged >/dev/null; then
    # munged refuses to run as root without --force; the key and the socket are root's here.
    chown root:root /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge /etc/munge
    munged --force
  fi
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > "$CONF" <<CONF
ClusterName=pacha-local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=local Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld
  slurmd
  for _ in $(seq 1 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "slurm: node ${host} is up ($(sinfo -h -o '%T'))"
      return 0
    fi
    sleep 1
  done
  echo "slurm did not come up; logs in $D/log" >&2
  tail -n 20 "$D/log/"*.log >&2 || true
  exit 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
