"""One rank of a baseline contender for ``bench/train_throughput.py`` (started by the deepspeed launcher).

    deepspeed --num_gpus 2 --master_addr 127.0.0.1 bench/train_throughput_rank.py \
        --contender plain|trainer|trainer-ddp --batches BATCHES.pt --ds-config DS.json --out RESULT.json ...

Both contenders train stock ``transformers.BertForPreTraining`` (MLM decoder over every position)
on the pre-masked batches that ``train_throughput.py`` dumped from bert-ds's own
``PretrainingDataset`` and sampler, so rank r sees exactly the micro-batches bert-ds rank r sees:

* ``plain``: ``deepspeed.initialize`` with the DeepSpeed JSON bert-ds resolved for its run and a
  torch AdamW client optimizer, then forward / ``engine.backward`` / ``engine.step``, nothing else.
* ``trainer``: Hugging Face ``Trainer`` with ``TrainingArguments(deepspeed=that JSON)``.
* ``trainer-ddp``: the same ``Trainer`` without DeepSpeed (DDP over gloo), the fallback label.

Timing: wall clock on rank 0 between the end of step ``--warmup-steps`` and the end of the last
step, each taken right after a barrier, so the slowest rank is included. Rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as tdist


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contender", choices=["plain", "trainer", "trainer-ddp"], required=True)
    p.add_argument("--batches", required=True, help="the .pt file written by train_throughput.py")
    p.add_argument("--ds-config", required=True, help="DeepSpeed JSON (the one bert-ds resolved for its run)")
    p.add_argument("--out", required=True, help="rank 0 writes its result JSON here")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup-steps", type=int, required=True)
    p.add_argument("--log-interval", type=int, required=True, help="Trainer logging_steps (bert-ds logs as often)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help="appended by the deepspeed launcher (unused)")
    return p.parse_args()


def build_model(meta: dict):
    """Stock BertForPreTraining, built exactly as bert-ds builds its subclass (same seed, same init order)."""
    from transformers import BertConfig, BertForPreTraining

    from bert_ds.config import MODEL_PRESETS

    config = BertConfig(vocab_size=meta["vocab_size"], **MODEL_PRESETS[meta["preset"]])
    torch.manual_seed(meta["seed"])
    return BertForPreTraining._from_config(config, attn_implementation="sdpa")


def flat_steps(ranks: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Samples in the order a sequential sampler + accelerate's batch sharding hands them out.

    accelerate gives process p the micro-batches p, p + world, p + 2 * world, ... of the
    sampler's batches, so global batch order is [step 0 rank 0, step 0 rank 1, step 1 rank 0, ...].
    """
    world, steps, micro = len(ranks), *ranks[0]["input_ids"].shape[:2]
    out = []
    for step in range(steps):
        for rank in range(world):
            for i in range(micro):
                out.append({k: v[step, i] for k, v in ranks[rank].items()})
    return out


def run_plain(args, meta, ranks, ds_config) -> dict:
    import deepspeed

    from bert_ds.cluster import jit_ops
    from bert_ds.optim import build_param_groups, build_scheduler

    jit_ops.prebuild_comm_op()  # the same cached op bert-ds uses; not part of what is timed
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = tdist.get_rank(), tdist.get_world_size()
    model = build_model(meta)
    optimizer = torch.optim.AdamW(build_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=args.eps, weight_decay=args.weight_decay)
    scheduler = build_scheduler(optimizer, "linear", 0, args.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    torch.manual_seed(args.seed + 1 + rank)  # dropout stream per rank, as bert-ds seeds it
    data = ranks[rank]
    losses = []
    t0 = t1 = w0 = 0.0
    for step in range(1, args.steps + 1):
        batch = {k: v[step - 1] for k, v in data.items()}
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss))  # a CPU tensor: no device sync to pay
        if step == args.warmup_steps:
            tdist.barrier()
            t0, w0 = time.perf_counter(), time.time()
    tdist.barrier()
    t1, w1 = time.perf_counter(), time.time()
    # mean over ranks of each step's loss (outside the timed region)
    summed = torch.tensor(losses, dtype=torch.float64)
    tdist.all_reduce(summed)
    mean = (summed / world).tolist()
    return {"seconds": t1 - t0, "window": [w0, w1], "losses": mean, "engine_optimizer": type(engine.optimizer).__name__, "world_size": world}


