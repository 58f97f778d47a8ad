"""Score a checkpoint or a Hugging Face BERT on a fixed masked-LM / next-sentence evaluation set.

    python -m bert_ds.evaluate RUN_DIR [--data PREFIX] [--json]        # newest checkpoint; default data: the run's valid_prefix
    python -m bert_ds.evaluate RUN_DIR/checkpoints/step00001000 --data PREFIX
    python -m bert_ds.evaluate HF_DIR --data PREFIX [--json]           # e.g. an export, or a released BERT

Metrics: MLM loss (mean over masked tokens), masked-token accuracy, perplexity (exp of the MLM
loss) and NSP accuracy, one CPU process in fp32 (the fp32 master weights of a checkpoint).

The evaluation set is the trainer's (``bert_ds.data.run_datasets.eval_dataset``): the first
``num_samples`` sentence pairs of epoch 0 of PREFIX with their masks, all functions of the seed,
so every call sees the same samples and masks (MLPerf's BERT benchmark uses a fixed 10,000-sample
set in the same spirit). Its settings are the run config's ``seed``, ``data`` and ``eval`` sections:
from the run's ``config.yaml`` for a checkpoint, from ``bert_ds_export.json`` for a directory bert-ds
exported (so a checkpoint and its export give the same numbers), and otherwise the run-config
defaults (seed 1234, 1000 samples, 15% masking, 128 tokens); the flags override them. PREFIX must be
tokenized with the model's vocabulary (checked against the shard metadata).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from bert_ds.checkpoint import CheckpointError
from bert_ds.config import ConfigError
from bert_ds.data.run_datasets import eval_dataset
from bert_ds.data.vocab import resolve_vocab
from bert_ds.evaluation import METRICS, eval_config, evaluate
from bert_ds.hf.sources import CheckpointSource, load_pretraining_model, open_source, start_command

log = logging.getLogger("bert_ds.evaluate")
# command-line flags -> the run-config keys they override
FLAG_KEYS = {"seed": "seed", "num_samples": "eval.num_samples", "mask_prob": "eval.mask_prob",
             "max_seq_length": "data.max_seq_length", "micro_batch_size": "eval.micro_batch_size"}


def run(source_path: str | Path, data: str | None = None, **flags) -> dict:
    """Evaluate ``source_path`` on ``data``; ``flags`` (keys of ``FLAG_KEYS``) override the run's settings."""
    source = open_source(source_path)
    if isinstance(source, CheckpointSource):
        settings, default_data = source.run_config.to_dict(), source.run_config.data.valid_prefix
        attn = source.run_config.model.attn_implementation
    else:
        info = source.export_info
        settings = info.get("run_config") or info.get("eval")  # "eval": the flat settings older exports recorded
        default_data, attn = info.get("training", {}).get("valid_prefix"), "sdpa"
    prefix = data or default_data
    if not prefix:
        raise ConfigError(f"{source_path}: give --data PREFIX (shards tokenized with the model's vocabulary)")
    overrides = [f"{FLAG_KEYS[k]}={v}" for k, v in flags.items() if v is not None]
    cfg = eval_config(settings, prefix, source.tokenizer_dir, source.bert_config.max_position_embeddings, overrides)
    vocab = resolve_vocab(cfg)  # the shards must be tokenized with the model's vocabulary
    if vocab.size != source.bert_config.vocab_size:
        raise ConfigError(f"{source.tokenizer_dir}: the tokenizer has {vocab.size} tokens, the model {source.bert_config.vocab_size}")
    model = load_pretraining_model(source, attn_implementation=attn, seed=cfg.seed)
    micro_batch_size = cfg.eval.resolve_micro_batch_size(cfg.train.micro_batch_size)
    result = evaluate(model, eval_dataset(cfg, vocab), micro_batch_size, 0, 1, torch.device("cpu"))
    out = {name: result[f"eval/{name}"] for name in METRICS if f"eval/{name}" in result}  # no nsp_acc for MLM-only rows
    out.update(source=source.describe(), data=str(prefix), num_samples=cfg.eval.num_samples, seed=cfg.seed,
               mask_prob=cfg.eval.mask_prob, max_seq_length=cfg.data.max_seq_length)
    if isinstance(source, CheckpointSource):
        out["step"] = source.step
    return out


def format_table(result: dict) -> str:
    rows = [
        ("source", result["source"]),
        ("data", f"{result['data']} ({result['num_samples']} samples of {result['max_seq_length']} tokens, "
                 f"{result['mask_prob']:.0%} masked, seed {result['seed']})"),
        ("mlm_loss", f"{result['mlm_loss']:.4f}"),
        ("mlm_acc", f"{result['mlm_acc']:.4f}"),
        ("perplexity", f"{result['perplexity']:.3f}"),
        *([("nsp_acc", f"{result['nsp_acc']:.4f}")] if "nsp_acc" in result else []),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bert_ds.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run dir (newest checkpoint), a checkpoints/ or stepNNNNNNNN dir, or a Hugging Face BERT dir")
    p.add_argument("--data", help="shard prefix to evaluate on (default: the run's data.valid_prefix)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--seed", type=int, help="seed of the fixed set's pairs and masks")
    p.add_argument("--num-samples", type=int, help="size of the fixed set")
    p.add_argument("--mask-prob", type=float, help="masking rate (runs evaluate at 0.15)")
    p.add_argument("--max-seq-length", type=int, help="tokens per sequence")
    p.add_argument("--micro-batch-size", type=int, help="sequences per forward pass (does not change the numbers)")
    args = p.parse_args(argv)
    start_command("bert_ds.data.pretraining")
    try:
        result = run(args.source, args.data, seed=args.seed, num_samples=args.num_samples, mask_prob=args.mask_prob,
                     max_seq_length=args.max_seq_length, micro_batch_size=args.micro_batch_size)  # fmt: skip
    except (CheckpointError, ConfigError) as e:
        raise SystemExit(f"evaluate error: {e}") from None
    sys.stdout.write(json.dumps(result) + "\n" if args.json else format_table(result))


if __name__ == "__main__":
    main()
