#!/usr/bin/env bash
# Several nodes without ssh between them: start this once on every node of the hostfile, each with its NODE_RANK
# (its line in the hostfile, from 0). DeepSpeed's --no_ssh mode; the ranks meet at MASTER_ADDR (node 0).
#   HOSTFILE=hostfiles/example_2x8 NODE_RANK=0 SOCKET_IFNAME=eth0 launch/hostfile_no_ssh.sh CONFIG [key=value ...]   # node001
#   HOSTFILE=hostfiles/example_2x8 NODE_RANK=1 SOCKET_IFNAME=eth0 launch/hostfile_no_ssh.sh CONFIG [key=value ...]   # node002
# Environment (defaults): HOSTFILE (required), NODE_RANK (required), MASTER_ADDR (the first host of HOSTFILE),
# MASTER_PORT (29500), SOCKET_IFNAME (unset; sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME), PYTHON, DEEPSPEED,
# MODULE (bert_ds.train), SKIP_HOST_CHECK (0).
set -euo pipefail
PYTHON=${PYTHON:-python}
DEEPSPEED=${DEEPSPEED:-$(dirname "$(command -v "$PYTHON")")/deepspeed}
HOSTFILE=${HOSTFILE:?set HOSTFILE to a hostfile (lines of 'HOSTNAME slots=N', see hostfiles/)}
NODE_RANK=${NODE_RANK:?set NODE_RANK to the index of this node in the hostfile, from 0}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE" 2>/dev/null || true)}
MASTER_PORT=${MASTER_PORT:-29500}
MODULE=${MODULE:-bert_ds.train}
if [ -n "${SOCKET_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} BERT_DS_HOSTFILE=$(realpath "$HOSTFILE")
[ "${SKIP_HOST_CHECK:-0}" = 1 ] || "$PYTHON" -m bert_ds.preflight --hostfile="$HOSTFILE" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR"
exec "$DEEPSPEED" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module "$MODULE" "$@"
