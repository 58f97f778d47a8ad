"""Full fp32 weights from a DeepSpeed checkpoint's files (any ZeRO stage, any number of ranks), in one CPU process.

Where DeepSpeed (0.19; the layout its zero_to_fp32.py reads) keeps the weights, under ``TAG = RUN_DIR/checkpoints/stepNNNNNNNN``:

==================  ===============================================  =============================================
engine              file(s)                                          fp32 weights
==================  ===============================================  =============================================
ZeRO 0, fp32        ``mp_rank_00_model_states.pt``                   ``module`` (the optimizer updates it in place)
ZeRO 0, bf16/fp16   ``mp_rank_00_model_states.pt``                   ``optimizer.fp32_groups`` (a list of tensors per
                                                                     param group) or ``fp32_groups_flat`` (one flat
                                                                     tensor per group); ``module`` is half precision
ZeRO 1/2 (also      ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states  ``single_partition_of_fp32_groups``: rank R's
DeepSpeed's         .pt``, one per rank                              contiguous slice of each group's flat buffer;
BF16_Optimizer)                                                      names, order and shapes in the model states'
                                                                     ``param_shapes`` (+ ``param_alignment_paddings``)
ZeRO 3              ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states  ``fp32_flat_groups``: each parameter cut into
                    .pt`` + ``zero_pp_rank_R_mp_rank_00_model_states  ``ceil(numel / world)`` pieces, piece R on rank R
                    .pt``                                            (the last one zero-padded)
==================  ===============================================  =============================================

Which slice of which parameter a rank's partition holds is :mod:`bert_ds.zero.layout`'s arithmetic,
the same the live LAMB uses. The fp32 masters are used whenever the engine kept them (bf16/fp16
training): they are the weights the optimizer was updating, the half-precision module is only their
rounded copy.

Memory: DeepSpeed's ``zero_to_fp32`` concatenates every rank's partition before slicing it
(DeepSpeed issue #1062), which costs several times the model. Here one fp32 buffer of exactly
the model's size is allocated and the rank files are opened one at a time with
``torch.load(mmap=True)``: only the pages of the fp32 slices are read (the Adam moments in the
same files are never touched) and the mapping is dropped before the next rank. Peak: the
model once, plus one rank's slice of it: 1.5x the fp32 model above the libraries' own memory for a
ZeRO-2 checkpoint of 2 ranks (``tests/test_export.py`` measures it; ``zero_to_fp32`` needs 2.5x there).
"""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bert_ds.checkpoint import ALLOWED_GLOBALS, CheckpointError, check_files
from bert_ds.zero.layout import contiguous_partition_segments, sharded_params_segments

log = logging.getLogger(__name__)

_RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_(optim|model)_states\.pt")


@dataclass(frozen=True)
class Skeleton:
    """Names and shapes of the model a checkpoint must hold (built on the meta device by ``bert_ds.hf.sources.skeleton``)."""

    params: dict[str, torch.Size]
    """Unique parameters in ``named_parameters()`` order: what ``save_pretrained`` writes."""
    buffers: dict[str, torch.Size]
    """Persistent buffers (part of the state dict). Tied keys (``cls.predictions.decoder.weight`` is the word
    embeddings) are neither: ``save_pretrained`` leaves them out and ``from_pretrained`` ties them again."""
    groups: list[list[str]]
    """Parameter names of each optimizer group, as the trainer built them (``bert_ds.optim.build_param_groups``)."""

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.params.values())



@functools.cache
def _allowed_classes() -> list:
    """The classes of ``bert_ds.checkpoint.ALLOWED_GLOBALS`` (DeepSpeed's), for ``weights_only`` loading."""
    classes = []
    for name in sorted(ALLOWED_GLOBALS):
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    return classes


def _load(path: Path) -> dict:
    # mmap: tensors stay on disk until touched. weights_only: only tensors, plain containers and the DeepSpeed classes
    # its checkpoints hold can come out (read_fp32_weights has already refused a file pickling anything else)
    with torch.serialization.safe_globals(_allowed_classes()):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _rank_files(tag_dir: Path, kind: str) -> list[Path]:
    found = {}
    for p in tag_dir.iterdir():
        m = _RANK_FILE.fullmatch(p.name)
        if m and m.group(2) == kind:
            found[int(m.group(1))] = p
    return [found[r] for r in sorted(found)]


