"""Reading DeepSpeed's live partition bookkeeping: which parameter slices each flat fp32 partition holds.

DeepSpeed keeps this in private attributes of its ZeRO optimizers (names as of DeepSpeed 0.19.8; see
``.ci/constraints.txt`` for the pinned version). Every such read is here, each through
:func:`_zero_attr`, so a DeepSpeed release that moves them fails with a message naming the attribute
instead of training with a wrong layout. The arithmetic is :mod:`bert_ds.zero.layout`'s.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist

from bert_ds.zero.layout import FlatLayout, contiguous_partition_segments, sharded_params_segments


def _zero_attr(obj: Any, name: str) -> Any:
    """Read a ZeRO optimizer attribute, failing with a message that says what to update."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RuntimeError(
            f"{type(obj).__name__} has no attribute {name!r}: this DeepSpeed version lays out ZeRO partitions "
            "differently from the one bert_ds.optim was written against (0.19.8); update the layout readers"
        ) from None


def zero12_layouts(zero_optimizer: Any) -> list[tuple[torch.Tensor, FlatLayout]]:
    """Layouts of the flat fp32 partitions of a ZeRO 1/2 ``DeepSpeedZeroOptimizer``.

    Per group ``i``, the parameters (reordered when ``round_robin_gradients`` is on) are flattened into
    ``bit16_groups_flat[i]`` at ``round_robin_bit16_offsets[i]`` (gaps are ``parameter_alignment``
    padding; the tail is padded so the buffer splits evenly) and rank ``r`` owns
    ``[r * partition_size[i], (r + 1) * partition_size[i])`` as ``single_partition_of_fp32_groups[i]``.
    Cross-checked against DeepSpeed's own ``params_in_partition`` and ``first_offset``.
    """
    layouts = []
    flats = _zero_attr(zero_optimizer, "single_partition_of_fp32_groups")
    for i, flat in enumerate(flats):
        group = _zero_attr(zero_optimizer, "real_dp_process_group")[i]
        rank = torch_dist.get_rank(group=group)
        params = _zero_attr(zero_optimizer, "round_robin_bit16_groups")[i]
        metas = _zero_attr(zero_optimizer, "round_robin_bit16_meta")[i]  # shapes even if storage is offloaded
        offsets = _zero_attr(zero_optimizer, "round_robin_bit16_offsets")[i]
        size = int(_zero_attr(zero_optimizer, "partition_size")[i])
        segments = contiguous_partition_segments([m.numel() for m in metas], offsets, rank * size, size)

        held = [params[s.param_index] for s in segments]
        expected = [p for p in _zero_attr(zero_optimizer, "params_in_partition")[i] if p.numel() > 0]
        first_offset = segments[0].param_start if segments else 0
        ds_first_offset = _zero_attr(zero_optimizer, "first_offset")[i]
        if [id(p) for p in held] != [id(p) for p in expected] or first_offset != ds_first_offset:
            raise RuntimeError(f"ZeRO group {i}: computed partition layout disagrees with DeepSpeed's params_in_partition")
        layouts.append((flat, FlatLayout(tuple(segments), len(params), flat.numel(), group)))
    return layouts


def zero3_layouts(zero_optimizer: Any) -> list[tuple[torch.Tensor, FlatLayout]]:
    """Layouts of the flat fp32 partitions of a ZeRO 3 ``DeepSpeedZeroOptimizer_Stage3``.

    Per sub-group ``i``, ``fp32_partitioned_groups_flat[i]`` is this rank's shards of the parameters
    ``fp16_groups[i]`` back to back; each shard is ``param.ds_tensor.ds_numel`` elements, covering
    elements ``[rank * shard, (rank + 1) * shard)`` of the parameter (``param.ds_numel`` elements, padded).
    """
    layouts = []
    flats = _zero_attr(zero_optimizer, "fp32_partitioned_groups_flat")
    for i, flat in enumerate(flats):
        group = _zero_attr(zero_optimizer, "sub_group_process_groups")[i]
        params = _zero_attr(zero_optimizer, "fp16_groups")[i]
        shards = [p.ds_tensor.ds_numel for p in params]
        if sum(shards) != flat.numel():
            raise RuntimeError(f"ZeRO 3 sub-group {i}: shards sum to {sum(shards)}, flat partition has {flat.numel()}")
        segments = sharded_params_segments([p.ds_numel for p in params], shards, torch_dist.get_rank(group=group))
        layouts.append((flat, FlatLayout(tuple(segments), len(params), flat.numel(), group)))
    return layouts


def bf16_optimizer_layouts(bf16_optimizer: Any) -> list[tuple[torch.Tensor, FlatLayout]]:
    """Layouts for DeepSpeed's ``BF16_Optimizer`` (bf16 + ZeRO 1 with fp32 gradient accumulation).

    It flattens each group's parameters with no gaps, pads the tail so the buffer splits evenly and
    gives rank ``r`` the ``r``-th equal part as ``fp32_groups_flat_partition[i]``.
    """
    layouts = []
    flats = _zero_attr(bf16_optimizer, "fp32_groups_flat_partition")
    for i, flat in enumerate(flats):
        group = _zero_attr(bf16_optimizer, "real_dp_process_group")[i]
        numels = [p.numel() for p in _zero_attr(bf16_optimizer, "bf16_groups")[i]]
        offsets = [sum(numels[:k]) for k in range(len(numels))]
        size = flat.numel()
        segments = contiguous_partition_segments(numels, offsets, torch_dist.get_rank(group=group) * size, size)
        layouts.append((flat, FlatLayout(tuple(segments), len(numels), size, group)))
    return layouts


def partition_layouts(wrapper: Any) -> list[tuple[torch.Tensor, FlatLayout]] | None:
    """Layouts of the flat fp32 partitions a client optimizer steps under ``wrapper`` (``engine.optimizer``).

    None when the client optimizer sees whole parameters (DeepSpeed's unfused fp16/bf16 optimizer at
    ZeRO 0). Raises NotImplementedError for a wrapper whose layout is unknown: refusing beats a silently
    wrong per-parameter computation.
    """
    # imported here so that importing bert_ds.zero stays fast without DeepSpeed
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(wrapper, FP16_UnfusedOptimizer):
        return None
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        return zero3_layouts(wrapper)
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        return zero12_layouts(wrapper)
    if isinstance(wrapper, BF16_Optimizer):
        return bf16_optimizer_layouts(wrapper)
    raise NotImplementedError(f"the partition layout of DeepSpeed's {type(wrapper).__name__} is not known to bert-ds")
