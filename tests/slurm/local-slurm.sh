#!/usr/bin/env bash
# Start or stop a one-node SLURM cluster on localhost for the tests of run_all.sh (root, no systemd needed).
#   local-slurm.sh start DIR [--fake-gpus N]
#   local-slurm.sh stop DIR          # stops exactly the daemons it started, by PID
# It writes /etc/slurm/slurm.conf with ClusterName=meanexp-test; tests/test_run_all.py never runs it
# where another slurm.conf exists (a real cluster's). Recipe from the project's shared notes.
set -euo pipefail
cmd=${1:?start|stop}; S=${2:?state directory}; gpus=0
[ "${3:-}" = "--fake-gpus" ] && gpus=${4:?count}
mkdir -p "$S"; S=$(cd "$S" && pwd)

stop() {
  for f in "$S/slurmd.pid" "$S/slurmctld.pid" "$S/munged.pid"; do
    [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  rm -f "$S/munged.pid"
}
[ "$cmd" = stop ] && { stop; exit 0; }
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR [--fake-gpus N]" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
mkdir -p "$S"/{state,spool,log}
[ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for i in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$S/munged.pid" 2>/dev/null || true
fi
munge -n | unmunge >/dev/null

ncpu=$(nproc); mem=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 85 / 100 ))
gres_node=""; gres_types=""
if [ "$gpus" -gt 0 ]; then
  devs=(/dev/null /dev/zero /dev/full /dev/urandom); [ "$gpus" -le ${#devs[@]} ] || { echo "at most ${#devs[@]} fake GPUs" >&2; exit 2; }
  gres_types="GresTypes=gpu"; gres_node="Gres=gpu:$gpus"
  : > /etc/slurm/gres.conf
  for i in $(seq 0 $((gpus - 1))); do echo "NodeName=localhost Name=gpu File=${devs[$i]}" >> /etc/slurm/gres.conf; done
fi
mkdir -p /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=meanexp-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued task waits this long before it starts again (default 120 s); starting it sooner by hand gets it
# killed with "Job credential revoked"
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ReturnToService=2
MailProg=/bin/true
EnforcePartLimits=ALL
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
$gres_types
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem $gres_node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
/usr/sbin/slurmctld
/usr/sbin/slurmd -N localhost
for i in $(seq 150); do sinfo -h -o %T 2>/dev/null | grep -qx idle && exit 0; sleep 0.2; done
echo "SLURM node did not become idle; see $S/log" >&2; exit 1
