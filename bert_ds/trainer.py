"""The training loop: config -> engine -> loop of train steps, with checkpoints, evaluation and metrics.

``train(cfg)`` reads top to bottom; numerical work is in ``train_step`` and ``evaluate``;
distributed setup (``dist``), checkpoint files (``checkpoint``), metric sinks (``metrics``)
and the model (``model``) live in their own modules.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from bert_ds import checkpoint, dist, metrics, preflight
from bert_ds.config import RunConfig, save_resolved
from bert_ds.ds_config import build_ds_config
from bert_ds.masking import continuation_table
from bert_ds.model import build_model, training_flops, training_flops_per_sample
from bert_ds.optim import build_optimizer, build_param_groups, build_scheduler, configure_lamb_for_zero
from bert_ds.pretraining_data import PretrainingDataset, build_dataloader, collate
from bert_ds.vocab import Vocab, resolve_vocab

log = logging.getLogger("bert_ds")
_PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# running sums kept on the device between log steps, reduced over ranks in one all-reduce
_SUMS = ["loss", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count", "nsp_correct", "nsp_count", "micro_batches", "tokens", "positions"]


@dataclass
class Setup:
    """What the loop needs, built once."""

    cfg: RunConfig
    ctx: dist.DistContext
    engine: object
    vocab: Vocab
    run_dir: Path
    checkpoint_dir: Path


def _undoes_deepspeed_patches(run):
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


@_undoes_deepspeed_patches
def train(cfg: RunConfig) -> checkpoint.TrainState:
    vocab = resolve_vocab(cfg)  # before any rendezvous: a wrong vocabulary fails in seconds, on every rank
    ctx = preflight.checked_init(cfg)  # dist.init behind a rendezvous deadline, consistency checks and one all-reduce
    _configure_logging(ctx)
    cfg = _resolve_precision(cfg, ctx)
    setup = _build(cfg, ctx, vocab)
    engine, run_dir = setup.engine, setup.run_dir
    state = _restore(setup)

    train_set = build_train_dataset(cfg, setup.vocab)
    loader = build_dataloader(
        train_set, cfg.train.micro_batch_size, ctx.rank, ctx.world_size, state.consumed_samples, cfg.data.num_workers, cfg.seed
    )
    batches = iter(loader)
    eval_set = build_eval_dataset(cfg, setup.vocab)

    global_batch = cfg.train.global_batch(ctx.world_size)
    bert_config, seq_length = engine.module.config, cfg.data.max_seq_length
    flops = training_flops_per_sample(bert_config, seq_length, cfg.data.max_predictions())
    peak = cfg.logging.peak_tflops_per_device or metrics.measure_peak_tflops(ctx.device, _PRECISION_DTYPE[cfg.train.precision])
    sink = metrics.build_sink(ctx.is_main and cfg.logging.tensorboard, run_dir / "tensorboard")
    # MFU counts the masked tokens actually predicted, not the cap
    throughput = metrics.Throughput(lambda samples, masked: training_flops(bert_config, seq_length, samples, masked), ctx.world_size, peak)
    console_every = cfg.logging.resolve_console_interval(cfg.train.log_interval)
    log.info(
        "training %s for %d steps: global batch %d = %d micro x %d accumulation x %d ranks, %d tokens per step; "
        "%.2f GFLOP per sample, peak %.2f TFLOP/s per device (%s)",
        cfg.model.init_from or cfg.model.preset, cfg.train.max_steps, global_batch, cfg.train.micro_batch_size,
        cfg.train.grad_accum_steps, ctx.world_size, global_batch * cfg.data.max_seq_length, flops / 1e9, peak, cfg.train.precision,
    )

    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=ctx.device)
    steps_since_log, samples_since_log, t_start, start_step = 0, 0, time.perf_counter(), state.step
    throughput.reset()
    while state.step < cfg.train.max_steps:
        batches = train_step(engine, batches, loader, cfg.train.grad_accum_steps, sums, ctx.device)
        skipped_now = int(getattr(engine, "skipped_steps", 0))
        state.step += 1
        state.consumed_samples += global_batch
        state.skipped_steps = skipped_now
        steps_since_log += 1
        samples_since_log += global_batch
        last = state.step == cfg.train.max_steps

        if state.step % cfg.train.log_interval == 0 or last:
            totals = _reduce(sums)  # all ranks: one all-reduce and a device-to-host sync
            state.tokens_seen += int(totals["tokens"])
            step_metrics = _train_metrics(engine, totals, cfg)
            step_metrics.update(throughput.measure(samples_since_log, int(totals["tokens"]), totals["mlm_count"]))
            step_metrics.update(metrics.memory_metrics(ctx.device))
            sink.log(step_metrics, state.step)
            if state.step % console_every == 0 or last:
                _console(state, cfg, step_metrics, time.perf_counter() - t_start, state.step - start_step)
            sums.zero_()
            steps_since_log = samples_since_log = 0

        if cfg.checkpoint.interval_steps and state.step % cfg.checkpoint.interval_steps == 0 and not last:
            _save(setup, state)
        if eval_set is not None and cfg.eval.interval_steps and state.step % cfg.eval.interval_steps == 0 and not last:
            _evaluate_and_log(setup, eval_set, sink, state.step)
        if steps_since_log == 0:
            throughput.reset()  # checkpoint and evaluation time is not training throughput

    if eval_set is not None:
        _evaluate_and_log(setup, eval_set, sink, state.step)
    if cfg.checkpoint.save_final:
        path = _save(setup, state)
        log.info("final checkpoint: %s", path)
    sink.close()
    log.info("run directory: %s (config.yaml, ds_config.json, checkpoints/, tensorboard/)", run_dir)
    return state


def train_step(engine, batches, loader, grad_accum_steps: int, sums: torch.Tensor, device: torch.device):
    """One optimizer step: ``grad_accum_steps`` micro-batches through DeepSpeed (it steps at the boundary)."""
    for _ in range(grad_accum_steps):
        try:
            batch = next(batches)
        except StopIteration:  # the loader ends only when max_samples is set; restart it
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = engine(**batch)
        engine.backward(out.loss)
        if _engine_hides_grad_norm(engine) and engine.is_gradient_accumulation_boundary():
            engine.bert_ds_grad_norm = _local_grad_norm(engine.module)
        engine.step()
        with torch.no_grad():
            attention = batch["attention_mask"]
            sums += torch.stack([
                out.loss.detach().double(), out.mlm_loss.double(), out.nsp_loss.double(),
                out.mlm_correct.double(), out.mlm_count.double(), out.nsp_correct.double(), out.nsp_count.double(),
                torch.ones((), dtype=torch.float64, device=device), attention.sum().double(),
                torch.tensor(attention.numel(), dtype=torch.float64, device=device),
            ])  # fmt: skip
    return batches


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
    n = max(totals["micro_batches"], 1)
    grad_norm = getattr(engine, "bert_ds_grad_norm", None) if _engine_hides_grad_norm(engine) else engine.get_global_grad_norm()
    out = {
        "train/loss": totals["loss"] / n,
        "train/mlm_loss": totals["mlm_loss"] / n,
        "train/nsp_loss": totals["nsp_loss"] / n,
        "train/mlm_acc": totals["mlm_correct"] / max(totals["mlm_count"], 1),
        "train/nsp_acc": totals["nsp_correct"] / max(totals["nsp_count"], 1),
        "train/lr": engine.get_lr()[0],
        "train/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
        "train/skipped_steps": float(getattr(engine, "skipped_steps", 0)),
        "train/padding_fraction": 1.0 - totals["tokens"] / max(totals["positions"], 1),
    }
    if cfg.train.precision == "fp16":
        out["train/loss_scale"] = float(engine.optimizer.cur_scale if hasattr(engine.optimizer, "cur_scale") else engine.optimizer.loss_scale)
    else:
        out["train/loss_scale"] = 1.0
    return out


def _console(state: checkpoint.TrainState, cfg: RunConfig, m: dict[str, float], elapsed: float, steps_done: int) -> None:
    remaining = (cfg.train.max_steps - state.step) * elapsed / max(steps_done, 1)
    log.info(
        "step %d/%d | loss %.4f (mlm %.4f, nsp %.4f) | mlm acc %.3f nsp acc %.3f | lr %.3g | grad norm %.3f | %.1f samples/s | mfu %.1f%% | ETA %s",
        state.step, cfg.train.max_steps, m["train/loss"], m["train/mlm_loss"], m["train/nsp_loss"], m["train/mlm_acc"],
        m["train/nsp_acc"], m["train/lr"], m["train/grad_norm"], m["train/samples_per_sec"], 100 * m["train/mfu"],
        time.strftime("%H:%M:%S", time.gmtime(remaining)),
    )


# -- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(engine, eval_set: PretrainingDataset, micro_batch_size: int, rank: int, world_size: int, device: torch.device) -> dict[str, float]:
    """MLM loss/accuracy/perplexity and NSP accuracy on the fixed set (same samples and masks each time)."""
    engine.eval()
    indices = list(range(rank, len(eval_set), world_size))
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # mlm loss x count, mlm correct, count, nsp correct, nsp count
    num_batches = math.ceil(len(indices) / micro_batch_size) if indices else 0
    # every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)
    num_batches = _max_over_ranks(num_batches, device)
    for b in range(num_batches):
        chunk = indices[b * micro_batch_size : (b + 1) * micro_batch_size]
        real = len(chunk)
        chunk = chunk or [0]  # a rank with no samples left still takes part, and counts nothing
        batch = {k: v.to(device) for k, v in collate([eval_set[i] for i in chunk]).items()}
        out = engine(**batch)
        if real:
            sums += torch.stack([
                out.mlm_loss.double() * out.mlm_count, out.mlm_correct.double(), out.mlm_count.double(),
                out.nsp_correct.double(), out.nsp_count.double(),
            ])  # fmt: skip
    engine.train()
    if tdist.is_initialized():
        tdist.all_reduce(sums)
    mlm_loss_x_n, mlm_correct, mlm_n, nsp_correct, nsp_n = sums.tolist()
    mlm_loss = mlm_loss_x_n / max(mlm_n, 1)
    return {
        "eval/mlm_loss": mlm_loss,
        "eval/mlm_acc": mlm_correct / max(mlm_n, 1),
        "eval/perplexity": math.exp(min(mlm_loss, 50.0)),
        "eval/nsp_acc": nsp_correct / max(nsp_n, 1),
    }


def _max_over_ranks(value: int, device: torch.device) -> int:
    if not tdist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def _evaluate_and_log(setup: Setup, eval_set: PretrainingDataset, sink: metrics.NullSink, step: int) -> dict[str, float]:
    cfg, ctx = setup.cfg, setup.ctx
    result = evaluate(setup.engine, eval_set, cfg.eval.resolve_micro_batch_size(cfg.train.micro_batch_size), ctx.rank, ctx.world_size, ctx.device)
    sink.log(result, step)
    log.info("eval at step %d: mlm loss %.4f | mlm acc %.3f | perplexity %.2f | nsp acc %.3f", step,
             result["eval/mlm_loss"], result["eval/mlm_acc"], result["eval/perplexity"], result["eval/nsp_acc"])
    return result


# -- building --------------------------------------------------------------------------------


def _configure_logging(ctx: dist.DistContext) -> None:
    level = logging.INFO if ctx.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {ctx.rank}] %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _resolve_precision(cfg: RunConfig, ctx: dist.DistContext) -> RunConfig:
    """``train.precision: auto`` made concrete for this device (the preflight checked that every rank agrees)."""
    precision, why = dist.resolve_precision(cfg.train.precision, ctx.device.type, ctx.device.index)
    if precision == cfg.train.precision:
        return cfg
    log.info("precision %s (%s)", precision, why)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))


def _build(cfg: RunConfig, ctx: dist.DistContext, vocab: Vocab) -> Setup:
    import deepspeed

    run_dir = Path(cfg.run_dir)
    ds_config = build_ds_config(cfg, ctx.world_size)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, vocab.size)
    opt = cfg.optimizer
    optimizer = build_optimizer(
        build_param_groups(model, opt.weight_decay), opt.name, opt.lr, tuple(opt.betas), opt.eps, opt.weight_decay,
        ctx.device.type, zero_stage=cfg.train.zero_stage, max_trust_ratio=opt.max_trust_ratio,
    )
    sched = cfg.scheduler
    # each schedule takes only its own options
    options = {"polynomial": {"power": sched.power}, "cosine_with_restarts": {"num_cycles": sched.num_cycles}}.get(sched.name, {})
    total_steps = sched.resolve_total_steps(cfg.train.max_steps)
    # a smoke run of a recipe (train.max_steps=10) keeps its warmup short rather than failing; config.py warned
    warmup_steps = min(sched.warmup_steps, total_steps)
    scheduler = build_scheduler(optimizer, sched.name, warmup_steps, total_steps, **options)
    if ctx.is_main:
        model.config.save_pretrained(run_dir)  # config.json: export needs no access to model.init_from later
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    configure_lamb_for_zero(engine)
    # dropout differs per rank, as it would with independent GPUs; restored exactly on resume
    torch.manual_seed(cfg.seed + 1 + ctx.rank)
    np.random.seed(cfg.seed + 1 + ctx.rank)
    return Setup(cfg, ctx, engine, vocab, run_dir, run_dir / "checkpoints")


def _restore(setup: Setup) -> checkpoint.TrainState:
    cfg, ctx = setup.cfg, setup.ctx
    resume = cfg.checkpoint.resume
    if resume != "none":
        if resume == "auto":
            tag = checkpoint.latest_complete_tag(setup.checkpoint_dir)
            location = (setup.checkpoint_dir, tag) if tag else None
        else:
            location = checkpoint.resolve(resume)
        if location:
            state = checkpoint.load(setup.engine, location[0], location[1], ctx.rank, ctx.world_size)
            log.info("resumed from %s/%s at step %d (%d samples consumed)", location[0], location[1], state.step, state.consumed_samples)
            return state
    if cfg.checkpoint.init_from:
        checkpoint_dir, tag = checkpoint.resolve(cfg.checkpoint.init_from)
        checkpoint.load_weights(setup.engine, checkpoint_dir, tag, cfg.checkpoint.load_optimizer_state)
        log.info("initialised weights%s from %s/%s", " and optimizer state" if cfg.checkpoint.load_optimizer_state else "", checkpoint_dir, tag)
    return checkpoint.TrainState()


def _save(setup: Setup, state: checkpoint.TrainState) -> Path:
    cfg, ctx = setup.cfg, setup.ctx
    extra = {"zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision, "vocab_sha256": setup.vocab.sha256, "tokenizer": setup.vocab.path}
    return checkpoint.save(setup.engine, setup.checkpoint_dir, state, cfg.checkpoint.keep_last, ctx.rank, ctx.world_size, extra)


def build_train_dataset(cfg: RunConfig, vocab: Vocab) -> PretrainingDataset:
    """The run's training samples (public: ``bench/train_throughput.py`` feeds every contender exactly these)."""
    return _dataset(cfg, vocab, cfg.data.train_prefix, cfg.data.mask_prob, weights=cfg.data.train_weights or None)


