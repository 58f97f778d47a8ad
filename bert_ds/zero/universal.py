"""DeepSpeed's universal checkpoint of a tag (``stepNNNNNNNN/universal/``): how ZeRO 1-3 state saved on one
number of ranks is resumed on another (``bert_ds.resume``). It reads and writes DeepSpeed's file layout, so it lives
beside the other code that does (``bert_ds.zero``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from bert_ds.checkpoint import UNIVERSAL_DIR, UNIVERSAL_MARKER, CheckpointError, check_files, remove_universal
from bert_ds.files import atomic_write


def convert_to_universal(tag_dir: Path) -> float:
    """Write ``tag_dir/universal`` with DeepSpeed's ``ds_to_universal``, in this process; returns the seconds it took.

    One process, no worker pool (its default is 4 extraction + 2 merge processes, each holding partitions): memory
    stays at about one rank's partition plus one parameter's states. Everything is written to ``universal.partial``
    and renamed when complete, so a crash leaves no half copy that looks usable. Checks the tag's files first:
    ``ds_to_universal`` unpickles them with ``weights_only=False``.
    """
    from deepspeed.checkpoint import ds_to_universal

    check_files(tag_dir)
    remove_universal(tag_dir)
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


def unshare_step_counts(optimizer) -> None:
    """Give every optimizer state its own step tensor after a universal load.

    DeepSpeed 0.19's ZeRO-3 universal loader assigns one ``step`` object to every sub-group's state. AdamW keeps
    its step as a tensor and increments it in place, so each sub-group's step would advance it once more: the
    second sub-group's first step after resume ran with step 4 instead of 3 (its bias correction off, the loss
    6e-5 relative off the uninterrupted run's). LAMB's int step is unaffected; copying is harmless either way.
    """
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
