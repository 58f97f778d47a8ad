"""Build models the way the trainer does (``bert_ds.zero.partitioned_construction`` + ``bert_ds.model.build_model``) on
every rank, and report what the build cost and what it built. Each rank writes ``OUT_DIR/rank{R}.json``.

    deepspeed --num_gpus 2 --master_addr 127.0.0.1 tests/dist_scripts/partitioned_build.py OUT_DIR

1. A 12-layer, hidden-1024 encoder (154M parameters, 617 MB in fp32) under ZeRO-3, with the allocator setting the
   start-up makes (``bert_ds.memory.return_freed_memory``): this process's peak RSS during the build above its RSS
   before it (the peak window is reset just before).
2. A tiny model from the same seed under ZeRO-3 and unpartitioned: the ZeRO-3 one's parameters gathered, both dumped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    out_dir = Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
    import deepspeed

    from bert_ds import memory
    from bert_ds.cluster import dist
    from bert_ds.config import ModelConfig
    from bert_ds.model import build_model
    from bert_ds.zero.construction import partitioned_construction

    memory.return_freed_memory()  # as bert_ds.startup.start does before any model exists
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    dist.unlink_shared_memory_names(torch.distributed.get_rank())  # as bert_ds.cluster.dist.start does: no /dev/shm leftovers
    rank = torch.distributed.get_rank()
    zero3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}

    big = ModelConfig(preset="tiny", overrides={"num_hidden_layers": 12, "hidden_size": 1024, "num_attention_heads": 16,
                                                "intermediate_size": 4096})  # fmt: skip
    before = memory.rss_bytes()
    memory.reset_peak()
    with partitioned_construction(zero3):
        model = build_model(big, vocab_size=400, seed=3)
    after = memory.peak_rss_bytes()
    full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()) * 4
    local = sum(p.ds_tensor.numel() for p in model.parameters()) * 4
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    del model

    tiny = ModelConfig(preset="tiny", overrides={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2})
    with partitioned_construction(zero3):
        z3 = build_model(tiny, vocab_size=400, seed=7)
    with deepspeed.zero.GatheredParameters(list(z3.parameters())):
        gathered = {n: p.detach().clone() for n, p in z3.named_parameters()}
    plain = build_model(tiny, vocab_size=400, seed=7)  # outside the block: built whole, as ZeRO 0-2 do
    same = {n: bool(torch.equal(gathered[n], p.detach())) for n, p in plain.named_parameters()}
    tied = z3.cls.predictions.decoder.weight is z3.bert.embeddings.word_embeddings.weight
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "build_peak_rise_bytes": after - before, "fp32_model_bytes": full, "local_partition_bytes": local,
        "partitioned": partitioned, "same_initial_weights": same, "tied": tied, "plain_partitioned": hasattr(next(plain.parameters()), "ds_id"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
