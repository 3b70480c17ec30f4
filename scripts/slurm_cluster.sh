#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for the tests marked `slurm` (tests/test_slurm.py).
#
#   sudo scripts/slurm_cluster.sh up       # idempotent: does nothing when the cluster already answers
#   sudo scripts/slurm_cluster.sh status   # exit 0 when up (scontrol ping + all nodes usable)
#   sudo scripts/slurm_cluster.sh logs     # tail of every daemon log (what tests print on failure)
#   sudo scripts/slurm_cluster.sh down     # stop what `up` started (by PID file), wipe SLURM state + accounting
#
# Debian's Slurm packages (22.05 on bookworm) + munge, and, for accounting, slurmdbd + MariaDB:
# without accounting `sacct` fails, and then submitit cannot tell that a job died without a
# result (job.result() would block forever). Several `slurmd -N nX` on one host give a
# multi-node cluster: nodes n1..nN all resolve to 127.0.0.1 (/etc/hosts), each slurmd on its
# own port. No systemd and no cgroups are needed (proctrack/linuxproc, task/none).
#
# Partitions: `debug` (default, PriorityTier 1) and `urgent` (PriorityTier 2) over the same
# nodes, so that a job in `urgent` really preempts `debug` jobs (PreemptMode=REQUEUE with a
# grace time, and the job's own --signal sent at preemption: preempt_send_user_signal).
#
# Env: NODES=4 nodes; CPUS=4 CPUs per node (may exceed nproc); MEM_MB=4000 per node;
#      GPUS=0 fake GPUs per node (gres backed by /dev/null); WITH_DBD=1 accounting;
#      GRACE_S=60 preemption grace time. Needs root (apt, /etc/slurm, /etc/hosts, daemons).
# Adapted from shared/reference/slurm-local-cluster-{up,down}.sh.
set -euo pipefail
NODES=${NODES:-4}; CPUS=${CPUS:-4}; GPUS=${GPUS:-0}; MEM_MB=${MEM_MB:-4000}; WITH_DBD=${WITH_DBD:-1}
GRACE_S=${GRACE_S:-60}

T0=$(date +%s%N)
t() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[slurm %4d.%03ds] %s\n' $((ms/1000)) $((ms%1000)) "$*"; }
# wait_for CMD [TRIES]: poll every 0.5 s; every wait in here is bounded
wait_for() { local i; for i in $(seq 1 "${2:-60}"); do eval "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done
             echo "timeout waiting for: $1" >&2; return 1; }

healthy() {  # controller answers, accounting answers (if on), and all NODES nodes are usable
  command -v scontrol >/dev/null || return 1
  timeout 10 scontrol ping 2>/dev/null | grep -q UP || return 1
  if [ "$WITH_DBD" = 1 ]; then timeout 10 sacct -n -X -S now >/dev/null 2>&1 || return 1; fi
  local n; n=$(timeout 10 sinfo -h -p debug -t idle,mixed,allocated,completing -o %D 2>/dev/null | awk '{s += $1} END {print s + 0}')
  [ "${n:-0}" -ge "$NODES" ]
}

stop_pidfile() {  # SIGTERM the pid named in $1, wait up to 30 s, then SIGKILL
  local f=$1 p; [ -f "$f" ] || return 0; p=$(cat "$f" 2>/dev/null); [ -n "$p" ] || return 0
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq 60); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$p" 2>/dev/null; echo "killed -9 $p ($f)"
}

