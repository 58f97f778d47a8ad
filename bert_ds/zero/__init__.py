"""Everything that knows how DeepSpeed lays out ZeRO partitions, live and on disk.

``layout``: the interval arithmetic (which parameter slices a flat partition holds), written once;
``partitions``: reading it from a live engine's ZeRO optimizer (for LAMB's per-parameter trust ratios);
``consolidate``: reading full fp32 weights from a checkpoint's per-rank files (for export and evaluation);
``universal``: a tag's DeepSpeed universal checkpoint (for resuming on another number of ranks);
``construction``: building the model partitioned under ZeRO-3.
These read DeepSpeed internals that are not public API: the pinned DeepSpeed version is in ``.ci/constraints.txt``.
"""