def _dataset(cfg: RunConfig, vocab: Vocab, prefixes, mask_prob: float, weights=None, num_samples: int | None = None) -> PretrainingDataset:
    data = cfg.data
    return PretrainingDataset(
        prefixes, vocab_size=vocab.size, cls_id=vocab.cls_id, sep_id=vocab.sep_id, pad_id=vocab.pad_id, mask_id=vocab.mask_id,
        unk_id=vocab.unk_id, max_seq_length=data.max_seq_length, max_predictions_per_seq=data.max_predictions(mask_prob),
        seed=cfg.seed, weights=weights, is_continuation=continuation_table(vocab.tokens), short_seq_prob=data.short_seq_prob,
        mask_prob=mask_prob, whole_word_mask=data.whole_word_mask, nsp_mode=data.nsp_mode, num_samples=num_samples,
    )


def build_eval_dataset(cfg: RunConfig, vocab: Vocab) -> PretrainingDataset | None:
    """The fixed evaluation set of a run (None without ``data.valid_prefix``).

    Public because ``bert_ds.evaluate`` rebuilds it outside training: a checkpoint, and its
    Hugging Face export, are scored on exactly the samples and masks the trainer used.
    """
    if not cfg.data.valid_prefix:
        return None
    # epoch 0 of a dataset whose epoch is exactly the eval set: fixed samples, fixed masks
    return _dataset(cfg, vocab, [cfg.data.valid_prefix], cfg.eval.mask_prob, num_samples=cfg.eval.num_samples)
