#!/usr/bin/env bash
# DeepSpeed's launcher driving Open MPI (`deepspeed --launcher openmpi`): one mpirun over the hostfile's hosts.
#   HOSTFILE=hostfiles/example_2x8 SOCKET_IFNAME=eth0 launch/deepspeed_openmpi.sh CONFIG [key=value ...]
# Environment (defaults): HOSTFILE (required), MASTER_ADDR (the first host of HOSTFILE), MASTER_PORT (29500),
# SOCKET_IFNAME (required: Open MPI's TCP interface, where DeepSpeed would hard-code eth0; also sets GLOO/NCCL_SOCKET_IFNAME),
# PYTHON, DEEPSPEED, MODULE (bert_ds.train), FORWARD_ENV (exported to the ranks with -x), LAUNCHER_ARGS (more mpirun options).
set -euo pipefail
PYTHON=${PYTHON:-python}
DEEPSPEED=${DEEPSPEED:-$(dirname "$(command -v "$PYTHON")")/deepspeed}
HOSTFILE=${HOSTFILE:?set HOSTFILE to a hostfile (lines of 'HOSTNAME slots=N', see hostfiles/)}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE" 2>/dev/null || true)}
SOCKET_IFNAME=${SOCKET_IFNAME:?set SOCKET_IFNAME to the network interface between the nodes (e.g. eth0, ib0; lo on one machine)}
# it goes into --launcher_args, which DeepSpeed splits like a shell would: an interface name, nothing more
[[ $SOCKET_IFNAME =~ ^[A-Za-z0-9_.:@-]+$ ]] || { echo "SOCKET_IFNAME '$SOCKET_IFNAME' is not a network interface name" >&2; exit 2; }
MODULE=${MODULE:-bert_ds.train}
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} BERT_DS_HOSTFILE=$(realpath "$HOSTFILE")
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}
[ "${SKIP_HOST_CHECK:-0}" = 1 ] || "$PYTHON" -m bert_ds.preflight --hostfile="$HOSTFILE" --master-addr="$MASTER_ADDR"
FORWARD_ENV=${FORWARD_ENV:-MASTER_ADDR MASTER_PORT OMP_NUM_THREADS GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME TORCH_EXTENSIONS_DIR TOKENIZERS_PARALLELISM HF_HOME BERT_DS_PREFLIGHT_TIMEOUT BERT_DS_HOSTFILE}
xs=""; for v in $FORWARD_ENV; do [ -z "${!v+x}" ] || xs+=" -x $v"; done
# DeepSpeed's Open MPI runner passes neither MASTER_ADDR nor MASTER_PORT to the ranks (hence -x) and adds
# `--mca btl_tcp_if_include eth0` unless the interface is given here; --force_multi: also for a one-host hostfile
exec "$DEEPSPEED" --hostfile "$HOSTFILE" --launcher openmpi --force_multi --no_ssh_check --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" \
  --launcher_args="--mca btl_tcp_if_include $SOCKET_IFNAME --mca oob_tcp_if_include $SOCKET_IFNAME$xs ${LAUNCHER_ARGS:-}" \
  --module "$MODULE" "$@"
