"""Evaluation on a fixed held-out set: MLM loss, masked-token accuracy, perplexity and NSP accuracy.

The set is the run's own (``bert_ds.data.run_datasets.eval_dataset``): the first ``eval.num_samples``
sentence pairs of epoch 0 of ``data.valid_prefix`` with their masks, all functions of the seed, so
every evaluation (in training, of a checkpoint, of its export) sees the same samples and masks.
Its settings are the run config's own sections (``seed``, ``data``, ``eval``): a checkpoint carries
them in its run's ``config.yaml``, an export in ``bert_ds_export.json`` (:func:`eval_config`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from bert_ds.config import DataConfig, EvalConfig, RunConfig, run_config_from_dict
from bert_ds.data.loader import collate
from bert_ds.data.pretraining import PretrainingDataset

METRICS = ("mlm_loss", "mlm_acc", "perplexity", "nsp_acc")


@torch.no_grad()
def evaluate(model, eval_set: PretrainingDataset, micro_batch_size: int, rank: int, world_size: int, device: torch.device) -> dict[str, float]:
    """``eval/*`` metrics of ``model`` (a DeepSpeed engine or the bare model) on the fixed set; all ranks must call it."""
    model.eval()
    indices = list(range(rank, len(eval_set), world_size))
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # mlm loss sum, mlm correct, count, nsp correct, nsp count
    num_batches = math.ceil(len(indices) / micro_batch_size) if indices else 0
    # every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)
    num_batches = _max_over_ranks(num_batches, device)
    for b in range(num_batches):
        chunk = indices[b * micro_batch_size : (b + 1) * micro_batch_size]
        real = len(chunk)
        chunk = chunk or [0]  # a rank with no samples left still takes part, and counts nothing
        batch = {k: v.to(device) for k, v in collate([eval_set[i] for i in chunk]).items()}
        out = model(**batch)
        if real:
            sums += torch.stack([
                out.mlm_loss_sum.detach().double(), out.mlm_correct.double(), out.mlm_count.double(),
                out.nsp_correct.double(), out.nsp_count.double(),
            ])  # fmt: skip
    model.train()
    if tdist.is_initialized():
        tdist.all_reduce(sums)
    mlm_loss_sum, mlm_correct, mlm_n, nsp_correct, nsp_n = sums.tolist()
    mlm_loss = mlm_loss_sum / max(mlm_n, 1)
    result = {
        "eval/mlm_loss": mlm_loss,
        "eval/mlm_acc": mlm_correct / max(mlm_n, 1),
        "eval/perplexity": math.exp(min(mlm_loss, 50.0)),
    }
    if nsp_n:  # MLM-only rows (data.nsp_mode: none) have no pairs to score
        result["eval/nsp_acc"] = nsp_correct / nsp_n
    return result


def _max_over_ranks(value: int, device: torch.device) -> int:
    if not tdist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def _legacy_settings(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Sections from the flat ``eval`` entry of exports written before bert-ds exported the run config.

    Each key goes to the section that declares it, ``eval`` first (its ``mask_prob`` and
    ``micro_batch_size`` were the evaluation's), then ``data``, then the top level (``seed``).
    """
    sections: dict[str, Any] = {"eval": {}, "data": {}}
    eval_keys = {f.name for f in dataclasses.fields(EvalConfig)}
    data_keys = {f.name for f in dataclasses.fields(DataConfig)}
    for key, value in flat.items():
        if key in eval_keys:
            sections["eval"][key] = value
        elif key in data_keys:
            sections["data"][key] = value
        else:
            sections[key] = value
    return sections


def eval_config(settings: Mapping[str, Any] | None, prefix: str, tokenizer_dir: str | Path, max_positions: int,
                overrides: Sequence[str] = ()) -> RunConfig:
    """The run config whose evaluation set is ``prefix`` scored as the run that made ``settings`` scored its own.

    ``settings`` is a run config as a dict (a run's ``config.yaml``, or the ``run_config`` an export
    records), or an old export's flat ``eval`` entry, or None for the run-config defaults. Only its
    ``seed``, ``data`` and ``eval`` sections matter; ``overrides`` are dotted keys (``eval.num_samples=100``).
    """
    settings = dict(settings or {})
    if "data" not in settings and "eval" not in settings:
        settings = _legacy_settings(settings)
    data = {k: v for k, v in (settings.get("data") or {}).items() if k not in ("train_prefix", "train_weights", "valid_prefix", "tokenizer")}
    base = {
        "run_dir": "(evaluation)",
        "model": {"overrides": {"max_position_embeddings": max_positions}},
        "data": {**data, "train_prefix": [prefix], "valid_prefix": prefix, "tokenizer": str(tokenizer_dir), "num_workers": 0},
        "train": {"max_steps": 1},
        "eval": {**(settings.get("eval") or {}), "interval_steps": 0},
    }
    if "seed" in settings:
        base["seed"] = settings["seed"]
    if "micro_batch_size" in (settings.get("train") or {}):  # the training micro batch is the evaluation's default
        base["train"]["micro_batch_size"] = settings["train"]["micro_batch_size"]
    return run_config_from_dict(base, overrides, source="the evaluation settings")
