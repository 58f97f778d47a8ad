"""Train a tiny BERT for a few steps with our Lamb under given ZeRO stages; save the full weights of each run.

Launched by tests/test_lamb_zero.py on 2 CPU ranks (gloo); by hand, from the repository root:

    env OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo PYTHONPATH=. .venv/bin/deepspeed --num_gpus 2 \\
        --master_addr 127.0.0.1 --master_port 29511 tests/dist_scripts/lamb_zero_worker.py \\
        --run 0 --run 2 --run 2:naive --out /tmp/lamb_zero

Each ``--run STAGE[:flag...]`` builds a fresh engine from the same initial weights (fixed seed) and
trains on the same batches (seeded by rank and step), so all runs should end at the same weights.
Flags: ``naive`` skips configure_lamb_for_zero (Lamb then takes one trust ratio per flat partition),
``aligned`` sets ZeRO's parameter_alignment (padding between parameters), ``rr`` sets ZeRO's
round_robin_gradients (parameters reordered in the flat buffer), ``bf16`` trains in bf16 with
fp32 gradient accumulation (at stage 1 DeepSpeed then uses its partitioning BF16_Optimizer) and saves
the fp32 master weights. Several runs share one launch because launches, not steps, cost the time;
results are bitwise identical to one launch per run.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from transformers import BertConfig, BertForPreTraining

from bert_ds.cluster import dist
from bert_ds.optim import Lamb, build_param_groups, configure_lamb_for_zero

START = time.perf_counter()
NUM_STEPS = 5
MICRO_BATCH = 4
SEQ_LEN = 16
VOCAB = 101  # odd sizes (101, 101 * 32) so that partitions cut through parameters and padding appears

log = logging.getLogger("lamb_zero_worker")


def tiny_bert() -> BertForPreTraining:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ_LEN,
        # no dropout: each run must be a deterministic function of (weights, data)
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return BertForPreTraining(config)


def batch(rank: int, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    input_ids = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ_LEN), generator=gen)
    masked = torch.rand(MICRO_BATCH, SEQ_LEN, generator=gen) < 0.3
    return {
        "input_ids": input_ids,
        "token_type_ids": (torch.arange(SEQ_LEN) >= SEQ_LEN // 2).long().expand(MICRO_BATCH, -1),
        "attention_mask": torch.ones(MICRO_BATCH, SEQ_LEN, dtype=torch.long),
        "labels": torch.where(masked, input_ids, torch.full_like(input_ids, -100)),
        "next_sentence_label": torch.randint(0, 2, (MICRO_BATCH,), generator=gen),
    }


def full_weights(engine: deepspeed.DeepSpeedEngine, stage: int, bf16: bool) -> dict[str, torch.Tensor]:
    """All parameters, whole, on every rank (all ranks must call this: it all-gathers)."""
    params = dict(engine.module.named_parameters())
    if bf16:
        # the fp32 master weights: the bf16 copies would hide differences below bf16 precision
        return {name: safe_get_full_fp32_param(p).clone() for name, p in params.items()}
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {name: p.detach().clone() for name, p in params.items()}
    return {name: p.detach().clone() for name, p in params.items()}


def layout_stats(lamb: Lamb) -> dict[str, int]:
    """Over all ranks: parameter slices beyond one per parameter (> 0: some parameter straddles ranks)
    and gaps between consecutive slices (> 0: padding inside a partition)."""
    layouts = list(lamb.flat_layouts.values())
    gaps = sum(b.start > a.start + a.length for lay in layouts for a, b in zip(lay.segments, lay.segments[1:], strict=False))
    counts = torch.tensor([sum(len(lay.segments) for lay in layouts), gaps])
    torch.distributed.all_reduce(counts)
    return {"extra_slices": int(counts[0]) - sum(lay.num_params for lay in layouts), "inner_gaps": int(counts[1])}


def train(stage: int, flags: set[str], rank: int) -> dict[str, object]:
    """Run NUM_STEPS steps at one ZeRO stage from the fixed initial weights."""
    model = tiny_bert()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    # lr large enough that 5 steps move the weights far beyond float noise; use_nvlamb so that every
    # tensor, biases and LayerNorms too (which ZeRO 3 splits), goes through the trust ratio
    optimizer = Lamb(build_param_groups(model, weight_decay=0.01), lr=2e-2, use_nvlamb=True)
    zero: dict[str, object] = {"stage": stage, "parameter_alignment": "aligned" in flags, "round_robin_gradients": "rr" in flags}
    ds_config: dict[str, object] = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # DeepSpeed's allow-list does not know our Lamb
        "steps_per_print": 1000,
    }
    bf16 = "bf16" in flags
    if bf16:
        ds_config.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    num_layouts = 0 if "naive" in flags else configure_lamb_for_zero(engine)

    losses = []
    for step in range(NUM_STEPS):
        loss = engine(**batch(rank, step)).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    result = {
        "weights": full_weights(engine, stage, bf16),
        "initial": initial,
        "losses": losses,
        "num_layouts": num_layouts,
        "wrapper": type(engine.optimizer).__name__,
        **layout_stats(optimizer),
    }
    engine.destroy()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="STAGE[:naive][:aligned][:rr][:bf16]")
    parser.add_argument("--out", required=True, help="directory for the results: one STAGE[_flag...].pt per --run")
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    deepspeed.init_distributed(dist_backend="gloo")
    dist.unlink_shared_memory_names(torch.distributed.get_rank())  # as bert_ds.cluster.dist.start does: no /dev/shm leftovers
    rank = torch.distributed.get_rank()
    log.info("initialized at %.1f s", time.perf_counter() - START)
    for run in args.run:
        stage, *flags = run.split(":")
        unknown = set(flags) - {"naive", "aligned", "rr", "bf16"}
        if unknown:
            parser.error(f"unknown flags {sorted(unknown)} in --run {run}")
        result = train(int(stage), set(flags), rank)
        if rank == 0:
            torch.save(result, os.path.join(args.out, run.replace(":", "_") + ".pt"))
        log.info("run %s done at %.1f s", run, time.perf_counter() - START)


if __name__ == "__main__":
    main()
