#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost for the tests: munge, MariaDB + slurmdbd (so that sacct answers, which
# the Snakemake SLURM plugin polls), slurmctld and slurmd, and two fake GPUs to test the GPU request path.
#
#   tests/slurm/cluster.sh up      install (Debian packages, as root) and start; safe to run again
#   tests/slurm/cluster.sh down    stop every daemon
#
# Daemons are started by hand: these machines have no systemd and Debian's policy-rc.d keeps packages from starting
# services (see shared/NOTES.md). Everything it writes lives in /etc/slurm, /var/{lib,log,spool}/slurm and /run.
set -euo pipefail

CLUSTER=vectorlm
DB_PASSWORD=vectorlm-test
HOST=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

log() { echo "[cluster] $*" >&2; }

install_packages() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

running() { pgrep -x "$1" >/dev/null; }

start_munge() {
    running munged && return
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    log "munged started"
}

start_mariadb() {
    if ! running mariadbd && ! running mysqld; then
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        (mysqld_safe --user=mysql >/dev/null 2>&1 &)
        log "mariadb starting"
    fi
    for _ in $(seq 1 100); do
        mysqladmin ping --silent >/dev/null 2>&1 && break
        sleep 0.2
    done
    mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

write_configs() {
    local memory before
    memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    before=$(cat /etc/slurm/slurm.conf 2>/dev/null || true)
    mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/spool/slurm/d /var/log/slurm /run/slurm
    chown -R slurm:slurm /var/lib/slurm /var/log/slurm /run/slurm
    for i in 0 1; do [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done
    cat >/etc/slurm/slurm.conf <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/spool/slurm/d
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# The plugin polls job states; finished jobs must stay visible long enough (MinJobAge >= 3 x its first wait).
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
JobAcctGatherType=jobacct_gather/linux
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc --all) RealMemory=$((memory - 1024)) Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if [ "$before" != "$(cat /etc/slurm/slurm.conf)" ] && running slurmctld; then
        log "slurm.conf changed: restarting slurmctld and slurmd"  # a node's CPUs change only on a restart
        scontrol shutdown >/dev/null 2>&1 || true
        pkill -x slurmd 2>/dev/null || true
        for _ in $(seq 1 100); do running slurmctld || running slurmd || break; sleep 0.2; done
    fi
    cat >/etc/slurm/gres.conf <<EOF
NodeName=$HOST Name=gpu File=/dev/fakegpu[0-1]
EOF
    cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
PidFile=/run/slurm/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
EOF
    chown slurm:slurm /etc/slurm/slurmdbd.conf && chmod 600 /etc/slurm/slurmdbd.conf
}

start_slurm() {
    if ! running slurmdbd; then
        slurmdbd
        log "slurmdbd started"
    fi
    for _ in $(seq 1 100); do
        sacctmgr -n list cluster >/dev/null 2>&1 && break
        sleep 0.2
    done
    sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    running slurmctld || { slurmctld && log "slurmctld started"; }
    running slurmd || { slurmd && log "slurmd started"; }
    for _ in $(seq 1 150); do
        state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
        case "$state" in
            idle* | mixed* | allocated*) log "node $HOST is $state"; return ;;
            drain* | down* | inval*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    log "node $HOST did not become ready: $(sinfo -h -n "$HOST" -o '%T %E')"
    exit 1
}

up() {
    [ "$(id -u)" = 0 ] || { log "run as root (it installs packages and starts daemons)"; exit 1; }
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurm
    sacct -n -X -S now-1minute >/dev/null  # accounting answers
}

down() {
    scontrol shutdown >/dev/null 2>&1 || true
    for daemon in slurmd slurmctld slurmdbd; do pkill -x "$daemon" 2>/dev/null || true; done
    mysqladmin shutdown 2>/dev/null || true
    pkill -x munged 2>/dev/null || true
    log "stopped"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
