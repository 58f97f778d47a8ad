"""Score a checkpoint or a Hugging Face BERT on a fixed masked-LM / next-sentence evaluation set.

    python -m bert_ds.evaluate RUN_DIR [--data PREFIX] [--json]        # newest checkpoint; default data: the run's valid_prefix
    python -m bert_ds.evaluate RUN_DIR/checkpoints/step00001000 --data PREFIX
    python -m bert_ds.evaluate HF_DIR --data PREFIX [--json]           # e.g. an export, or a released BERT

Metrics: MLM loss (mean over masked tokens), masked-token accuracy, perplexity (exp of the MLM
loss) and NSP accuracy, one CPU process in fp32 (the fp32 master weights of a checkpoint).

The evaluation set is the trainer's (``bert_ds.trainer.build_eval_dataset``): the first
``num_samples`` sentence pairs of epoch 0 of PREFIX with their masks, all functions of the seed,
so every call sees the same samples and masks (MLPerf's BERT benchmark uses a fixed 10,000-sample
set in the same spirit). Its settings come from the run's ``config.yaml`` for a checkpoint, from
``bert_ds_export.json`` for a directory bert-ds exported (so a checkpoint and its export give the
same numbers), and otherwise from the run-config defaults (seed 1234, 1000 samples, 15% masking,
128 tokens); the flags override them. PREFIX must be tokenized with the model's vocabulary
(checked against the shard metadata).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from bert_ds.checkpoint import CheckpointError
from bert_ds.config import ConfigError, DataConfig, EvalConfig, RunConfig, TrainConfig, run_config_from_dict
from bert_ds.hf_checkpoint import CheckpointSource, load_pretraining_model, open_source
from bert_ds.trainer import build_eval_dataset, evaluate
from bert_ds.vocab import resolve_vocab

log = logging.getLogger("bert_ds.evaluate")
METRICS = ("mlm_loss", "mlm_acc", "perplexity", "nsp_acc")
_DATA_KEYS = ("max_seq_length", "short_seq_prob", "whole_word_mask", "max_predictions_per_seq", "nsp_mode")


def _field_default(cls: type, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def default_settings() -> dict:
    """The run-config defaults: what a run that set nothing would evaluate with."""
    return {
        "seed": _field_default(RunConfig, "seed"),
        "num_samples": _field_default(EvalConfig, "num_samples"),
        "mask_prob": _field_default(EvalConfig, "mask_prob"),
        "micro_batch_size": _field_default(TrainConfig, "micro_batch_size"),
        **{k: _field_default(DataConfig, k) for k in _DATA_KEYS},
    }


def run_settings(cfg: RunConfig) -> dict:
    """The evaluation settings of a training run (what its in-training evaluation used)."""
    return {
        "seed": cfg.seed,
        "num_samples": cfg.eval.num_samples,
        "mask_prob": cfg.eval.mask_prob,
        "micro_batch_size": cfg.eval.resolve_micro_batch_size(cfg.train.micro_batch_size),
        **{k: getattr(cfg.data, k) for k in _DATA_KEYS},
    }


def eval_config(settings: dict, prefix: str, tokenizer_dir: Path, max_positions: int) -> RunConfig:
    """A run config whose evaluation set is the one to score (only its data, eval and seed matter)."""
    return run_config_from_dict(
        {
            "run_dir": "(evaluation)",
            "seed": settings["seed"],
            "model": {"overrides": {"max_position_embeddings": max_positions}},
            "data": {"train_prefix": [prefix], "valid_prefix": prefix, "tokenizer": str(tokenizer_dir),
                     **{k: settings[k] for k in _DATA_KEYS}},
            "train": {"max_steps": 1, "micro_batch_size": settings["micro_batch_size"]},
            "eval": {"num_samples": settings["num_samples"], "mask_prob": settings["mask_prob"]},
        },  # fmt: skip
        source="the evaluation settings",
    )


def run(source_path: str | Path, data: str | None = None, **flags) -> dict:
    """Evaluate ``source_path`` on ``data``; ``flags`` override settings (seed, num_samples, mask_prob, ...)."""
    source = open_source(source_path)
    if isinstance(source, CheckpointSource):
        settings, default_data = run_settings(source.run_config), source.run_config.data.valid_prefix
        attn = source.run_config.model.attn_implementation
    else:
        info = source.export_info
        settings = {**default_settings(), **info.get("eval", {})}
        default_data, attn = info.get("training", {}).get("valid_prefix"), "sdpa"
    settings.update({k: v for k, v in flags.items() if v is not None})
    prefix = data or default_data
    if not prefix:
        raise ConfigError(f"{source_path}: give --data PREFIX (shards tokenized with the model's vocabulary)")
    cfg = eval_config(settings, prefix, source.tokenizer_dir, source.bert_config.max_position_embeddings)
    vocab = resolve_vocab(cfg)  # the shards must be tokenized with the model's vocabulary
    if vocab.size != source.bert_config.vocab_size:
        raise ConfigError(f"{source.tokenizer_dir}: the tokenizer has {vocab.size} tokens, the model {source.bert_config.vocab_size}")
    eval_set = build_eval_dataset(cfg, vocab)
    model = load_pretraining_model(source, attn_implementation=attn, seed=settings["seed"])
    result = evaluate(model, eval_set, settings["micro_batch_size"], 0, 1, torch.device("cpu"))
    out = {name: result[f"eval/{name}"] for name in METRICS}
    out.update(source=source.describe(), data=str(prefix), **{k: settings[k] for k in ("num_samples", "seed", "mask_prob", "max_seq_length")})
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
        ("nsp_acc", f"{result['nsp_acc']:.4f}"),
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "bert_ds.pretraining_data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result = run(args.source, args.data, seed=args.seed, num_samples=args.num_samples, mask_prob=args.mask_prob,
                     max_seq_length=args.max_seq_length, micro_batch_size=args.micro_batch_size)  # fmt: skip
    except (CheckpointError, ConfigError) as e:
        raise SystemExit(f"evaluate error: {e}") from None
    sys.stdout.write(json.dumps(result) + "\n" if args.json else format_table(result))


if __name__ == "__main__":
    main()
