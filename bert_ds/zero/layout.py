"""Where parameters live inside DeepSpeed's flat ZeRO partitions: the interval arithmetic, written once.

Under ZeRO a rank holds flat fp32 tensors, each a slice of many parameters back to back. Two layouts
occur (DeepSpeed 0.19; ``bert_ds.zero.partitions`` reads them from a live engine, and
``bert_ds.zero.consolidate`` from checkpoint files):

* ZeRO 1/2 and DeepSpeed's BF16 optimizer: a group's parameters are flattened into one buffer, which
  is cut into equal contiguous parts, one per rank (:func:`contiguous_partition_segments`);
* ZeRO 3: every parameter is cut into equal pieces, one per rank, and a rank's flat partition is its
  pieces back to back (:func:`sharded_params_segments`).

Both map a rank's flat tensor to :class:`Segment` s: (where in the flat tensor, how long, which
parameter, where in that parameter). LAMB's per-parameter trust ratios and the export's
consolidation of fp32 weights are both built on these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Segment:
    """One parameter's elements inside a rank's flat partition.

    Elements ``[start, start + length)`` of the flat partition are elements
    ``[param_start, param_start + length)`` of the flattened parameter.
    """

    start: int
    """Offset of the first element in the flat partition."""
    length: int
    """Number of elements (always > 0)."""
    param_index: int
    """Position of the parameter in its group's full parameter list: the same on every rank, so it
    indexes the all-reduced per-parameter sums."""
    param_start: int
    """Offset of the first element inside the flattened parameter."""


@dataclass(frozen=True, slots=True)
class FlatLayout:
    """How one flat fp32 tensor seen by the optimizer maps onto whole parameters.

    Elements not covered by a segment are ZeRO alignment padding: they hold zeros and get no update.
    """

    segments: tuple[Segment, ...]
    """The parameter slices held locally, in increasing ``start`` order."""
    num_params: int
    """Parameters in the whole group (on all ranks together); the all-reduce has 2 floats per parameter."""
    numel: int
    """Elements in the flat tensor, padding included."""
    process_group: Any | None
    """The group the parameters are partitioned over; ``None`` when this tensor holds whole parameters."""

    def __post_init__(self) -> None:
        end = 0
        for seg in self.segments:
            if seg.length <= 0 or seg.start < end or not 0 <= seg.param_index < self.num_params:
                raise ValueError(f"bad segment {seg} in a flat tensor of {self.numel} elements")
            end = seg.start + seg.length
        if end > self.numel:
            raise ValueError(f"segments end at element {end}, past the flat tensor's {self.numel} elements")


def contiguous_partition_segments(
    param_numels: Sequence[int], param_offsets: Sequence[int], partition_start: int, partition_size: int
) -> list[Segment]:
    """Segments of one rank's partition when a group is flattened into one buffer and cut into equal parts.

    This is the ZeRO 1/2 (and BF16 optimizer) layout: parameter ``k`` occupies
    ``[param_offsets[k], param_offsets[k] + param_numels[k])`` of the flat group buffer (gaps are
    alignment padding) and the rank owns ``[partition_start, partition_start + partition_size)``.
    A parameter may straddle two or more ranks.

    e.g. numels [6, 3, 5], offsets [0, 6, 9], 2 ranks of 7 elements:
      rank 0 -> (start 0, len 6, param 0, from 0), (start 6, len 1, param 1, from 0)
      rank 1 -> (start 0, len 2, param 1, from 1), (start 2, len 5, param 2, from 0)
    """
    partition_end = partition_start + partition_size
    segments = []
    for index, (numel, offset) in enumerate(zip(param_numels, param_offsets, strict=True)):
        lo, hi = max(offset, partition_start), min(offset + numel, partition_end)
        if lo < hi:
            segments.append(Segment(lo - partition_start, hi - lo, index, lo - offset))
    return segments


def sharded_params_segments(param_numels: Sequence[int], shard_numels: Sequence[int], rank: int) -> list[Segment]:
    """Segments of one rank's partition when every parameter is sharded over all ranks (ZeRO 3).

    Parameter ``k`` is padded to ``shard_numels[k] * world_size`` elements and rank ``r`` holds
    elements ``[r * shard, (r + 1) * shard)`` of it; the rank's flat partition is its shards back to
    back. The last ranks' shards may be partly (or wholly) padding.

    e.g. numels [5, 2], shards [3, 1], 2 ranks:
      rank 0 -> (start 0, len 3, param 0, from 0), (start 3, len 1, param 1, from 0)
      rank 1 -> (start 0, len 2, param 0, from 3), (start 3, len 1, param 1, from 1)   # element 2 is padding
    """
    segments = []
    start = 0
    for index, (numel, shard) in enumerate(zip(param_numels, shard_numels, strict=True)):
        param_start = rank * shard
        length = min(shard, numel - param_start)
        if length > 0:
            segments.append(Segment(start, length, index, param_start))
        start += shard
    return segments
