#!/usr/bin/env bash
# Install the Debian packages the cluster tests launch for real, if any is missing (root; idempotent).
#   SLURM: slurmctld slurmd slurm-client munge   MPI: openmpi-bin   ssh/pdsh: openssh-server openssh-client pdsh
set -euo pipefail
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge mpirun:openmpi-bin \
            sshd:openssh-server ssh:openssh-client pdsh:pdsh ip:iproute2 unshare:util-linux; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
[ ${#need[@]} = 0 ] && exit 0
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
