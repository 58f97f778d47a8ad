"""Export a bert-ds checkpoint as a Hugging Face BERT directory.

    python -m bert_ds.export RUN_DIR OUT_DIR                          # the run's newest complete checkpoint
    python -m bert_ds.export RUN_DIR/checkpoints/step00001000 OUT_DIR  # one checkpoint

Any ZeRO stage and any number of ranks, in one CPU process (no torch.distributed, no GPU);
the fp32 master weights are used when the run kept them (bf16/fp16 training). OUT_DIR gets:

* ``config.json`` and ``model.safetensors`` (fp32): a ``BertForPreTraining`` with both heads,
  loadable with ``AutoModelForPreTraining``, ``AutoModelForMaskedLM`` and
  ``pipeline("fill-mask", model=OUT_DIR)``;
* the tokenizer files of the run (``tokenizer.json``, ``vocab.txt``, ``tokenizer_config.json``,
  ``special_tokens_map.json``);
* ``README.md``, a model card (data, steps, evaluation), and ``bert_ds_export.json`` (the source
  checkpoint and the run's resolved config, whose ``seed``, ``data`` and ``eval`` sections let
  ``python -m bert_ds.evaluate OUT_DIR --data PREFIX`` score the export on the same fixed set as the checkpoint).

The directory is built beside OUT_DIR and renamed into place when complete
(``bert_ds.files.atomic_directory``): a crash leaves the previous OUT_DIR, never a mix.
Peak memory is about the fp32 model once plus one rank's partition of it (see
``bert_ds.zero.consolidate``); ``model.safetensors`` is written tensor by tensor, without the second
in-memory copy ``safetensors.torch.save_file`` makes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from bert_ds.checkpoint import CheckpointError
from bert_ds.config import ConfigError
from bert_ds.data.metadata import read_metadata
from bert_ds.data.vocab import load_tokenizer
from bert_ds.files import atomic_directory
from bert_ds.hf.sources import EXPORT_INFO, CheckpointSource, open_checkpoint, skeleton, start_command

log = logging.getLogger("bert_ds.export")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32"}


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format written one tensor at a time (no second copy of the model in memory).

    Layout: 8-byte little-endian header length, a JSON header (dtype, shape, byte range of
    every tensor, padded with spaces to 8 bytes), then the tensors' bytes back to back.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            # a byte view of the tensor's own memory: no copy for contiguous tensors (all of ours)
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def export(source: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Write the Hugging Face directory; returns what ``bert_ds_export.json`` records."""
    src = open_checkpoint(source)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        if any((out / f).exists() for f in ("config.json", "model.safetensors")):
            raise CheckpointError(f"{out} already holds a model (config.json / model.safetensors); choose another OUT_DIR or pass --overwrite")
        if not out.is_dir() or any(out.iterdir()):
            raise CheckpointError(f"{out} exists and is not empty; choose another OUT_DIR or pass --overwrite to replace it as a whole")
    with atomic_directory(out, replace=True) as tmp:
        weights, where = src.fp32_weights()
        num_params = skeleton(src.bert_config).numel
        log.info("%s: %s, %d parameters (%.1f MB in fp32)", src.describe(), where, num_params, num_params * 4 / 1e6)
        write_safetensors(tmp / "model.safetensors", weights, {"format": "pt"})
        del weights

        config = src.bert_config
        config.architectures = ["BertForPreTraining"]
        config.dtype = "float32"
        config.save_pretrained(tmp)
        copied = _copy_tokenizer(src.tokenizer_dir, tmp, config.max_position_embeddings)

        info = _export_info(src, where, num_params)
        (tmp / "README.md").write_text(model_card(src, info, out))
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log.info("wrote %s: config.json, model.safetensors, %s, README.md, %s", out, ", ".join(copied), EXPORT_INFO)
    return info


def _copy_tokenizer(tokenizer_dir: Path, out: Path, max_positions: int) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, out / name)
            copied.append(name)
    if "tokenizer_config.json" not in copied:  # a bare vocab.txt: say which tokenizer class reads it
        lowercase = "lowercase=True" in repr(load_tokenizer(tokenizer_dir).normalizer)
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "model_max_length": max_positions}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied.append("tokenizer_config.json (written)")
    return copied


def _export_info(src: CheckpointSource, where: str, num_params: int) -> dict:
    cfg, marker = src.run_config, src.marker
    return {
        "source": str(src.tag_dir),
        "step": src.step,
        "trainer_state": marker.get("state", {}),
        "weights": where,
        "num_parameters": num_params,
        "training": {
            "world_size": marker.get("world_size"), "zero_stage": marker.get("zero_stage"), "precision": marker.get("precision"),
            "init_from": cfg.model.init_from or None, "preset": None if cfg.model.init_from else cfg.model.preset,
            "train_prefix": cfg.data.train_prefix, "valid_prefix": cfg.data.valid_prefix or None,
            "max_seq_length": cfg.data.max_seq_length, "mask_prob": cfg.data.mask_prob, "nsp_mode": cfg.data.nsp_mode,
            "optimizer": cfg.optimizer.name, "lr": cfg.optimizer.lr, "scheduler": cfg.scheduler.name, "max_steps": cfg.train.max_steps,
            "micro_batch_size": cfg.train.micro_batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
        },
        # the run's resolved config: bert_ds.evaluate rebuilds the fixed evaluation set from its seed, data and eval sections
        "run_config": cfg.to_dict(),
        "vocab_sha256": marker.get("vocab_sha256"),
        "metrics": _logged_metrics(src.run_dir / "tensorboard", src.step),
    }  # fmt: skip