def _check_ranks(tag_dir: Path, files: list[Path], world_size: int, kind: str) -> None:
    ranks = sorted(int(_RANK_FILE.fullmatch(f.name).group(1)) for f in files)
    if ranks != list(range(world_size)):
        missing = sorted(set(range(world_size)) - set(ranks))
        raise CheckpointError(
            f"{tag_dir}: the checkpoint was written by {world_size} ranks but the {kind} files of ranks {missing} are missing "
            f"(found ranks {ranks}); it is damaged, use another checkpoint"
        )


@torch.no_grad()  # DeepSpeed saves its fp32 partitions with requires_grad: copying them must not build a graph that keeps them alive
def read_fp32_weights(tag_dir: Path, skel: Skeleton, world_size: int | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Full fp32 tensors for ``skel``'s parameters and buffers, read from the DeepSpeed files in ``tag_dir``.

    Returns ``(tensors, description)``; tensors are views into one buffer, or (ZeRO 0) memory-mapped
    from the checkpoint file. Raises :class:`CheckpointError` when files are missing or the
    checkpoint's parameters are not the model's.
    """
    check_files(tag_dir)  # nothing is unpickled before every file is known to hold only what DeepSpeed writes
    zero3_models = _rank_files(tag_dir, "model")
    optim_files = _rank_files(tag_dir, "optim")
    if zero3_models:
        tensors, where = _read_zero3(tag_dir, zero3_models, optim_files, skel, world_size)
    else:
        model_file = tag_dir / "mp_rank_00_model_states.pt"
        if not model_file.exists():
            raise CheckpointError(f"{tag_dir}: no DeepSpeed model states file (mp_rank_00_model_states.pt); not a DeepSpeed checkpoint")
        states = _load(model_file)
        if optim_files:
            tensors, where = _read_zero12(tag_dir, states, optim_files, skel, world_size)
        else:
            tensors, where = _read_zero0(states, skel)
    _check_against_skeleton(tag_dir, tensors, skel)
    return {n: tensors[n].detach() for n in [*skel.params, *skel.buffers]}, where


def _buffers(states: dict, skel: Skeleton) -> dict[str, torch.Tensor]:
    module = states["module"]
    return {n: (module[n].float() if module[n].is_floating_point() else module[n]) for n in skel.buffers if n in module}


def _read_zero0(states: dict, skel: Skeleton) -> tuple[dict[str, torch.Tensor], str]:
    module = states["module"]
    optimizer = states.get("optimizer") or {}
    groups = [g for g in skel.groups if g]  # DeepSpeed drops empty parameter groups
    if "fp32_groups" in optimizer:  # DeepSpeed's unfused fp16/bf16 optimizer: one fp32 tensor per parameter
        fp32 = optimizer["fp32_groups"]
        if [len(g) for g in fp32] != [len(g) for g in groups]:
            raise CheckpointError(f"fp32 master groups hold {[len(g) for g in fp32]} tensors, the model's groups {[len(g) for g in groups]}")
        tensors = {n: t for names, ts in zip(groups, fp32, strict=True) for n, t in zip(names, ts, strict=True)}  # shapes: checked by the caller
        where = "fp32 master weights of the mixed-precision optimizer (ZeRO 0)"
    elif "fp32_groups_flat" in optimizer:  # the fused variant: one flat fp32 tensor per group
        tensors = {}
        if len(optimizer["fp32_groups_flat"]) != len(groups):
            raise CheckpointError(f"{len(optimizer['fp32_groups_flat'])} flat fp32 master groups, the model has {len(groups)} parameter groups")
        for names, flat in zip(groups, optimizer["fp32_groups_flat"], strict=True):
            if flat.numel() != sum(math.prod(skel.params[n]) for n in names):
                raise CheckpointError(f"a flat fp32 master group holds {flat.numel()} values, its parameters need a different number")
            offset = 0
            for n in names:
                size = math.prod(skel.params[n])
                tensors[n] = flat.narrow(0, offset, size).view(skel.params[n])
                offset += size
        where = "fp32 master weights of the mixed-precision optimizer (ZeRO 0)"
    else:
        tensors = {n: module[n] for n in skel.params if n in module}
        low = sorted({str(t.dtype) for t in tensors.values() if t.dtype != torch.float32})
        if low:
            log.warning("no fp32 master weights in the checkpoint: exporting the %s module weights upcast to fp32", ", ".join(low))
        tensors = {n: t.float() for n, t in tensors.items()}  # no copy for fp32
        where = "module weights (ZeRO 0, fp32 training: the optimizer updates them directly)"
    return {**tensors, **_buffers(states, skel)}, where


def _flat_buffer(shapes: dict[str, torch.Size]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One fp32 buffer for all of ``shapes`` and a flat view per name."""
    buffer = torch.empty(sum(math.prod(s) for s in shapes.values()), dtype=torch.float32)
    views, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        views[name] = buffer.narrow(0, offset, size)
        offset += size
    return buffer, views


def _no_frozen(states: dict, tag_dir: Path) -> None:
    if states.get("frozen_param_shapes"):
        raise CheckpointError(f"{tag_dir}: has frozen parameters, which bert-ds never creates; use DeepSpeed's zero_to_fp32.py")


def _partition_count(osd: dict) -> int:
    count = osd["partition_count"]
    return max(count) if isinstance(count, list) else int(count)


def _read_zero12(tag_dir: Path, states: dict, optim_files: list[Path], skel: Skeleton, world_size: int | None) -> tuple[dict[str, torch.Tensor], str]:
    _no_frozen(states, tag_dir)
    param_shapes: list[dict[str, torch.Size]] = states["param_shapes"]
    shapes = {n: torch.Size(s) for group in param_shapes for n, s in group.items()}
    _check_names(tag_dir, shapes, skel)
    first = _load(optim_files[0])["optimizer_state_dict"]
    world, stage = _partition_count(first), int(first["zero_stage"])
    paddings = first.get("param_alignment_paddings") or [[0] * len(g) for g in param_shapes]
    del first
    _check_ranks(tag_dir, optim_files, world_size or world, "ZeRO optimizer partition")
    layout = []  # per group: names, offsets in the group's flat buffer, numels; alignment padding sits between parameters
    for group, pads in zip(param_shapes, paddings, strict=True):
        numels = [math.prod(shape) for shape in group.values()]
        offsets = [sum(numels[:k]) + sum(pads[:k]) for k in range(len(numels))]
        layout.append((list(group), offsets, numels))
    _, views = _flat_buffer(shapes)
    filled = dict.fromkeys(shapes, 0)
    group_starts = [0] * len(param_shapes)  # where each rank's slice starts in each group's flat buffer
    for path in optim_files:  # rank order: rank r holds the r-th contiguous slice of every group
        group_starts = _copy_zero12_rank(path, layout, views, filled, group_starts)
        gc.collect()  # the rank's file mapping is gone with its tensors: its pages leave the RSS
    short = [n for n, count in filled.items() if count != math.prod(shapes[n])]
    if short:
        raise CheckpointError(f"{tag_dir}: the partitions do not cover {short[:3]}; the checkpoint is damaged")
    tensors = {n: v.view(shapes[n]) for n, v in views.items()}
    return {**tensors, **_buffers(states, skel)}, f"fp32 master weights from the ZeRO-{stage} optimizer partitions of {len(optim_files)} ranks"


def _copy_zero12_rank(path: Path, layout, views: dict[str, torch.Tensor], filled: dict[str, int], group_starts: list[int]) -> list[int]:
    """Copy one rank's fp32 slices into ``views``; returns where the next rank's slices start.

    A function of its own so that every reference into the rank's memory-mapped file is gone on return.
    """
    partitions = _load(path)["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    if len(partitions) != len(layout):
        raise CheckpointError(f"{path}: {len(partitions)} fp32 partitions for {len(layout)} parameter groups")
    ends = []
    for (names, offsets, numels), part, lo in zip(layout, partitions, group_starts, strict=True):
        for seg in contiguous_partition_segments(numels, offsets, lo, part.numel()):
            name = names[seg.param_index]
            views[name][seg.param_start : seg.param_start + seg.length].copy_(part[seg.start : seg.start + seg.length])
            filled[name] += seg.length
        ends.append(lo + part.numel())
    return ends


def _slices(flat_groups: list[torch.Tensor], start: int, length: int) -> Iterator[torch.Tensor]:
    """``length`` elements from ``start`` of the concatenation of ``flat_groups`` (without concatenating)."""
    for t in flat_groups:
        n = t.numel()
        if start < n and length > 0:
            take = min(length, n - start)
            yield t.narrow(0, start, take)
            length -= take
            start = 0
        else:
            start -= n
    if length > 0:
        raise CheckpointError("a ZeRO-3 partition is shorter than its parameters; the checkpoint is damaged")


def _read_zero3(tag_dir: Path, model_files: list[Path], optim_files: list[Path], skel: Skeleton, world_size: int | None) -> tuple[dict[str, torch.Tensor], str]:
    states = _load(model_files[0])
    _no_frozen(states, tag_dir)
    shapes = {n: torch.Size(s) for group in states["param_shapes"] for n, s in group.items()}
    _check_names(tag_dir, shapes, skel)
    buffers = _buffers(states, skel)
    del states
    if not optim_files:
        raise CheckpointError(f"{tag_dir}: ZeRO-3 model files but no optimizer partition files (*zero_pp_rank_R_mp_rank_00_optim_states.pt)")
    world = _partition_count(_load(optim_files[0])["optimizer_state_dict"])
    _check_ranks(tag_dir, optim_files, world_size or world, "ZeRO-3 optimizer partition")
    _check_ranks(tag_dir, model_files, world_size or world, "ZeRO-3 model states")
    _, views = _flat_buffer(shapes)
    for rank, path in enumerate(optim_files):
        _copy_zero3_rank(path, rank, world, shapes, views)
        gc.collect()
    tensors = {n: v.view(shapes[n]) for n, v in views.items()}
    return {**tensors, **buffers}, f"fp32 master weights from the ZeRO-3 optimizer partitions of {world} ranks"


def _copy_zero3_rank(path: Path, rank: int, world: int, shapes: dict[str, torch.Size], views: dict[str, torch.Tensor]) -> None:
    """Copy rank ``rank``'s piece of every parameter into ``views`` (a function so the file mapping dies on return)."""
    flat_groups = _load(path)["optimizer_state_dict"]["fp32_flat_groups"]
    names = list(shapes)
    numels = [math.prod(shape) for shape in shapes.values()]
    pieces = [math.ceil(numel / world) for numel in numels]  # the last ranks' pieces hold padding
    if sum(pieces) != sum(t.numel() for t in flat_groups):
        raise CheckpointError(f"{path}: holds {sum(t.numel() for t in flat_groups)} values, the parameters need {sum(pieces)} per rank")
    for seg in sharded_params_segments(numels, pieces, rank):
        pos = seg.param_start
        for s in _slices(flat_groups, seg.start, seg.length):
            views[names[seg.param_index]][pos : pos + s.numel()].copy_(s)
            pos += s.numel()


def _check_names(tag_dir: Path, shapes: dict[str, torch.Size], skel: Skeleton) -> None:
    missing = [n for n in skel.params if n not in shapes]
    unexpected = [n for n in shapes if n not in skel.params]
    wrong = [f"{n} {tuple(shapes[n])} != {tuple(skel.params[n])}" for n in skel.params if n in shapes and shapes[n] != skel.params[n]]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{tag_dir}: its parameters are not those of the model described by the run's config.yaml "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]}, shape mismatch {wrong[:4]})"
        )


def _check_against_skeleton(tag_dir: Path, tensors: dict[str, torch.Tensor], skel: Skeleton) -> None:
    _check_names(tag_dir, {n: t.shape for n, t in tensors.items() if n not in skel.buffers}, skel)
    missing_buffers = [n for n in skel.buffers if n not in tensors]
    if missing_buffers:
        raise CheckpointError(f"{tag_dir}: buffers {missing_buffers[:4]} are missing")
