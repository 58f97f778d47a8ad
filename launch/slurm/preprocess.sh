#!/usr/bin/env bash
# Preprocess a corpus as a SLURM job array of NUM_PARTS tasks, then merge the parts in a job that starts only
# when every task succeeded (--dependency=afterok). Prints "<array job id> <merge job id>".
#   NUM_PARTS=8 PARTS_PREFIX=data/part OUTPUT_PREFIX=data/train launch/slurm/preprocess.sh \
#       --input corpus/ --tokenizer vocab/ --valid-fraction 0.01 --workers 8
# Arguments: data_tools.preprocess options (all but --output-prefix/--shard-index/--num-shards).
# Environment (defaults): NUM_PARTS, PARTS_PREFIX, OUTPUT_PREFIX (required), PYTHON (python),
# SBATCH_ARGS (extra sbatch options for both jobs, e.g. "--partition=cpu --cpus-per-task=8").
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
: "${NUM_PARTS:?}" "${PARTS_PREFIX:?}" "${OUTPUT_PREFIX:?}"
export NUM_PARTS PARTS_PREFIX OUTPUT_PREFIX
# shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
array=$(sbatch --parsable ${SBATCH_ARGS:-} --array="0-$((NUM_PARTS - 1))" "$HERE/preprocess_array.sbatch" "$@")
array=${array%%;*}
# shellcheck disable=SC2086
merge=$(sbatch --parsable ${SBATCH_ARGS:-} --dependency="afterok:$array" --kill-on-invalid-dep=yes "$HERE/merge.sbatch")
echo "${array} ${merge%%;*}"
