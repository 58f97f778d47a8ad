#!/usr/bin/env bash
# Preprocess a corpus as a SLURM job array of NUM_PARTS tasks, then merge the parts in a job that starts only
# when every task succeeded (--dependency=afterok). Prints "<array job id> <merge job id>".
#   NUM_PARTS=8 PARTS_PREFIX=data/part OUTPUT_PREFIX=data/train launch/slurm/preprocess.sh \
#       --input corpus/ --tokenizer vocab/ --valid-fraction 0.01 --workers 8
# Arguments: data_tools.preprocess options (all but --output-prefix/--shard-index/--num-shards).
# Environment (defaults): NUM_PARTS, PARTS_PREFIX, OUTPUT_PREFIX (required), PYTHON (python),
# SBATCH_ARGS (extra sbatch options for both jobs separated by spaces, e.g. "--partition=cpu --cpus-per-task=8"; taken
# word for word: no quoting, no globbing, no expansion).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
: "${NUM_PARTS:?}" "${PARTS_PREFIX:?}" "${OUTPUT_PREFIX:?}"
# a number, checked before any arithmetic: bash evaluates $((...)) operands as expressions, $(...) in subscripts included
[[ $NUM_PARTS =~ ^[1-9][0-9]*$ ]] || { echo "NUM_PARTS must be a whole number >= 1, got '$NUM_PARTS'" >&2; exit 2; }
export NUM_PARTS PARTS_PREFIX OUTPUT_PREFIX
read -r -d "" -a extra <<< "${SBATCH_ARGS:-}" || true  # words split at whitespace, never globbed or expanded
array=$(sbatch --parsable "${extra[@]}" --array="0-$((NUM_PARTS - 1))" "$HERE/preprocess_array.sbatch" "$@")
array=${array%%;*}
merge=$(sbatch --parsable "${extra[@]}" --dependency="afterok:$array" --kill-on-invalid-dep=yes "$HERE/merge.sbatch")
echo "${array} ${merge%%;*}"
