#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for trying lrsweep's SLURM launcher and for CI.
#
#   bash launchers/local_slurm.sh up       # as root: installs Debian's slurm packages (once),
#                                          # starts munged, mariadb, slurmdbd, slurmctld, slurmd,
#                                          # waits until the node is idle and prints the line
#                                          #   export SLURM_CONF=/tmp/lrsweep-slurm/etc/slurm.conf
#   bash launchers/local_slurm.sh down     # cancels jobs, stops every daemon by its pid file
#   bash launchers/local_slurm.sh status   # sinfo + which daemons are alive
#
# No systemd, no cgroups (Debian 12, slurm 22.05). Env knobs:
#   SLURM_ROOT   config/state/logs/pids            (default /tmp/lrsweep-slurm)
#   WITH_DBD=1   mariadb + slurmdbd so that `sacct` works: submitit polls sacct, and without
#                it a cancelled or killed job is never seen as done (keep it on)
#   NODE_NAME    slurm node name                   (default localhost)
#   CRED_EXPIRE  seconds before a requeued job may start again (default 10; slurm's is 120)
#   DEF_MEM_MB   --mem of a job that asks for none, per CPU (default 1000; without it a job
#                takes the whole node's memory and jobs run one at a time)
#   FRESH=1      wipe slurm state and the accounting DB together (job ids restart at 1; stale
#                sacct rows with a reused job id would be read as the new job's)
set -euo pipefail

SLURM_ROOT=${SLURM_ROOT:-/tmp/lrsweep-slurm}
WITH_DBD=${WITH_DBD:-1}
NODE_NAME=${NODE_NAME:-localhost}
CRED_EXPIRE=${CRED_EXPIRE:-10}
DEF_MEM_MB=${DEF_MEM_MB:-1000}
FRESH=${FRESH:-1}
export SLURM_CONF="$SLURM_ROOT/etc/slurm.conf"
DAEMONS="slurmd slurmctld slurmdbd mariadb munged"   # stop order

_t0=$(date +%s%N)
_log() { local ms=$(( ($(date +%s%N) - _t0) / 1000000 )); printf '[local_slurm %d.%03ds] %s\n' $((ms/1000)) $((ms%1000)) "$*" >&2; }
_alive() { local f="$SLURM_ROOT/run/$1.pid"; [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }

install_packages() {
  local pkgs="slurmctld slurmd slurm-client munge" missing=""
  [ "$WITH_DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    _log "apt-get install$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged            # daemonizes; pid in /run/munge/munged.pid
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  cp /run/munge/munged.pid "$SLURM_ROOT/run/munged.pid"
  _log "munged up (pid $(cat "$SLURM_ROOT/run/munged.pid"))"
}

start_dbd() {
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  mkdir -p /run/mysqld && chown mysql:root /run/mysqld
  if ! mariadb-admin --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1; then
    setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql \
      --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
      --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
      >"$SLURM_ROOT/log/mariadb.log" 2>&1 </dev/null &
    echo $! >"$SLURM_ROOT/run/mariadb.pid"
    for _ in $(seq 100); do mariadb-admin --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  [ "$FRESH" = 1 ] && mariadb --socket=/run/mysqld/mysqld.sock -e "DROP DATABASE IF EXISTS slurm_acct_db;"
  mariadb --socket=/run/mysqld/mysqld.sock -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  _log "mariadb up"
  cat >"$SLURM_ROOT/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$SLURM_ROOT/log/slurmdbd.log
PidFile=$SLURM_ROOT/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$SLURM_ROOT/etc/slurmdbd.conf"      # slurmdbd refuses a world-readable file
}

write_slurm_conf() {
  local hw cpus boards spb cps tpc mem acct
  hw=$(slurmd -C | head -1)
  _field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$hw"; }
  cpus=$(_field CPUs); boards=$(_field Boards); spb=$(_field SocketsPerBoard)
  cps=$(_field CoresPerSocket); tpc=$(_field ThreadsPerCore); mem=$(( $(_field RealMemory) * 9 / 10 ))
  if [ "$WITH_DBD" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
  else
    acct="AccountingStorageType=accounting_storage/none"
  fi
  cat >"$SLURM_CONF" <<EOF
ClusterName=ci
SlurmctldHost=$NODE_NAME(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$SLURM_ROOT/state
SlurmdSpoolDir=$SLURM_ROOT/spool
SlurmctldPidFile=$SLURM_ROOT/run/slurmctld.pid
SlurmdPidFile=$SLURM_ROOT/run/slurmd.pid
SlurmctldLogFile=$SLURM_ROOT/log/slurmctld.log
SlurmdLogFile=$SLURM_ROOT/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd, no cgroups:
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$acct
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM_MB
MaxArraySize=10001
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=$NODE_NAME NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$spb CoresPerSocket=$cps ThreadsPerCore=$tpc RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE_NAME Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  [ "$(id -u)" = 0 ] || { echo "local_slurm.sh up: needs root (apt-get, munge, slurm daemons)" >&2; exit 1; }
  if _alive slurmctld && _alive slurmd; then
    _log "already running (SLURM_ROOT=$SLURM_ROOT)"; echo "export SLURM_CONF=$SLURM_CONF"; return 0
  fi
  install_packages
  [ "$FRESH" = 1 ] && rm -rf "$SLURM_ROOT"/{state,spool,log}
  mkdir -p "$SLURM_ROOT"/{etc,state,spool,log,run}
  start_munge
  [ "$WITH_DBD" = 1 ] && start_dbd
  write_slurm_conf
  if [ "$WITH_DBD" = 1 ]; then
    slurmdbd                    # daemonizes; reads slurmdbd.conf next to $SLURM_CONF
    # sacctmgr talks to slurmdbd directly (a bare TCP probe makes slurmdbd log an error)
    for _ in $(seq 100); do sacctmgr -n -P list cluster >/dev/null 2>&1 && break; sleep 0.1; done
    _log "slurmdbd up (pid $(cat "$SLURM_ROOT/run/slurmdbd.pid"))"
  fi
  slurmctld
  slurmd -N "$NODE_NAME"
  for _ in $(seq 120); do
    [ "$(sinfo -h -n "$NODE_NAME" -o %T 2>/dev/null)" = idle ] && break; sleep 0.25
  done
  if [ "$(sinfo -h -n "$NODE_NAME" -o %T 2>/dev/null)" != idle ]; then
    echo "local_slurm.sh up: node $NODE_NAME is not idle" >&2; tail -20 "$SLURM_ROOT"/log/*.log >&2; exit 1
  fi
  if [ "$WITH_DBD" = 1 ]; then
    for _ in $(seq 100); do sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx ci && break; sleep 0.1; done
  fi
  sinfo >&2
  _log "cluster ready"
  echo "export SLURM_CONF=$SLURM_CONF"
}

down() {
  if _alive slurmctld; then scancel --user="$(id -un)" 2>/dev/null || true; fi
  for d in $DAEMONS; do
    local f="$SLURM_ROOT/run/$d.pid" pid
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && { _log "$d ($pid) did not stop, SIGKILL"; kill -9 "$pid"; }
    fi
    rm -f "$f"
    _log "stopped $d ($pid)"
  done
}

status() {
  for d in $DAEMONS; do
    if _alive "$d"; then echo "$d: running (pid $(cat "$SLURM_ROOT/run/$d.pid"))"; else echo "$d: stopped"; fi
  done
  _alive slurmctld && sinfo
  echo "export SLURM_CONF=$SLURM_CONF"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: bash $0 up|down|status" >&2; exit 2 ;;
esac
