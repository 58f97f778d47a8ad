"""Where a run starts: resume its checkpoint (on the same or another number of ranks), take a phase-1
checkpoint's weights (``checkpoint.init_from``), or start fresh. The checkpoint directory's format and rules are
``bert_ds.checkpoint``'s; the conversion for another number of ranks is ``bert_ds.zero.universal``'s.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from bert_ds.checkpoint import (
    COMPLETE_MARKER,
    UNIVERSAL_DIR,
    CheckpointError,
    TrainState,
    barrier,
    check_files,
    complete_tags,
    latest_complete_tag,
    read_rng_state,
    resolve,
    set_rng_state,
    tag_step,
)
from bert_ds.config import RunConfig
from bert_ds.zero.universal import ensure_universal, unshare_step_counts

log = logging.getLogger(__name__)


def load(engine, checkpoint_dir: Path, tag: str, rank: int, world_size: int, universal: bool = False) -> TrainState:
    """Resume everything: weights, optimizer, scheduler, trainer state, RNG (all ranks call).

    ``universal``: through the tag's universal checkpoint (:func:`ensure_universal`); the engine must have been
    built with ``checkpoint.load_universal`` (``bert_ds.ds_config.build_ds_config(load_universal=True)``).
    """
    tag_dir = checkpoint_dir / tag
    marker = json.loads((tag_dir / COMPLETE_MARKER).read_text())
    load_dir, load_tag = checkpoint_dir, tag
    if universal:
        seconds = ensure_universal(tag_dir, rank)
        log.info("resuming a %s-rank ZeRO-%s checkpoint on %d rank%s: universal conversion %s, cached at %s",
                 marker.get("world_size"), marker.get("zero_stage"), world_size, "" if world_size == 1 else "s",
                 "done earlier" if seconds is None else f"{seconds:.1f} s", tag_dir / UNIVERSAL_DIR)
        load_dir, load_tag = tag_dir, UNIVERSAL_DIR
    check_files(tag_dir)  # DeepSpeed unpickles with weights_only=False; rglob: the universal copy's files too
    _, client_state = engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if universal:
        unshare_step_counts(engine.basic_optimizer)
    state = TrainState(**client_state["bert_ds"])
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if marker.get("world_size") == world_size and rng_file.exists():
        set_rng_state(read_rng_state(rng_file))
    else:
        log.warning("resuming on %d ranks from a %s-rank checkpoint: dropout RNG starts fresh (results will not be bit-identical)",
                    world_size, marker.get("world_size"))
    return state


def load_weights(engine, checkpoint_dir: Path, tag: str, load_optimizer_state: bool) -> None:
    """Phase-2 start: weights (and optionally optimizer state) of a phase-1 checkpoint; a fresh schedule and data."""
    check_files(checkpoint_dir / tag)  # DeepSpeed unpickles with weights_only=False
    engine.load_checkpoint(
        str(checkpoint_dir), tag=tag,
        load_optimizer_states=load_optimizer_state, load_lr_scheduler_states=False, load_module_only=not load_optimizer_state,
    )


@dataclass(frozen=True)
class Restored:
    """Where a run starts: its trainer state, and the checkpoint it resumed from or took its weights from."""

    state: TrainState
    resumed_from: str | None = None
    """The tag directory a resumed run continues (``checkpoint.resume``), else None."""
    initialised_from: str | None = None
    """The tag directory whose weights a new run starts from (``checkpoint.init_from``), else None."""
    optimizer_state_loaded: bool = False
    """The optimizer's state was loaded, and with it the saved parameter groups' settings: the caller re-applies
    its own (``bert_ds.optim.apply_optimizer_config``)."""


def _resume_location(cfg: RunConfig) -> tuple[Path, str] | None:
    """(checkpoint dir, tag) that ``checkpoint.resume`` names, or None when the run starts fresh."""
    ckpt, checkpoint_dir = cfg.checkpoint, Path(cfg.run_dir) / "checkpoints"
    if ckpt.resume == "auto":
        tag = latest_complete_tag(checkpoint_dir)
        return (checkpoint_dir, tag) if tag else None
    if ckpt.resume != "none":
        return resolve(ckpt.resume)
    return None


@dataclass(frozen=True)
class ResumePlan:
    """How a run resumes its checkpoint, decided from the tag's marker before the engine is built."""

    checkpoint_dir: Path
    tag: str
    saved_world_size: int
    saved_zero_stage: int
    global_batch: int
    """Sequences per step, kept from the checkpoint (or set by ``train.global_batch_size``)."""
    universal: bool
    """Load through DeepSpeed's universal checkpoint: ZeRO 1-3 saved on another world size (or ZeRO 1 <-> 2)."""


# ZeRO stages whose saved state DeepSpeed 0.19's loaders take into an engine of another stage: 1 and 2 share a
# checkpoint format (and the universal loader); ZeRO 0 keeps the client optimizer's own state_dict, ZeRO 3 its own
# partitioned format, which the other stages' loaders do not read.
_STAGE_CHANGES = {(1, 2), (2, 1)}