def run_trainer(args, meta, ranks, ds_config, use_deepspeed: bool) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    precision = meta["precision"]
    training_args = TrainingArguments(
        output_dir=str(Path(args.out).parent / f"{args.contender}_output"),
        deepspeed=dict(ds_config) if use_deepspeed else None,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,  # only used by the DDP fallback; every parameter gets a gradient
        use_cpu=True,  # without it TrainingArguments refuses bf16 on a host with no GPU
        per_device_train_batch_size=meta["micro_batch"],
        gradient_accumulation_steps=1,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        max_steps=args.steps,
        logging_steps=args.log_interval,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        save_strategy="no",
        train_sampling_strategy="sequential",  # the same samples, in bert-ds's order (see flat_steps)
        optim="adamw_torch",
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        adam_epsilon=args.eps,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=float(ds_config.get("gradient_clipping", 1.0)),
        seed=args.seed,
    )
    model = build_model(meta)  # after TrainingArguments: ZeRO-3 needs the DeepSpeed config registered first
    samples = flat_steps(ranks)

    class Static(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return samples[i]

    seen: list[int] = []

    def collate(items):  # default_data_collator's stacking, plus a checksum of each micro-batch
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        seen.append(int(batch["input_ids"].sum()))
        return batch

    class StepTimer(TrainerCallback):
        """Barrier + timestamp at the end of the warm-up step and of the last step."""

        t0 = t1 = w0 = w1 = 0.0

        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step in (args.warmup_steps, args.steps):
                if tdist.is_initialized():
                    tdist.barrier()
                now, wall = time.perf_counter(), time.time()
                if state.global_step == args.warmup_steps:
                    self.t0, self.w0 = now, wall
                else:
                    self.t1, self.w1 = now, wall

    timer = StepTimer()
    trainer = Trainer(model=model, args=training_args, train_dataset=Static(), data_collator=collate, callbacks=[timer])
    trainer.train()
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    expected = [int(ranks[rank]["input_ids"][s].sum()) for s in range(args.steps)]
    same = torch.tensor([int(seen[: args.steps] == expected)])
    if tdist.is_initialized():
        tdist.all_reduce(same, op=tdist.ReduceOp.MIN)
    logged = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    wrapped = trainer.model_wrapped
    return {
        "seconds": timer.t1 - timer.t0,
        "window": [timer.w0, timer.w1],
        "logged_losses": logged,
        "same_batches_as_bert_ds": bool(same.item()),
        "engine": type(wrapped).__name__,
        "engine_optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "world_size": tdist.get_world_size() if tdist.is_initialized() else 1,
    }


def main() -> None:
    args = parse_args()
    payload = torch.load(args.batches, weights_only=True)
    meta, ranks = payload["meta"], payload["ranks"]
    for r in ranks:
        if r["input_ids"].shape[0] < args.steps:
            raise SystemExit(f"{args.batches} holds {r['input_ids'].shape[0]} steps, fewer than --steps {args.steps}")
    ds_config = json.loads(Path(args.ds_config).read_text())
    if args.contender == "plain":
        result = run_plain(args, meta, ranks, ds_config)
    else:
        result = run_trainer(args, meta, ranks, ds_config, use_deepspeed=args.contender == "trainer")
    result.update(contender=args.contender, timed_steps=args.steps - args.warmup_steps)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(result) + "\n")
    if tdist.is_initialized():
        tdist.destroy_process_group()


if __name__ == "__main__":
    main()
