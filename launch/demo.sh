#!/usr/bin/env bash
# The main job end to end on an embedded corpus (no download, no ../shared):
# corpus -> WordPiece vocab -> indexed shards (+ held-out split) -> inspect.
# Usage: bash launch/demo.sh   (or `make demo`). Outputs go to $DEMO_DIR (default demo_out/).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEMO_DIR=${DEMO_DIR:-demo_out}
WORKERS=${WORKERS:-2}
mkdir -p "$DEMO_DIR"

echo "== 1/4 corpus: docstrings of Python's standard library (real English prose, on every machine)"
$PYTHON -m data_tools.sample_corpus stdlib --output "$DEMO_DIR/corpus.txt" --num-docs 0

echo "== 2/4 WordPiece vocabulary"
$PYTHON -m data_tools.train_tokenizer --input "$DEMO_DIR/corpus.txt" --output "$DEMO_DIR/vocab" --vocab-size 8000

echo "== 3/4 indexed shards ($WORKERS workers, 5% of documents held out)"
$PYTHON -m data_tools.preprocess --input "$DEMO_DIR/corpus.txt" --tokenizer "$DEMO_DIR/vocab" \
  --output-prefix "$DEMO_DIR/shards/train" --workers "$WORKERS" --valid-fraction 0.05

echo "== 4/4 inspect"
$PYTHON -m data_tools.inspect "$DEMO_DIR/shards/train" --verify --samples 1

cat <<MSG

Demo outputs:
  corpus      $DEMO_DIR/corpus.txt
  vocabulary  $DEMO_DIR/vocab/            (vocab.txt, tokenizer.json)
  shards      $DEMO_DIR/shards/train.{bin,idx,json}
  held out    $DEMO_DIR/shards/train_valid.{bin,idx,json}
MSG