cmd_down() {
  # cancel all jobs first so that the slurmds can clean up their slurmstepds
  if command -v scancel >/dev/null && timeout 10 scontrol ping 2>/dev/null | grep -q UP; then
    ids=$(squeue -h -o %i 2>/dev/null || true)
    [ -n "$ids" ] && { scancel --full $ids 2>/dev/null || true; }
    for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  for f in /run/slurmd-*.pid; do stop_pidfile "$f"; done
  stop_pidfile /run/slurmctld.pid
  stop_pidfile /run/slurmdbd.pid
  # job ids start again at 1 with the wiped controller state: old accounting records
  # would then answer for new jobs of the same id
  # (|| true: after a crash the database server may be gone already, and `down` must go on)
  command -v mariadb >/dev/null && { mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db" 2>/dev/null || true; }
  stop_pidfile /run/mysqld/mysqld.pid
  stop_pidfile /run/munge/munged.pid
  rm -f /run/slurmd-*.pid /run/slurmctld.pid /run/slurmdbd.pid
  rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/* /var/lib/slurm/fakegpu /var/log/slurm/*
  sed -i '/# slurm-ci$/d' /etc/hosts
  echo "slurm down; remaining slurm/munge/mariadb processes:"
  ps -eo pid,cmd | grep -E '[s]lurm(ctld|d|dbd|stepd)|[m]unged|[m]ariadbd' || echo "  none"
}

cmd_logs() {
  local f
  for f in /var/log/slurm/*.log; do [ -f "$f" ] && { echo "==== $f (last ${LINES_PER_LOG:-40} lines)"; tail -n "${LINES_PER_LOG:-40}" "$f"; }; done
  echo "==== sinfo"; timeout 10 sinfo -N -o '%N %P %T %c %m %E' 2>&1 || true
  echo "==== squeue"; timeout 10 squeue 2>&1 || true
}

write_config() {
  local H NODE_NAMES ACCT GRES i
  H=$(hostname -s); NODE_NAMES=$(seq -f 'n%g' -s ' ' 1 "$NODES")
  mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/log/slurm /run/munge
  for n in $NODE_NAMES; do mkdir -p "/var/lib/slurm/slurmd/$n"; done
  chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm
  chown munge:munge /run/munge; chmod 755 /run/munge
  [ -s /etc/munge/munge.key ] || su -s /bin/sh munge -c '/usr/sbin/mungekey -c'
  if [ "$WITH_DBD" = 1 ]; then ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$H
JobAcctGatherType=jobacct_gather/linux"
  else ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"; fi
  GRES=""; rm -f /etc/slurm/gres.conf
  if [ "$GPUS" -gt 0 ]; then
    mkdir -p /var/lib/slurm/fakegpu
    for i in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "/var/lib/slurm/fakegpu/gpu$i"; done
    echo "Name=gpu File=/var/lib/slurm/fakegpu/gpu[0-$((GPUS - 1))]" > /etc/slurm/gres.conf
    GRES="Gres=gpu:$GPUS"
  fi
  cat > /etc/slurm/slurm.conf <<EOF
# written by claver-dist scripts/slurm_cluster.sh: a test cluster on one host
ClusterName=ci
SlurmctldHost=$H
SlurmUser=slurm
AuthType=auth/munge
# requeued jobs wait cred_expire seconds before they may start again (default 120)
AuthInfo=cred_expire=10
MailProg=/bin/true
MpiDefault=none
# container friendly: no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$ACCT
SchedulerType=sched/backfill
# re-evaluate pending (e.g. requeued) jobs every 5 s instead of 30-60 s
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# real preemption: a job in a higher PriorityTier partition requeues lower ones; the
# victims get their --signal at once (preempt_send_user_signal; Slurm >= 23.02 spells it
# PreemptParameters=send_user_signal) and GraceTime before SIGKILL
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
# jobs may be requeued (scontrol requeue, preemption) and keep their job id
JobRequeue=1
# trust the CPUs/Gres below even if the host has fewer
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
KillWait=30
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
# several slurmd on one host: one NodeName per slurmd, distinct ports
NodeName=n[1-$NODES] NodeHostname=$H NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$CPUS RealMemory=$MEM_MB $GRES State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=60 State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_S
PartitionName=urgent Nodes=ALL MaxTime=60 State=UP PriorityTier=2 PreemptMode=OFF
EOF
  # node names must resolve (MASTER_ADDR = the job's first node, for torch.distributed)
  sed -i '/# slurm-ci$/d' /etc/hosts; echo "127.0.0.1 $NODE_NAMES # slurm-ci" >> /etc/hosts
  t "config written (nodes: $NODE_NAMES; $CPUS cpus, $GPUS fake gpus, ${MEM_MB}MB each)"
}

start_dbd() {
  local H; H=$(hostname -s)
  if ! mariadb -e 'select 1' >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    # a fresh install may lack the system tables
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null 2>&1 || true
    /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid </dev/null >/var/log/slurm/mariadb.log 2>&1 &
    wait_for 'mariadb -e "select 1"' 120
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=$H
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
EOF
  chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf
  if ! { [ -f /run/slurmdbd.pid ] && kill -0 "$(cat /run/slurmdbd.pid)" 2>/dev/null; }; then /usr/sbin/slurmdbd; fi
  wait_for 'sacctmgr -n list cluster' 120
  sacctmgr -i add cluster ci >/dev/null 2>&1 || true
  t "mariadb + slurmdbd up"
}

cmd_up() {
  if [ "$(id -u)" != 0 ]; then echo "slurm_cluster.sh up needs root" >&2; exit 1; fi
  if healthy; then t "already up"; sinfo -N -o '%N %P %T %c %m'; return 0; fi
  # a half-started cluster (e.g. after a crash) is torn down first: `up` always ends in a known state
  local f
  for f in /run/slurmctld.pid /run/slurmd-*.pid; do
    if [ -f "$f" ]; then t "partial cluster found ($f): tearing it down first"; cmd_down >/dev/null; break; fi
  done

  # 1. packages (no systemd / policy-rc.d: postinst cannot start services; we start them below)
  local PKGS="slurmctld slurmd slurm-client munge"
  [ "$WITH_DBD" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
  if ! dpkg -s $PKGS >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
  fi
  t "packages: $(dpkg-query -W -f='${Package} ${Version}  ' slurmctld munge)"

  # 2. config
  write_config

  # 3. daemons (each one is skipped if an instance already answers)
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || su -s /bin/sh munge -c /usr/sbin/munged
  wait_for 'munge -n | unmunge' 20
  t "munged up"
  [ "$WITH_DBD" = 1 ] && start_dbd
  /usr/sbin/slurmctld
  wait_for 'scontrol ping | grep -q UP'
  t "slurmctld up (pid $(cat /run/slurmctld.pid))"
  for n in $(seq -f 'n%g' 1 "$NODES"); do /usr/sbin/slurmd -N "$n"; done
  wait_for "[ \"\$(sinfo -h -p debug -t idle -o %D)\" = $NODES ]" 120
  t "slurmd x$NODES up"; sinfo -N -o '%N %P %T %c %m %G'
  local out; out=$(timeout 60 srun -N "$NODES" hostname | sort | uniq -c | tr -s ' ')
  t "smoke test 'srun -N $NODES hostname' ok: $out"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) if healthy; then echo "up"; else echo "down"; exit 1; fi ;;
  logs) cmd_logs ;;
  *) echo "usage: $0 up|down|status|logs" >&2; exit 2 ;;
esac
