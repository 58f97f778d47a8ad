#!/usr/bin/env bash
# Print a hostfile for the current SLURM allocation (or for NODELIST): one line per node, SLOTS ranks each.
#   hostfiles/from_slurm.sh > hostfile                      # inside an allocation; SLOTS defaults to $SLURM_NTASKS_PER_NODE
#   NODELIST='gpu[001-004]' SLOTS=8 hostfiles/from_slurm.sh  # anywhere (no scontrol needed)
set -euo pipefail
PYTHON=${PYTHON:-python}
NODELIST=${NODELIST:-${SLURM_JOB_NODELIST:?not in a SLURM allocation: set NODELIST}}
SLOTS=${SLOTS:-${SLURM_NTASKS_PER_NODE:?set SLOTS to the ranks per node (one per GPU)}}
exec "$PYTHON" -m bert_ds.hostfile from-slurm --nodelist "$NODELIST" --slots "$SLOTS"