def plan_resume(cfg: RunConfig, world_size: int, vocab_sha256: str | None) -> tuple[RunConfig, ResumePlan | None]:
    """Check the checkpoint a run resumes against this launch and keep its global batch (all ranks call; no collective).

    Reads only the tag's marker (JSON), so a checkpoint of another vocabulary or an unsupported ZeRO stage change
    stops every rank with one message before any rank builds an engine or unpickles a file. On a world size other
    than the checkpoint's, ``train.grad_accum_steps`` is derived so the global batch stays the checkpoint's (or
    ``train.global_batch_size`` when set): the returned config carries it.
    """
    location = _resume_location(cfg)
    if location is None:
        return cfg, None
    tag_dir = location[0] / location[1]
    marker = json.loads((tag_dir / COMPLETE_MARKER).read_text())
    saved_world = int(marker.get("world_size") or world_size)
    saved_stage = int(marker.get("zero_stage", cfg.train.zero_stage))
    stage = cfg.train.zero_stage
    saved_vocab = marker.get("vocab_sha256")
    if saved_vocab and vocab_sha256 and saved_vocab != vocab_sha256:
        raise CheckpointError(
            f"{tag_dir}: the checkpoint was trained with vocabulary {marker.get('tokenizer', '?')} (sha256 {saved_vocab[:12]}...), "
            f"this run's has sha256 {vocab_sha256[:12]}...: resume with the run's own vocabulary (data.vocab / model.init_from)"
        )
    if saved_stage != stage and (saved_stage, stage) not in _STAGE_CHANGES:
        raise CheckpointError(
            f"{tag_dir}: a ZeRO-{saved_stage} checkpoint cannot be resumed with train.zero_stage={stage} (DeepSpeed loads ZeRO 1 "
            f"and 2 checkpoints into either stage, other stages only into their own); set train.zero_stage={saved_stage}"
        )
    state = marker.get("state", {})
    saved_batch = marker.get("global_batch_size") or (state["consumed_samples"] // state["step"] if state.get("step") else None)
    global_batch = cfg.train.global_batch(world_size)
    if saved_world != world_size:
        global_batch = cfg.train.global_batch_size or saved_batch or cfg.train.global_batch(saved_world)
        why = f"resuming {tag_dir} (saved on {saved_world} ranks) on {world_size} ranks" + (
            f" with train.global_batch_size={global_batch}" if cfg.train.global_batch_size else "")
        accum = cfg.train.grad_accum_for(global_batch, world_size, why)
        cfg = replace(cfg, train=replace(cfg.train, grad_accum_steps=accum))
        log.info("resuming a %d-rank ZeRO-%d checkpoint on %d rank%s: global batch %d = %d micro x %d accumulation x %d",
                 saved_world, saved_stage, world_size, "" if world_size == 1 else "s", global_batch,
                 cfg.train.micro_batch_size, accum, world_size)
    universal = saved_stage >= 1 and (saved_world != world_size or saved_stage != stage)
    return cfg, ResumePlan(location[0], location[1], saved_world, saved_stage, global_batch, universal)


def restore(engine, cfg: RunConfig, rank: int, world_size: int, plan: ResumePlan | None = None) -> Restored:
    """Resume (``checkpoint.resume``), else take a phase-1 checkpoint's weights (``checkpoint.init_from``), else start fresh.

    All ranks call it. A run never starts behind checkpoints of its own that are newer than its start: that is
    refused unless ``checkpoint.overwrite``, which deletes them (they would be resumed instead of this run's).
    ``plan``: what :func:`plan_resume` decided (another world size: the universal load); None resumes as saved.
    """
    ckpt, checkpoint_dir = cfg.checkpoint, Path(cfg.run_dir) / "checkpoints"
    location = (plan.checkpoint_dir, plan.tag) if plan else _resume_location(cfg)
    _one_timeline(checkpoint_dir, tag_step(location[1]) if location else 0, ckpt.overwrite, rank)
    if location:
        state = load(engine, location[0], location[1], rank, world_size, universal=plan is not None and plan.universal)
        log.info("resumed from %s/%s at step %d (%d samples consumed)", location[0], location[1], state.step, state.consumed_samples)
        return Restored(state, resumed_from=str(location[0] / location[1]), optimizer_state_loaded=True)
    if ckpt.init_from:
        source_dir, tag = resolve(ckpt.init_from)
        load_weights(engine, source_dir, tag, ckpt.load_optimizer_state)
        log.info("initialised weights%s from %s/%s", " and optimizer state" if ckpt.load_optimizer_state else "", source_dir, tag)
        return Restored(TrainState(), initialised_from=str(source_dir / tag), optimizer_state_loaded=ckpt.load_optimizer_state)
    return Restored(TrainState())


def _one_timeline(checkpoint_dir: Path, start_step: int, overwrite: bool, rank: int) -> None:
    newer = [name for name in complete_tags(checkpoint_dir) if tag_step(name) > start_step]
    # every rank has looked before rank 0 deletes anything, and every rank passes the same barriers whatever it saw
    barrier()
    if newer and not overwrite:
        raise CheckpointError(
            f"{checkpoint_dir} holds checkpoints newer than where this run starts (step {start_step}): {', '.join(newer)}. "
            "checkpoint.resume=auto continues from the newest; set checkpoint.overwrite=true to delete them and start here, "
            "or use another run_dir"
        )
    if newer and rank == 0:
        log.warning("checkpoint.overwrite: deleting %s, newer than step %d where this run starts", ", ".join(newer), start_step)
        for name in newer:
            (checkpoint_dir / name / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(checkpoint_dir / name, ignore_errors=True)
    barrier()
