#!/usr/bin/env bash
# Start a private two-node Slurm cluster (munged + slurmctld + slurmd n1, n2) on this machine, as root.
#   CLUSTER_DIR=/tmp/x bash tests/cluster/slurm_up.sh      then: export SLURM_CONF=$CLUSTER_DIR/slurm.conf
# Idempotent: daemons that are alive (PID file + kill -0) are left alone. Needs the Debian packages
# slurmctld slurmd slurm-client munge (tests/cluster/install_packages.sh). Ports: CTLD_PORT, N1_PORT, N2_PORT.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
D=${CLUSTER_DIR:?set CLUSTER_DIR to the cluster state directory}
CTLD_PORT=${CTLD_PORT:-16817} N1_PORT=${N1_PORT:-16818} N2_PORT=${N2_PORT:-16819}
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }   # not pgrep: a dying daemon still matches
mkdir -p "$D"/{slurmctld,slurmd/n1,slurmd/n2,log,munge}
chmod 0700 "$D/munge"
if [ ! -f "$D/slurm.conf" ]; then
  sed -e "s|@DIR@|$D|g" -e "s|@CTLD_PORT@|$CTLD_PORT|" -e "s|@N1_PORT@|$N1_PORT|" -e "s|@N2_PORT@|$N2_PORT|" \
    "$HERE/slurm.conf.in" > "$D/slurm.conf"
fi
export SLURM_CONF=$D/slurm.conf
# munge: a private key and socket, so a system munged (or another test run's) is never touched
[ -s "$D/munge/munge.key" ] || mungekey --create --keyfile="$D/munge/munge.key" >/dev/null
chmod 0600 "$D/munge/munge.key"
alive "$D/munge/munged.pid" || munged --force --socket="$D/munge/munge.socket" --key-file="$D/munge/munge.key" \
  --pid-file="$D/munge/munged.pid" --log-file="$D/munge/munged.log" --seed-file="$D/munge/munged.seed"
for _ in $(seq 50); do munge -S "$D/munge/munge.socket" -n </dev/null | unmunge -S "$D/munge/munge.socket" >/dev/null 2>&1 && break; sleep 0.1; done
alive "$D/slurmctld.pid" || slurmctld -f "$SLURM_CONF" -i   # -i: start even if old state is unreadable
alive "$D/slurmd-n1.pid" || slurmd -f "$SLURM_CONF" -N n1    # one slurmd per emulated node (Port= in slurm.conf)
alive "$D/slurmd-n2.pid" || slurmd -f "$SLURM_CONF" -N n2
for _ in $(seq 150); do
  [ "$(sinfo -h -o '%T' -p debug 2>/dev/null | sort -u)" = "idle" ] && break; sleep 0.2
done
sinfo -N
[ "$(sinfo -h -o '%T' -p debug | sort -u)" = "idle" ]
