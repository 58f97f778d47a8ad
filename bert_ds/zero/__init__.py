"""Everything that knows how DeepSpeed lays out ZeRO partitions, live and on disk.

``layout``: the interval arithmetic (which parameter slices a flat partition holds), written once;
``partitions``: reading it from a live engine's ZeRO optimizer (for LAMB's per-parameter trust ratios);
``consolidate``: reading full fp32 weights from a checkpoint's per-rank files (for export and evaluation).
These read DeepSpeed internals that are not public API: the pinned DeepSpeed version is in ``.ci/constraints.txt``.
"""
