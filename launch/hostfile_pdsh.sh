#!/usr/bin/env bash
# Several nodes from one command: pdsh ssh'es to every host of the hostfile and starts DeepSpeed's per-node launcher.
# Run it on the first host; needs passwordless ssh to every host and the same paths (repo, venv, data) on all.
#   HOSTFILE=hostfiles/example_2x8 SOCKET_IFNAME=eth0 launch/hostfile_pdsh.sh launch/configs/bert_base_phase1.yaml [key=value ...]
# Environment (defaults): HOSTFILE (required), MASTER_ADDR (the first host of HOSTFILE), MASTER_PORT (29500),
# SOCKET_IFNAME (unset; sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME), PYTHON, MODULE (bert_ds.train),
# FORWARD_ENV (exported variables handed to the ranks, besides NCCL*/PYTHON*/UCX*/MV2*/MLFLOW*: pdsh forwards none),
# PDSH_SSH_ARGS_APPEND (extra ssh options, e.g. "-F my_ssh_config"), SKIP_HOST_CHECK (0).
# The remote command is built by bert_ds.cluster.pdsh with every word quoted, not by `deepspeed --launcher pdsh`
# (which quotes only words with a space): a working directory or an override with spaces, quotes or $(...) reaches
# the ranks as written and runs nothing.
set -euo pipefail
PYTHON=${PYTHON:-python}
HOSTFILE=${HOSTFILE:?set HOSTFILE to a hostfile (lines of 'HOSTNAME slots=N', see hostfiles/)}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE" 2>/dev/null || true)}
MASTER_PORT=${MASTER_PORT:-29500}
MODULE=${MODULE:-bert_ds.train}
if [ -n "${SOCKET_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} BERT_DS_HOSTFILE=$(realpath "$HOSTFILE")
FORWARD_ENV=${FORWARD_ENV:-OMP_NUM_THREADS GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME TORCH_EXTENSIONS_DIR TOKENIZERS_PARALLELISM HF_HOME BERT_DS_PREFLIGHT_TIMEOUT BERT_DS_HOSTFILE}
# every host resolves and takes a non-interactive ssh login, with the options pdsh will use (exit 2 if not)
[ "${SKIP_HOST_CHECK:-0}" = 1 ] || "$PYTHON" -m bert_ds.preflight --hostfile="$HOSTFILE" --ssh --master-addr="$MASTER_ADDR"
exec "$PYTHON" -m bert_ds.cluster.pdsh --hostfile="$HOSTFILE" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
  --forward-env="$FORWARD_ENV" --module -- "$MODULE" "$@"
