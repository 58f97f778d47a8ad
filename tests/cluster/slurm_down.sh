#!/usr/bin/env bash
# Stop the daemons slurm_up.sh started, by PID file, and wait until they are gone (SIGKILL after 30 s).
D=${CLUSTER_DIR:?set CLUSTER_DIR to the cluster state directory}
pids=()
for f in "$D/slurmd-n1.pid" "$D/slurmd-n2.pid" "$D/slurmctld.pid" "$D/munge/munged.pid"; do
  [ -s "$f" ] || continue
  p=$(cat "$f"); kill "$p" 2>/dev/null && pids+=("$p")
done
for _ in $(seq 300); do
  alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && exit 0; sleep 0.1
done
for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done; sleep 0.5; true
