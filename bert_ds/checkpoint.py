"""Checkpoints: DeepSpeed engine state plus the trainer's own state, written so a crash never leaves a pickable half.

Layout of ``RUN_DIR/checkpoints``::

    step00000100/           DeepSpeed's files (model, ZeRO optimizer partitions, scheduler, client state)
        rng_rank0.pt ...    each rank's RNG states (dropout), for bit-exact resume
        bert_ds_complete.json   written last, after every rank has finished: marks the tag usable
    latest                  the newest complete tag (DeepSpeed's own pointer file name)

``save`` must be called on all ranks (DeepSpeed's requirement: every rank writes its partition).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from bert_ds.config import RunConfig
from bert_ds.files import atomic_write

log = logging.getLogger(__name__)
COMPLETE_MARKER = "bert_ds_complete.json"
TAG_PREFIX = "step"


class CheckpointError(RuntimeError):
    """A checkpoint path is not a (complete) bert-ds checkpoint."""


@dataclass
class TrainState:
    """What the trainer itself must carry across a restart; the engine carries the rest."""

    step: int = 0
    """optimizer steps taken (including fp16 steps skipped for overflow)"""
    consumed_samples: int = 0
    """training samples consumed over all ranks: the data loader restarts exactly here"""
    tokens_seen: int = 0
    """non-padding tokens consumed over all ranks"""
    skipped_steps: int = 0
    """fp16 steps skipped because of gradient overflow"""

    def to_dict(self) -> dict:
        return asdict(self)


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, checkpoint_dir: Path, state: TrainState, keep_last: int, rank: int, world_size: int, extra: dict | None = None) -> Path:
    """Save on all ranks; rank 0 marks it complete only after everyone finished, then prunes."""
    tag = tag_for_step(state.step)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"bert_ds": state.to_dict()}, save_latest=False)
    torch.save(_rng_state(), checkpoint_dir / tag / f"rng_rank{rank}.pt")
    _barrier()  # every rank's files are on disk before the marker says so
    if rank == 0:
        marker = {"step": state.step, "world_size": world_size, "state": state.to_dict(), **(extra or {})}
        atomic_write(checkpoint_dir / tag / COMPLETE_MARKER, json.dumps(marker, indent=2))
        atomic_write(checkpoint_dir / "latest", tag)
        _prune(checkpoint_dir, keep_last)
    _barrier()
    return checkpoint_dir / tag


def complete_tags(checkpoint_dir: Path) -> list[str]:
    """Complete tags, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    tags = [p.name for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and (p / COMPLETE_MARKER).exists()]
    return sorted(tags)


def _prune(checkpoint_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    complete = complete_tags(checkpoint_dir)
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else ""
    for p in checkpoint_dir.iterdir():
        # older complete tags beyond K, and incomplete leftovers older than the newest complete one
        if p.is_dir() and p.name.startswith(TAG_PREFIX) and p.name not in keep and p.name < newest:
            shutil.rmtree(p, ignore_errors=True)


def latest_complete_tag(checkpoint_dir: Path) -> str | None:
    """The tag named by ``latest`` if complete, else the newest complete tag; None if there is none."""
    latest = checkpoint_dir / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if (checkpoint_dir / tag / COMPLETE_MARKER).exists():
            return tag
        log.warning("%s names %s, which is not complete; looking for the newest complete checkpoint", latest, tag)
    tags = complete_tags(checkpoint_dir)
    return tags[-1] if tags else None


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoint dir, tag) for a run dir, a checkpoints dir, or one tag dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint, checkpoints dir or run dir")
    if (p / COMPLETE_MARKER).exists():
        return p.parent, p.name
    if p.name.startswith(TAG_PREFIX) and p.is_dir():
        raise CheckpointError(f"{p}: checkpoint is incomplete (no {COMPLETE_MARKER}: the run stopped while saving it)")
    for checkpoint_dir in (p / "checkpoints", p):
        tag = latest_complete_tag(checkpoint_dir)
        if tag:
            return checkpoint_dir, tag
    raise CheckpointError(f"{p}: no complete bert-ds checkpoint found (expected {TAG_PREFIX}NNNNNNNN/{COMPLETE_MARKER} under it or under {p}/checkpoints)")


def load(engine, checkpoint_dir: Path, tag: str, rank: int, world_size: int) -> TrainState:
    """Resume everything: weights, optimizer, scheduler, trainer state, RNG (all ranks call)."""
    marker = json.loads((checkpoint_dir / tag / COMPLETE_MARKER).read_text())
    _, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    state = TrainState(**client_state["bert_ds"])
    rng_file = checkpoint_dir / tag / f"rng_rank{rank}.pt"
    if marker.get("world_size") == world_size and rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("resuming on %d ranks from a %s-rank checkpoint: dropout RNG starts fresh (results will not be bit-identical)",
                    world_size, marker.get("world_size"))
    return state


def load_weights(engine, checkpoint_dir: Path, tag: str, load_optimizer_state: bool) -> None:
    """Phase-2 start: weights (and optionally optimizer state) of a phase-1 checkpoint; a fresh schedule and data."""
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


def restore(engine, cfg: RunConfig, rank: int, world_size: int) -> Restored:
    """Resume (``checkpoint.resume``), else take a phase-1 checkpoint's weights (``checkpoint.init_from``), else start fresh.

    All ranks call it.
    """
    ckpt, checkpoint_dir = cfg.checkpoint, Path(cfg.run_dir) / "checkpoints"
    if ckpt.resume != "none":
        if ckpt.resume == "auto":
            tag = latest_complete_tag(checkpoint_dir)
            location = (checkpoint_dir, tag) if tag else None
        else:
            location = resolve(ckpt.resume)
        if location:
            state = load(engine, location[0], location[1], rank, world_size)
            log.info("resumed from %s/%s at step %d (%d samples consumed)", location[0], location[1], state.step, state.consumed_samples)
            return Restored(state, resumed_from=str(location[0] / location[1]), optimizer_state_loaded=True)
    if ckpt.init_from:
        source_dir, tag = resolve(ckpt.init_from)
        load_weights(engine, source_dir, tag, ckpt.load_optimizer_state)
        log.info("initialised weights%s from %s/%s", " and optimizer state" if ckpt.load_optimizer_state else "", source_dir, tag)
        return Restored(TrainState(), initialised_from=str(source_dir / tag), optimizer_state_loaded=ckpt.load_optimizer_state)
    return Restored(TrainState())
