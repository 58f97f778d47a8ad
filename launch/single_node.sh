#!/usr/bin/env bash
# One node, NUM_GPUS ranks (one per GPU; on a CPU-only machine, NUM_GPUS processes), all on loopback.
#   NUM_GPUS=8 launch/single_node.sh launch/configs/bert_base_phase1.yaml data.train_prefix=data/train [key=value ...]
# Environment (defaults): NUM_GPUS (GPUs listed by nvidia-smi, else 1), MASTER_PORT (29500), PYTHON (python),
# DEEPSPEED (the deepspeed next to PYTHON), MODULE (bert_ds.train; bert_ds.preflight only checks the ranks),
# OMP_NUM_THREADS (1 per rank, as torchrun does), GLOO_SOCKET_IFNAME (lo).
set -euo pipefail
PYTHON=${PYTHON:-python}
DEEPSPEED=${DEEPSPEED:-$(dirname "$(command -v "$PYTHON")")/deepspeed}
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
NUM_GPUS=${NUM_GPUS:-1}; [ "$NUM_GPUS" -gt 0 ] || NUM_GPUS=1
MASTER_PORT=${MASTER_PORT:-29500}
MODULE=${MODULE:-bert_ds.train}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
# --master_addr: without it DeepSpeed would take an address from `hostname -I`
exec "$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_addr 127.0.0.1 --master_port "$MASTER_PORT" --module "$MODULE" "$@"
