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
* resuming on another world size (``bert_ds.resume.plan_resume``, before the engine is built): the checkpoint's global batch
  is kept (accumulation is derived for the new world size), its vocabulary must be the run's, and ZeRO 1-3 state is
  loaded through DeepSpeed's universal checkpoint, converted once by rank 0 and cached in the tag (so retention
  removes it with its tag); ZeRO 0 state is whole on every rank and loads directly.

``save`` must be called on all ranks (DeepSpeed's requirement: every rank writes its partition).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from bert_ds.files import atomic_write

log = logging.getLogger(__name__)
COMPLETE_MARKER = "bert_ds_complete.json"
UNIVERSAL_DIR = "universal"
"""The tag's DeepSpeed universal checkpoint (``stepNNNNNNNN/universal/``), made by ``bert_ds.zero.universal.ensure_universal``."""
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


def barrier() -> None:
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


def set_rng_state(state: dict) -> None:
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
        remove_universal(checkpoint_dir / tag)  # a universal copy of the old files would be stale
    barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"bert_ds": state.to_dict()}, save_latest=False)
    torch.save(_rng_state(), checkpoint_dir / tag / f"rng_rank{rank}.pt")
    barrier()  # every rank's files are on disk before the marker says so
    if rank == 0:
        marker = {"step": state.step, "world_size": world_size, "state": state.to_dict(), **(extra or {})}
        atomic_write(checkpoint_dir / tag / COMPLETE_MARKER, json.dumps(marker, indent=2))
        atomic_write(checkpoint_dir / "latest", tag)
        _prune(checkpoint_dir, keep_last, written=tag)
    barrier()
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


def remove_universal(tag_dir: Path) -> None:
    for name in (UNIVERSAL_DIR, UNIVERSAL_DIR + ".partial"):
        shutil.rmtree(tag_dir / name, ignore_errors=True)
    (tag_dir / "latest_universal").unlink(missing_ok=True)
