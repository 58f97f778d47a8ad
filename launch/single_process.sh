#!/usr/bin/env bash
# One process: CPU, or one GPU.
#   launch/single_process.sh launch/configs/tiny_demo.yaml [key=value ...]
# Environment (defaults): PYTHON (python), MODULE (bert_ds.train; bert_ds.preflight checks the config, data and
# vocabulary without training).
set -euo pipefail
PYTHON=${PYTHON:-python}
MODULE=${MODULE:-bert_ds.train}
exec "$PYTHON" -m "$MODULE" "$@"