def _logged_metrics(tensorboard_dir: Path, step: int) -> dict:
    """The last evaluation (and training loss) the run logged at or before ``step``; {} without TensorBoard files."""
    if not tensorboard_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    found = {}
    for tag in ("eval/mlm_loss", "eval/mlm_acc", "eval/perplexity", "eval/nsp_acc", "train/loss", "train/mlm_loss"):
        if tag in acc.Tags()["scalars"]:
            events = [e for e in acc.Scalars(tag) if e.step <= step]
            if events:
                found[tag] = {"step": events[-1].step, "value": events[-1].value}
    return found


def _shard_summary(prefix: str) -> str:
    counts = read_metadata(prefix).get("counts", {}) if Path(f"{prefix}.json").exists() else {}
    if not counts:
        return f"`{prefix}`"
    return f"`{prefix}` ({counts.get('documents', '?'):,} documents, {counts.get('sentences', '?'):,} sentences, {counts.get('tokens', '?'):,} tokens)"


def model_card(src: CheckpointSource, info: dict, out: Path) -> str:
    c, t, m = src.bert_config, info["training"], info["metrics"]
    e = {"seed": src.run_config.seed, "num_samples": src.run_config.eval.num_samples, "mask_prob": src.run_config.eval.mask_prob}
    start = f"the Hugging Face checkpoint `{t['init_from']}` (continued pretraining)" if t["init_from"] else f"random initialisation (preset `{t['preset']}`)"
    state = info["trainer_state"]
    lines = [
        "---", "library_name: transformers", "pipeline_tag: fill-mask", "tags: [bert, fill-mask, bert-ds]", "---", "",
        f"# {out.name}", "",
        f"A BERT (masked LM + {'next-sentence' if t['nsp_mode'] == 'nsp' else 'sentence-order'} prediction) pretrained with "
        f"bert-ds from {start}, exported from `{info['source']}`.", "",
        "## Model", "",
        "| layers | hidden | heads | intermediate | vocabulary | positions | parameters |", "|---|---|---|---|---|---|---|",
        f"| {c.num_hidden_layers} | {c.hidden_size} | {c.num_attention_heads} | {c.intermediate_size} | {c.vocab_size:,} | "
        f"{c.max_position_embeddings} | {info['num_parameters']:,} |", "",
        f"Weights: {info['weights']}, stored in fp32. Heads: MLM (`cls.predictions`, decoder tied to the word embeddings) and "
        f"NSP (`cls.seq_relationship`).", "",
        "## Training", "",
        f"* data: {', '.join(_shard_summary(p) for p in t['train_prefix'])}",
        f"* steps: {info['step']:,} of {t['max_steps']:,}; {state.get('consumed_samples', 0):,} sequences, "
        f"{state.get('tokens_seen', 0):,} non-padding tokens",
        f"* sequence length {t['max_seq_length']}, masking {t['mask_prob']:.0%}; {t['optimizer']} at lr {t['lr']:g} ({t['scheduler']} schedule)",
        f"* {t['world_size']} ranks, ZeRO stage {t['zero_stage']}, {t['precision']}; micro-batch {t['micro_batch_size']} x "
        f"accumulation {t['grad_accum_steps']}", "",
        "## Evaluation", "",
    ]  # fmt: skip
    if "eval/mlm_loss" in m:
        step = m["eval/mlm_loss"]["step"]
        lines += [
            f"Held-out set {_shard_summary(t['valid_prefix']) if t['valid_prefix'] else ''}: a fixed set of {e['num_samples']} "
            f"sentence pairs and masks ({e['mask_prob']:.0%} masking, seed {e['seed']}), as logged by the trainer at step {step}:", "",
            "| MLM loss | MLM accuracy | perplexity | NSP accuracy |", "|---|---|---|---|",
            "| " + " | ".join(f"{m[k]['value']:.4f}" if k in m else "-" for k in ("eval/mlm_loss", "eval/mlm_acc", "eval/perplexity", "eval/nsp_acc"))
            + " |",
        ]  # fmt: skip
    else:
        lines.append("The run logged no evaluation (no `data.valid_prefix`).")
    if "train/loss" in m:
        lines += ["", f"Training loss (MLM + NSP) at step {m['train/loss']['step']}: {m['train/loss']['value']:.4f}."]
    lines += [
        "", "Recompute on any shards made with this tokenizer (same fixed set for the checkpoint and this directory):", "",
        "```bash", f"python -m bert_ds.evaluate {out} --data {t['valid_prefix'] or 'PREFIX'}", "```", "",
        "## Use", "", "```python", "from transformers import pipeline", "",
        f'fill = pipeline("fill-mask", model="{out}")', 'fill("The capital of France is [MASK].")', "```", "",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bert_ds.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run directory (its newest complete checkpoint), its checkpoints/ dir, or one stepNNNNNNNN dir")
    p.add_argument("out_dir", help="the Hugging Face directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR as a whole (the old one stays until the new one is complete)")
    args = p.parse_args(argv)
    start_command("tensorboard")
    try:
        info = export(args.source, args.out_dir, overwrite=args.overwrite)
    except (CheckpointError, ConfigError) as e:
        raise SystemExit(f"export error: {e}") from None
    sys.stdout.write(json.dumps({"out_dir": str(args.out_dir), "source": info["source"], "step": info["step"], "weights": info["weights"]}) + "\n")


if __name__ == "__main__":
    main()
