#!/usr/bin/env bash
# The main job end to end on an embedded corpus (no download, no ../shared):
# corpus -> WordPiece vocab -> indexed shards (+ held-out split) -> inspect ->
# 2-rank DeepSpeed pretraining (ZeRO-2, bf16, LAMB) with evaluation -> TensorBoard logs + checkpoint.
# Usage: bash launch/demo.sh   (or `make demo`). Outputs go to $DEMO_DIR (default demo_out/).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEMO_DIR=${DEMO_DIR:-demo_out}
WORKERS=${WORKERS:-2}
NUM_RANKS=${NUM_RANKS:-2}
# on a CPU machine the ranks share the cores: one thread each, loopback only
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
MASTER_PORT=${MASTER_PORT:-29517}
DEEPSPEED=${DEEPSPEED:-$(dirname "$PYTHON")/deepspeed}
mkdir -p "$DEMO_DIR"

echo "== 1/5 corpus: docstrings of Python's standard library (real English prose, on every machine)"
"$PYTHON" -m data_tools.sample_corpus stdlib --output "$DEMO_DIR/corpus.txt" --num-docs 0

echo "== 2/5 WordPiece vocabulary"
"$PYTHON" -m data_tools.train_tokenizer --input "$DEMO_DIR/corpus.txt" --output "$DEMO_DIR/vocab" --vocab-size 8000

echo "== 3/5 indexed shards ($WORKERS workers, 5% of documents held out)"
"$PYTHON" -m data_tools.preprocess --input "$DEMO_DIR/corpus.txt" --tokenizer "$DEMO_DIR/vocab" \
  --output-prefix "$DEMO_DIR/shards/train" --workers "$WORKERS" --valid-fraction 0.05

echo "== 4/5 inspect"
"$PYTHON" -m data_tools.inspect "$DEMO_DIR/shards/train" --verify --samples 1

echo "== 5/5 pretraining: $NUM_RANKS DeepSpeed ranks, launch/configs/tiny_demo.yaml"
rm -rf "$DEMO_DIR/run"  # a fresh run each time (a second `make demo` would otherwise resume the finished one)
"$DEEPSPEED" --num_gpus "$NUM_RANKS" --master_addr 127.0.0.1 --master_port "$MASTER_PORT" \
  --module bert_ds.train launch/configs/tiny_demo.yaml run_dir="$DEMO_DIR/run" \
  data.train_prefix="$DEMO_DIR/shards/train" data.valid_prefix="$DEMO_DIR/shards/train_valid" "$@"

cat <<MSG

Demo outputs:
  corpus       $DEMO_DIR/corpus.txt
  vocabulary   $DEMO_DIR/vocab/                 (vocab.txt, tokenizer.json)
  shards       $DEMO_DIR/shards/train.{bin,idx,json}
  held out     $DEMO_DIR/shards/train_valid.{bin,idx,json}
  run config   $DEMO_DIR/run/config.yaml, $DEMO_DIR/run/ds_config.json
  checkpoints  $DEMO_DIR/run/checkpoints/         (latest: $(cat "$DEMO_DIR/run/checkpoints/latest" 2>/dev/null))
  TensorBoard  $DEMO_DIR/run/tensorboard/         (tensorboard --logdir $DEMO_DIR/run/tensorboard --host 127.0.0.1)
MSG
