"""Checkpoints: DeepSpeed engine state plus the trainer's own state, written so a crash never leaves a pickable half.

Layout of ``RUN_DIR/checkpoints``::

    step00000100/           DeepSpeed's files (model, ZeRO optimizer partitions, scheduler, client state)
        rng_rank0.pt ...    each rank's RNG states (dropout), as tensors, for bit-exact resume
        bert_ds_complete.json   written last, after every rank has finished: marks the tag usable
        universal/          made on demand: the tag in DeepSpeed's universal format, for resuming ZeRO 1-3 on
                            another number of ranks (or ZeRO 1 <-> 2); complete once it holds ``bert_ds_universal.json``
    latest                  the newest complete tag (DeepSpeed's own pointer file name; informational)

The directory's rules:

* a tag is a directory named ``step`` + at least 8 digits, and it is usable only with its completion marker;
  resuming takes the newest complete tag by step, whatever ``latest`` says (a crash between the marker and
  ``latest`` loses nothing, and a ``latest`` naming a path elsewhere is never followed);
* a run's checkpoints form one timeline: starting over (``checkpoint.resume: none``) or from an older tag
  where newer complete ones exist is refused unless ``checkpoint.overwrite`` says to delete the newer ones;
* pruning (``checkpoint.keep_last``) removes only complete tags strictly older than the one just written,
  and incomplete leftovers older than it; re-saving a tag removes its old marker first;
* no file is unpickled before it is checked (:func:`check_files`): beyond tensors and plain containers, a
  checkpoint may pickle only what bert-ds and DeepSpeed write (``ALLOWED_GLOBALS``); bert-ds reads its own
  files with ``weights_only=True``.
* resuming on another world size (:func:`plan_resume`, before the engine is built): the checkpoint's global batch
  is kept (accumulation is derived for the new world size), its vocabulary must be the run's, and ZeRO 1-3 state is
  loaded through DeepSpeed's universal checkpoint, converted once by rank 0 and cached in the tag (so retention
  removes it with its tag); ZeRO 0 state is whole on every rank and loads directly.

``save`` must be called on all ranks (DeepSpeed's requirement: every rank writes its partition).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from bert_ds.config import RunConfig
from bert_ds.files import atomic_write

log = logging.getLogger(__name__)
COMPLETE_MARKER = "bert_ds_complete.json"
UNIVERSAL_DIR = "universal"
"""The tag's DeepSpeed universal checkpoint (``stepNNNNNNNN/universal/``), made by :func:`ensure_universal`."""
UNIVERSAL_MARKER = "bert_ds_universal.json"
TAG_PREFIX = "step"
TAG = re.compile(r"step(\d{8,})")
# What checkpoint files legitimately pickle beyond tensors and plain containers: DeepSpeed 0.19's ZeRO optimizer
# states (its loss scaler, the stage enum, tensor fragment addresses; found by scanning ZeRO 0-3 x fp32/bf16 x
# LAMB/AdamW and offload checkpoints). DeepSpeed unpickles its files with weights_only=False, so every file is checked
# against this list first. bert-ds 0.1 wrote numpy arrays into its RNG files: allowed there only, for old checkpoints.
ALLOWED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})  # fmt: skip
_OLD_RNG_GLOBALS = frozenset({"numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"})


class CheckpointError(RuntimeError):
    """A checkpoint path is not a (complete, trustworthy) bert-ds checkpoint; the message names the file and why."""


def check_files(tag_dir: Path) -> None:
    """Refuse a tag any of whose ``.pt`` files would unpickle more than tensors, plain containers and ``ALLOWED_GLOBALS``.

    Reads only each file's pickle opcodes (``torch.serialization.get_unsafe_globals_in_checkpoint``): nothing is
    unpickled, so a crafted file is refused, naming it, before any code in it could run.
    """
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            found = set(get_unsafe_globals_in_checkpoint(path))
        except Exception as e:  # not a zip of the torch format, a truncated file, ...
            raise CheckpointError(f"{path}: not a readable torch checkpoint file ({type(e).__name__}: {e}); nothing was loaded") from None
        allowed = ALLOWED_GLOBALS | (_OLD_RNG_GLOBALS if path.name.startswith("rng_rank") else frozenset())
        refused = sorted(found - allowed)
        if refused:
            raise CheckpointError(
                f"{path}: refused: it would unpickle {', '.join(refused)}, which neither bert-ds nor DeepSpeed writes "
                "(a crafted or foreign file could run code on load); nothing was loaded"
            )


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


