"""Train with the real trainer on 2 ranks, then reload the final checkpoint with DeepSpeed's own loader and record logits.

Launched by tests/test_export.py on 2 CPU ranks (gloo); by hand, from the repository root:

    env OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo PYTHONPATH=. .venv/bin/deepspeed --num_gpus 2 \\
        --master_addr 127.0.0.1 --master_port 29512 tests/dist_scripts/export_reference_worker.py \\
        --reference z0.yaml --reference z3.yaml --run bf16.yaml --out /tmp/export_reference

``--run CONFIG`` trains a run (``bert_ds.trainer.train``, exactly as ``python -m bert_ds.train``).
``--reference CONFIG`` also rebuilds the engine afterwards (``startup.start``, ``trainer.build_engine``), lets DeepSpeed load the newest checkpoint
on the same ranks (``checkpoint.resume: auto``, the path a resumed run takes) and runs the first 8
samples of the run's evaluation set through it in eval mode; rank 0 saves the batch, the MLM logits
of the masked positions and the NSP logits to ``OUT/RUN_NAME.pt``. That is "the training model" an
export must reproduce. Several runs share one launch because launches, not steps, cost the time.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from bert_ds import resume, startup, trainer
from bert_ds.cluster import dist
from bert_ds.config import load_run_config
from bert_ds.data.loader import collate
from bert_ds.data.run_datasets import eval_dataset


@trainer.undoes_deepspeed_patches
@torch.no_grad()
def reference_logits(config_path: str, out_dir: Path) -> None:
    cfg = load_run_config(config_path)
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))
    ctx = startup.start(cfg)
    cfg = ctx.cfg
    engine = trainer.build_engine(cfg, ctx)
    # DeepSpeed's load_checkpoint, on the ranks and ZeRO stage that wrote it
    restored = resume.restore(engine, cfg, ctx.rank, ctx.world_size)
    assert restored.state.step == cfg.train.max_steps, (restored.state.step, cfg.train.max_steps)
    batch = collate([eval_dataset(cfg, ctx.vocab)[i] for i in range(8)])
    captured = {}
    hooks = [
        engine.module.cls.predictions.register_forward_hook(lambda m, i, o: captured.__setitem__("mlm_logits", o.detach().float().clone())),
        engine.module.cls.seq_relationship.register_forward_hook(lambda m, i, o: captured.__setitem__("nsp_logits", o.detach().float().clone())),
    ]
    engine.eval()
    out = engine(**batch)  # every rank takes part: ZeRO-3 gathers the parameters collectively
    for h in hooks:
        h.remove()
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"batch": batch, "mlm_loss": float(out.mlm_loss), "nsp_loss": float(out.nsp_loss), **captured},
                   out_dir / f"{Path(cfg.run_dir).name}.pt")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], help="a run config to train")
    parser.add_argument("--reference", action="append", default=[], help="a run config to train, then reload and record logits of")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, default=0, help="(appended by the deepspeed launcher; rank comes from the environment)")
    args = parser.parse_args()
    for path in args.reference:
        trainer.train(load_run_config(path))
        reference_logits(path, args.out)
    for path in args.run:
        trainer.train(load_run_config(path))
    dist.shutdown()


if __name__ == "__main__":
    main()
