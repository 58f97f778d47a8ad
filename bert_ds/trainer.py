"""The training loop: start-up -> engine -> resume -> steps, with checkpoints, evaluation and metrics.

``train(cfg)`` reads top to bottom and returns a :class:`TrainResult`; the numerical work of a step
is :func:`train_step`. Everything decided once per process (ranks, device, precision, vocabulary)
comes from :func:`bert_ds.startup.start`; checkpoint files and resume rules from
:mod:`bert_ds.checkpoint`; samples from :mod:`bert_ds.data`; metric sinks from :mod:`bert_ds.metrics`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from bert_ds import checkpoint, memory, metrics, resume, startup
from bert_ds.config import RunConfig, save_resolved
from bert_ds.data.loader import train_loader
from bert_ds.data.masking import IGNORE_INDEX
from bert_ds.data.run_datasets import eval_dataset
from bert_ds.ds_config import build_ds_config, save_ds_config
from bert_ds.evaluation import evaluate
from bert_ds.model import build_model, freeze_nsp_head
from bert_ds.optim import apply_optimizer_config, build_optimizer, build_scheduler, configure_lamb_for_zero
from bert_ds.zero.construction import partitioned_construction

log = logging.getLogger("bert_ds")
# running sums kept on the device between log steps, reduced over ranks in one all-reduce
_SUMS = ["mlm_loss_sum", "nsp_loss_sum", "mlm_correct", "mlm_count", "nsp_correct", "nsp_count", "tokens", "positions", "pairs",
         "rows", "squared_lengths"]


@dataclass
class TrainResult:
    """What a run ends with, returned by :func:`train` on every rank (the tests assert on it)."""

    state: checkpoint.TrainState
    run_dir: Path
    resumed_from: str | None = None
    """The checkpoint (tag directory) this run resumed from, if it did."""
    initialised_from: str | None = None
    """The checkpoint whose weights a new run started from (``checkpoint.init_from``), if any."""
    train_metrics: dict[str, float] = field(default_factory=dict)
    """The last logged ``train/*`` metrics."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    """The last ``eval/*`` metrics (empty without ``data.valid_prefix``)."""
    final_checkpoint: str | None = None


def undoes_deepspeed_patches(run):
    """Put back what DeepSpeed patches process-wide for the length of a run.

    ZeRO-3 (inside ``deepspeed.initialize``) swaps ``torch.nn.functional.linear`` for its own
    autograd function and leaves it there ("until manually reset"). A later run in the same process
    (tests, notebooks, evaluation after training) would compute every linear layer through it and get
    results that differ in the last bits from the same run in a fresh process.
    """

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        linear = torch.nn.functional.linear
        try:
            return run(*args, **kwargs)
        finally:
            torch.nn.functional.linear = linear

    return wrapper


@undoes_deepspeed_patches
def train(cfg: RunConfig) -> TrainResult:
    ctx = startup.start(cfg)  # ranks, device, precision, vocabulary, logging: decided once, checked across ranks
    cfg = ctx.cfg  # train.precision resolved for this device
    # the checkpoint's vocabulary and ZeRO stage checked, its global batch kept on another world size: before any engine
    cfg, plan = resume.plan_resume(cfg, ctx.world_size, ctx.vocab.sha256)
    ctx = dataclasses.replace(ctx, cfg=cfg)
    run_dir = Path(cfg.run_dir)
    engine = build_engine(cfg, ctx, load_universal=plan is not None and plan.universal)
    start = resume.restore(engine, cfg, ctx.rank, ctx.world_size, plan)
    if start.optimizer_state_loaded:  # only moments and step counts come from a checkpoint; settings are this run's
        apply_optimizer_config(engine.basic_optimizer, cfg.optimizer, engine.lr_scheduler)
        configure_lamb_for_zero(engine)  # LAMB's segment layout read again from the loaded partitions (a universal load refills them)
    state = start.state
    result = TrainResult(state, run_dir, start.resumed_from, start.initialised_from)

    loader = train_loader(cfg, ctx.vocab, ctx.rank, ctx.world_size, state.consumed_samples)
    batches = iter(loader)
    eval_set = eval_dataset(cfg, ctx.vocab)
    global_batch = cfg.train.global_batch(ctx.world_size)
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # ZeRO-3: the whole parameter
    theory = memory.theory_bytes(num_params, cfg.train.zero_stage, ctx.world_size, cfg.train.precision)
    throughput = metrics.Throughput.for_model(cfg.logging, engine.module.config, cfg.data.max_seq_length, ctx.world_size, ctx.device, ctx.precision)
    sink = metrics.build_sink(ctx.is_main and cfg.logging.tensorboard, run_dir / "tensorboard")
    _log_plan(cfg, ctx, throughput, sink, state.step)
    console_every = cfg.logging.resolve_console_interval(cfg.train.log_interval)

    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=ctx.device)
    t_start, start_step = time.perf_counter(), state.step
    throughput.reset()
    while state.step < cfg.train.max_steps:
        batches = train_step(engine, batches, loader, cfg.train.grad_accum_steps, sums, ctx.device)
        state.step += 1
        state.consumed_samples += global_batch
        state.skipped_steps = int(getattr(engine, "skipped_steps", 0))
        last = state.step == cfg.train.max_steps

        if state.step % cfg.train.log_interval == 0 or last:
            totals = _reduce(sums)  # all ranks: one all-reduce and a device-to-host sync
            state.tokens_seen += int(totals["tokens"])
            result.train_metrics = _train_metrics(engine, totals, cfg)
            # samples are pairs (rows hold several when packed), tokens are the non-padding ones
            result.train_metrics.update(throughput.measure(int(totals["pairs"]), int(totals["tokens"]), totals["mlm_count"],
                                                           squared_lengths=totals["squared_lengths"]))
            result.train_metrics.update(memory.memory_metrics(ctx.device, theory, ctx.memory_baseline))
            sink.log(result.train_metrics, state.step)
            if state.step % console_every == 0 or last:
                _console(state, cfg, result.train_metrics, time.perf_counter() - t_start, state.step - start_step)
            sums.zero_()

        with throughput.paused():  # checkpoint and evaluation time is not training throughput
            if cfg.checkpoint.interval_steps and state.step % cfg.checkpoint.interval_steps == 0 and not last:
                _save(engine, cfg, ctx, state, sums)
            if eval_set is not None and cfg.eval.interval_steps and state.step % cfg.eval.interval_steps == 0 and not last:
                result.eval_metrics = _evaluate_and_log(engine, eval_set, cfg, ctx, sink, state.step)

    if eval_set is not None:
        result.eval_metrics = _evaluate_and_log(engine, eval_set, cfg, ctx, sink, state.step)
    if cfg.checkpoint.save_final:
        result.final_checkpoint = str(_save(engine, cfg, ctx, state, sums))
        log.info("final checkpoint: %s", result.final_checkpoint)
    sink.close()
    log.info("run directory: %s (config.yaml, ds_config.json, checkpoints/, tensorboard/)", run_dir)
    return result


def train_step(engine, batches, loader, grad_accum_steps: int, sums: torch.Tensor, device: torch.device):
    """One optimizer step: ``grad_accum_steps`` micro-batches through DeepSpeed (it steps at the boundary).

    The objective is the global batch's: the MLM loss averaged over all its masked tokens and the NSP loss over all
    its pairs, on every rank and micro-batch together. Each micro-batch's summed losses are divided by the global
    counts (one all-reduce) and scaled back by ranks x accumulation, which DeepSpeed divides out when it averages
    gradients; so a step's gradient does not depend on how its global batch is split into ranks and micro-batches.
    """
    micro_batches = []
    for _ in range(grad_accum_steps):
        try:
            micro_batches.append(next(batches))
        except StopIteration:  # the loader ends only when max_samples is set; restart it
            batches = iter(loader)
            micro_batches.append(next(batches))
    counts = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches),
                           sum(_nsp_pairs(b) for b in micro_batches)], dtype=torch.float64, device=device)  # fmt: skip
    world_size = 1
    if tdist.is_initialized():
        tdist.all_reduce(counts)
        world_size = tdist.get_world_size()
    mlm_count, nsp_count = counts.clamp(min=1).tolist()  # a device-to-host sync, once per step
    scale = world_size * grad_accum_steps
    for batch in micro_batches:
        pairs, squared_lengths = _pair_stats(batch)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = engine(**batch)
        engine.backward((out.mlm_loss_sum / mlm_count + out.nsp_loss_sum / nsp_count) * scale)
        if _engine_hides_grad_norm(engine) and engine.is_gradient_accumulation_boundary():
            engine.bert_ds_grad_norm = _local_grad_norm(engine.module)
        engine.step()
        with torch.no_grad():
            attention = batch["attention_mask"]
            sums += torch.stack([
                out.mlm_loss_sum.detach().double(), out.nsp_loss_sum.detach().double(),
                out.mlm_correct.double(), out.mlm_count.double(), out.nsp_correct.double(), out.nsp_count.double(),
                attention.sum().double(), torch.tensor(attention.numel(), dtype=torch.float64, device=device),
                torch.tensor(pairs, dtype=torch.float64, device=device), torch.tensor(attention.size(0), dtype=torch.float64, device=device),
                torch.tensor(squared_lengths, dtype=torch.float64, device=device),
            ])  # fmt: skip
    return batches


def _nsp_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Pairs with an NSP/SOP label (packed rows pad theirs with -100; MLM-only rows have none)."""
    label = batch.get("next_sentence_label")
    return 0 if label is None else int((label != IGNORE_INDEX).sum())


def _pair_stats(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(pairs, sum of each pair's length squared) of a CPU batch: samples and attention FLOPs under packing.

    A row of MLM-only text counts as one pair: one attention block, no NSP.
    """
    pair_ids = batch.get("pair_ids")
    if pair_ids is None:
        lengths = batch["attention_mask"].sum(dim=1)
        return int(lengths.numel()), int((lengths * lengths).sum())
    real = pair_ids >= 0
    lengths = torch.zeros(pair_ids.size(0), pair_ids.size(1) + 1, dtype=torch.int64).scatter_add_(1, pair_ids.clamp(min=0), real.long())
    return _nsp_pairs(batch), int((lengths * lengths).sum())


# -- building --------------------------------------------------------------------------------


def build_engine(cfg: RunConfig, ctx: startup.RunContext, load_universal: bool = False):
    """The DeepSpeed engine of a run (all ranks call it): model, optimizer and schedule from ``cfg``.

    Rank 0 first writes the run directory's ``config.yaml``, ``ds_config.json`` and ``config.json``
    (the model's architecture, so export never needs ``model.init_from`` again). ``load_universal``: the
    engine will load a universal checkpoint (``bert_ds.resume.plan_resume``).
    """
    import deepspeed

    run_dir = Path(cfg.run_dir)
    ds_config = build_ds_config(cfg, ctx.world_size, load_universal=load_universal)
    if ctx.is_main:
        save_resolved(cfg, run_dir / "config.yaml")
        save_ds_config(ds_config, run_dir / "ds_config.json")
    with partitioned_construction(ds_config):  # ZeRO-3: no rank ever holds the whole fp32 model
        model = build_model(cfg.model, ctx.vocab.size, seed=cfg.seed)  # the same initial weights on every rank and stage
    if cfg.data.nsp_mode == "none":
        freeze_nsp_head(model)  # MLM only: the pooler and NSP head take no step (and are exported unchanged)
    if ctx.is_main:
        model.config.save_pretrained(run_dir)
    optimizer = build_optimizer(model, cfg.optimizer, ctx.device.type)
    sched = cfg.scheduler
    # each schedule takes only its own options
    options = {"polynomial": {"power": sched.power}, "cosine_with_restarts": {"num_cycles": sched.num_cycles}}.get(sched.name, {})
    total_steps = sched.resolve_total_steps(cfg.train.max_steps)
    # a smoke run of a recipe (train.max_steps=10) keeps its warmup short rather than failing; config.py warned
    scheduler = build_scheduler(optimizer, sched.name, min(sched.warmup_steps, total_steps), total_steps, **options)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    configure_lamb_for_zero(engine)
    # dropout differs per rank, as it would with independent GPUs; restored exactly on resume
    torch.manual_seed(cfg.seed + 1 + ctx.rank)
    np.random.seed(cfg.seed + 1 + ctx.rank)
    return engine


def _log_plan(cfg: RunConfig, ctx: startup.RunContext, throughput: metrics.Throughput, sink: metrics.NullSink, step: int) -> None:
    global_batch = cfg.train.global_batch(ctx.world_size)
    log.info(
        "training %s for %d steps: global batch %d %s = %d micro x %d accumulation x %d ranks, %d positions per step; "
        "%.2f GFLOP per full unpacked sample; MFU against %.2f TFLOP/s per device (%s; %s)",
        cfg.model.init_from or cfg.model.preset, cfg.train.max_steps, global_batch,
        "rows" if cfg.data.packing or cfg.data.nsp_mode == "none" else "samples", cfg.train.micro_batch_size,
        cfg.train.grad_accum_steps, ctx.world_size, global_batch * cfg.data.max_seq_length,
        throughput.flops_fn(1, cfg.data.max_predictions()) / 1e9, throughput.peak, cfg.train.precision, throughput.peak_source,
    )
    sink.log({"train/peak_tflops_per_device": throughput.peak}, step)
    sink.text("train/mfu_peak", f"{throughput.peak:.3f} TFLOP/s per device, {cfg.train.precision}: {throughput.peak_source}", step)


# -- metrics, evaluation, checkpoints --------------------------------------------------------


def _engine_hides_grad_norm(engine) -> bool:
    """DeepSpeed records the global gradient norm in its ZeRO/bf16/fp16 optimizers, not for a plain fp32 client optimizer."""
    return engine.zero_optimization_stage() == 0 and not engine.fp16_enabled() and not engine.bfloat16_enabled()


@torch.no_grad()
def _local_grad_norm(module: torch.nn.Module) -> float:
    # ZeRO 0: every rank holds the full, already all-reduced gradients, so the local norm is the global one
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _reduce(sums: torch.Tensor) -> dict[str, float]:
    reduced = sums.clone()
    if tdist.is_initialized():
        tdist.all_reduce(reduced)
    return dict(zip(_SUMS, reduced.tolist(), strict=True))


def _train_metrics(engine, totals: dict[str, float], cfg: RunConfig) -> dict[str, float]:
    grad_norm = getattr(engine, "bert_ds_grad_norm", None) if _engine_hides_grad_norm(engine) else engine.get_global_grad_norm()
    # the objective's own means over the window: every masked token and every pair weighs the same
    mlm_loss, nsp_loss = totals["mlm_loss_sum"] / max(totals["mlm_count"], 1), totals["nsp_loss_sum"] / max(totals["nsp_count"], 1)
    out = {
        "train/loss": mlm_loss + nsp_loss,
        "train/mlm_loss": mlm_loss,
        "train/nsp_loss": nsp_loss,
        "train/mlm_acc": totals["mlm_correct"] / max(totals["mlm_count"], 1),
        "train/nsp_acc": totals["nsp_correct"] / max(totals["nsp_count"], 1),
        "train/lr": engine.get_lr()[0],
        "train/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
        "train/skipped_steps": float(getattr(engine, "skipped_steps", 0)),
        "train/padding_fraction": 1.0 - totals["tokens"] / max(totals["positions"], 1),
        "train/pairs_per_row": totals["pairs"] / max(totals["rows"], 1),
    }
    if cfg.data.nsp_mode == "none":  # MLM only: no NSP head in the step, so no NSP numbers at all
        del out["train/nsp_loss"], out["train/nsp_acc"]
    if cfg.train.precision == "fp16":
        out["train/loss_scale"] = float(engine.optimizer.cur_scale if hasattr(engine.optimizer, "cur_scale") else engine.optimizer.loss_scale)
    else:
        out["train/loss_scale"] = 1.0
    return out


def _console(state: checkpoint.TrainState, cfg: RunConfig, m: dict[str, float], elapsed: float, steps_done: int) -> None:
    remaining = (cfg.train.max_steps - state.step) * elapsed / max(steps_done, 1)
    nsp = f" (mlm {m['train/mlm_loss']:.4f}, nsp {m['train/nsp_loss']:.4f})" if "train/nsp_loss" in m else " (mlm only)"
    nsp_acc = f" nsp acc {m['train/nsp_acc']:.3f}" if "train/nsp_acc" in m else ""
    log.info(
        "step %d/%d | loss %.4f%s | mlm acc %.3f%s | lr %.3g | grad norm %.3f | %.1f samples/s | %.0f tokens/s | padding %.1f%% | mfu %.1f%% | ETA %s",
        state.step, cfg.train.max_steps, m["train/loss"], nsp, m["train/mlm_acc"], nsp_acc, m["train/lr"], m["train/grad_norm"],
        m["train/samples_per_sec"], m["train/tokens_per_sec"], 100 * m["train/padding_fraction"], 100 * m["train/mfu"],
        time.strftime("%H:%M:%S", time.gmtime(remaining)),
    )


def _evaluate_and_log(engine, eval_set, cfg: RunConfig, ctx: startup.RunContext, sink: metrics.NullSink, step: int) -> dict[str, float]:
    result = evaluate(engine, eval_set, cfg.eval.resolve_micro_batch_size(cfg.train.micro_batch_size), ctx.rank, ctx.world_size, ctx.device)
    sink.log(result, step)
    log.info("eval at step %d: mlm loss %.4f | mlm acc %.3f | perplexity %.2f%s", step, result["eval/mlm_loss"], result["eval/mlm_acc"],
             result["eval/perplexity"], f" | nsp acc {result['eval/nsp_acc']:.3f}" if "eval/nsp_acc" in result else "")
    return result


def _save(engine, cfg: RunConfig, ctx: startup.RunContext, state: checkpoint.TrainState, sums: torch.Tensor) -> Path:
    # tokens since the last log are counted into the checkpoint too (one all-reduce; every rank saves anyway), so
    # tokens_seen is exact whatever checkpoint.interval_steps is; the running sums stay as they are for the next log
    saved = dataclasses.replace(state, tokens_seen=state.tokens_seen + int(_reduce(sums)["tokens"]))
    # the marker records what a reader needs without the engine: stage, precision and vocabulary
    extra = {"zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision, "vocab_sha256": ctx.vocab.sha256, "tokenizer": ctx.vocab.path,
             "global_batch_size": cfg.train.global_batch(ctx.world_size), "micro_batch_size": cfg.train.micro_batch_size,
             "grad_accum_steps": cfg.train.grad_accum_steps}
    return checkpoint.save(engine, Path(cfg.run_dir) / "checkpoints", saved, cfg.checkpoint.keep_last, ctx.rank, ctx.world_size, extra)