def _rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors only, so the file loads with ``weights_only=True``."""
    version, python_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python_version": torch.tensor(version),
        "python_state": torch.tensor(python_state, dtype=torch.int64),
        "python_gauss": torch.tensor(math.nan if gauss is None else gauss, dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos_gauss": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_cached_gaussian": torch.tensor(cached, dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def read_rng_state(path: Path) -> dict:
    """An RNG file as {"python": random's state, "numpy": numpy's, "torch": a ByteTensor, "cuda": [...]}; old and new formats."""
    try:
        with torch.serialization.safe_globals([np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not an RNG state file bert-ds wrote ({type(e).__name__}: {e})") from None
    if "python" in raw:  # bert-ds 0.1: the states as Python and numpy objects
        return raw
    gauss = float(raw["python_gauss"])
    pos, has_gauss = raw["numpy_pos_gauss"].tolist()
    return {
        "python": (int(raw["python_version"]), tuple(raw["python_state"].tolist()), None if math.isnan(gauss) else gauss),
        "numpy": ("MT19937", raw["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, float(raw["numpy_cached_gaussian"])),
        "torch": raw["torch"],
        "cuda": [raw[k] for k in sorted((k for k in raw if k.startswith("cuda")), key=lambda k: int(k[4:]))],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, checkpoint_dir: Path, state: TrainState, keep_last: int, rank: int, world_size: int, extra: dict | None = None) -> Path:
    """Save on all ranks; rank 0 marks it complete only after everyone finished, then prunes."""
    tag = tag_for_step(state.step)
    if rank == 0:  # re-saving a tag: it stops claiming to be complete before any rank overwrites a file in it
        (checkpoint_dir / tag / COMPLETE_MARKER).unlink(missing_ok=True)
        _remove_universal(checkpoint_dir / tag)  # a universal copy of the old files would be stale
    _barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"bert_ds": state.to_dict()}, save_latest=False)
    torch.save(_rng_state(), checkpoint_dir / tag / f"rng_rank{rank}.pt")
    _barrier()  # every rank's files are on disk before the marker says so
    if rank == 0:
        marker = {"step": state.step, "world_size": world_size, "state": state.to_dict(), **(extra or {})}
        atomic_write(checkpoint_dir / tag / COMPLETE_MARKER, json.dumps(marker, indent=2))
        atomic_write(checkpoint_dir / "latest", tag)
        _prune(checkpoint_dir, keep_last, written=tag)
    _barrier()
    return checkpoint_dir / tag


def tag_step(name: str) -> int | None:
    """The step of a tag directory name of the trainer's own form (``step00000100``), else None."""
    m = TAG.fullmatch(name)
    return int(m.group(1)) if m else None


def _tags(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, tag dir) of every directory named like a tag, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted((tag_step(p.name), p) for p in checkpoint_dir.iterdir() if p.is_dir() and tag_step(p.name) is not None)


def complete_tags(checkpoint_dir: Path) -> list[str]:
    """Complete tags, oldest first."""
    return [p.name for _, p in _tags(checkpoint_dir) if (p / COMPLETE_MARKER).is_file()]


