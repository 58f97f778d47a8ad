#!/usr/bin/env bash
# Open MPI's mpirun starts the ranks; bert_ds.cluster.dist reads them from OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK.
#   NP=2 launch/mpirun.sh launch/configs/tiny_demo.yaml [key=value ...]                                  # this node
#   NP=16 HOSTFILE=hostfiles/example_2x8 SOCKET_IFNAME=eth0 launch/mpirun.sh CONFIG [key=value ...]     # across nodes
# Environment (defaults): NP (required), HOSTFILE (unset: this node), MASTER_ADDR (the first host of HOSTFILE, else
# 127.0.0.1), MASTER_PORT (29500), SOCKET_IFNAME (lo on one node; sets GLOO/NCCL_SOCKET_IFNAME and Open MPI's TCP
# interfaces), PYTHON, MODULE (bert_ds.train), FORWARD_ENV (variables exported to the ranks with -x),
# MPIRUN_ARGS (extra mpirun options separated by spaces, e.g. "--allow-run-as-root" or "--map-by ppr:8:node"; taken
# word for word: no quoting, no globbing, no expansion).
set -euo pipefail
PYTHON=${PYTHON:-python}
NP=${NP:?set NP to the number of ranks}
MODULE=${MODULE:-bert_ds.train}
if [ -n "${HOSTFILE:-}" ]; then
  MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE" 2>/dev/null || true)}
  export BERT_DS_HOSTFILE=$(realpath "$HOSTFILE")
  [ "${SKIP_HOST_CHECK:-0}" = 1 ] || "$PYTHON" -m bert_ds.preflight --hostfile="$HOSTFILE" --master-addr="$MASTER_ADDR"
else
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} SOCKET_IFNAME=${SOCKET_IFNAME:-lo}
fi
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
args=()
if [ -n "${SOCKET_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}
  args+=(--mca btl_tcp_if_include "$SOCKET_IFNAME" --mca oob_tcp_if_include "$SOCKET_IFNAME")
fi
FORWARD_ENV=${FORWARD_ENV:-MASTER_ADDR MASTER_PORT OMP_NUM_THREADS GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME TORCH_EXTENSIONS_DIR TOKENIZERS_PARALLELISM HF_HOME BERT_DS_PREFLIGHT_TIMEOUT BERT_DS_HOSTFILE PATH}
read -r -d "" -a forward <<< "$FORWARD_ENV" || true
for v in "${forward[@]}"; do [ -z "${!v+x}" ] || args+=(-x "$v"); done
read -r -d "" -a extra <<< "${MPIRUN_ARGS:-}" || true  # words split at whitespace, never globbed or expanded
hostfile=(); [ -z "${HOSTFILE:-}" ] || hostfile=(--hostfile "$HOSTFILE")
exec mpirun -np "$NP" "${hostfile[@]}" "${args[@]}" "${extra[@]}" "$PYTHON" -u -m "$MODULE" "$@"