def _prune(checkpoint_dir: Path, keep_last: int, written: str) -> None:
    """Remove complete tags older than ``written`` beyond the newest ``keep_last``, and incomplete leftovers older than it."""
    if keep_last <= 0:
        return
    limit = tag_step(written)
    older_complete = [p for step, p in _tags(checkpoint_dir) if step < limit and (p / COMPLETE_MARKER).is_file()]
    keep = {p.name for p in older_complete[-(keep_last - 1):]} if keep_last > 1 else set()
    for step, p in _tags(checkpoint_dir):
        if step < limit and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def latest_complete_tag(checkpoint_dir: Path) -> str | None:
    """The newest complete tag by step (None if there is none); ``latest`` is only compared with it, never followed."""
    tags = complete_tags(checkpoint_dir)
    newest = tags[-1] if tags else None
    latest = checkpoint_dir / "latest"
    if latest.is_file():
        named = latest.read_text(errors="replace").strip()
        if tag_step(named) is None:
            log.warning("%s holds %r, not a tag name (stepNNNNNNNN); ignored", latest, named[:100])
        elif named != newest:
            log.warning("%s names %s, but the newest complete checkpoint is %s (a crash between the two writes?); using %s",
                        latest, named, newest, newest)
    return newest


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
        _unshare_step_counts(engine.basic_optimizer)
    state = TrainState(**client_state["bert_ds"])
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if marker.get("world_size") == world_size and rng_file.exists():
        _set_rng_state(read_rng_state(rng_file))
    else:
        log.warning("resuming on %d ranks from a %s-rank checkpoint: dropout RNG starts fresh (results will not be bit-identical)",
                    world_size, marker.get("world_size"))
    return state


def _unshare_step_counts(optimizer) -> None:
    """Give every optimizer state its own step tensor after a universal load.

    DeepSpeed 0.19's ZeRO-3 universal loader assigns one ``step`` object to every sub-group's state. AdamW keeps
    its step as a tensor and increments it in place, so each sub-group's step would advance it once more: the
    second sub-group's first step after resume ran with step 4 instead of 3 (its bias correction off, the loss
    6e-5 relative off the uninterrupted run's). LAMB's int step is unaffected; copying is harmless either way.
    """
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


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


def _remove_universal(tag_dir: Path) -> None:
    for name in (UNIVERSAL_DIR, UNIVERSAL_DIR + ".partial"):
        shutil.rmtree(tag_dir / name, ignore_errors=True)
    (tag_dir / "latest_universal").unlink(missing_ok=True)


def convert_to_universal(tag_dir: Path) -> float:
    """Write ``tag_dir/universal`` with DeepSpeed's ``ds_to_universal``, in this process; returns the seconds it took.

    One process, no worker pool (its default is 4 extraction + 2 merge processes, each holding partitions): memory
    stays at about one rank's partition plus one parameter's states. Everything is written to ``universal.partial``
    and renamed when complete, so a crash leaves no half copy that looks usable. Checks the tag's files first:
    ``ds_to_universal`` unpickles them with ``weights_only=False``.
    """
    from deepspeed.checkpoint import ds_to_universal

    check_files(tag_dir)
    _remove_universal(tag_dir)
    partial = tag_dir / (UNIVERSAL_DIR + ".partial")
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(partial), num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    t0 = time.perf_counter()
    chatter = io.StringIO()  # it prints each phase and draws progress bars
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"{tag_dir}: DeepSpeed's universal conversion failed ({type(e).__name__}: {e}); "
                              f"its output ended:\n{chatter.getvalue()[-2000:]}") from e
    (tag_dir / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; bert-ds names the tag itself
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
    atomic_write(partial / UNIVERSAL_MARKER, json.dumps({"seconds": round(seconds, 3), "bytes": size}, indent=2))
    partial.rename(tag_dir / UNIVERSAL_DIR)
    return seconds


def ensure_universal(tag_dir: Path, rank: int) -> float | None:
    """The tag's universal checkpoint, converted by rank 0 if not cached yet (all ranks call; the others wait).

    Returns the conversion's seconds, or None when a complete copy was already there. A failure on rank 0
    is raised on every rank with its message.
    """
    seconds, error = None, None
    if rank == 0 and not (tag_dir / UNIVERSAL_DIR / UNIVERSAL_MARKER).is_file():
        try:
            seconds = convert_to_universal(tag_dir)
        except CheckpointError as e:
            error = str(e)
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        outcome = [error, seconds]
        tdist.broadcast_object_list(outcome, src=0)  # also the barrier: no rank reads the copy before it is complete
        error, seconds = outcome
    if error:
        raise CheckpointError(error)
    return seconds


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
    _barrier()
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
    _barrier()
