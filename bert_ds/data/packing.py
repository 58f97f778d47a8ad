"""Packed rows (``data.packing``): several complete NSP/SOP pairs of a ``PretrainingDataset`` in one row.

Why, and how the rows are chosen: see ``PackedPretrainingDataset``. The model side (block-diagonal attention, every
pair's ``[CLS]`` through the pooler) is ``bert_ds.model``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from bert_ds.data.masking import IGNORE_INDEX
from bert_ds.data.pretraining import _CACHED_EPOCHS, PretrainingDataset, _index_dtype

_PACK_STREAM = 0x5041434B  # "PACK": the order of a packing window's rows (beside pretraining's ORDR/PAIR/MASK streams)

# Pairs are packed window by window: this many consecutive pairs of the epoch's order (already shuffled) go into
# one window's rows. Measured (seed 1, epoch 0) on zh-fortunes.txt, 5,263 short documents (unpacked: 48% padding
# at 128 tokens, 83% at 512): padding 1.7% / 1.9% (128 / 512) with 256, 1.25% / 0.69% with 1024, 1.04% / 0.36%
# with 4096; python-docs.txt (unpacked 5.4% / 11%): 0.83% / 0.77% with 1024. Past 1024 the gain is small.
PACKING_WINDOW = 1024


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of positions of ``lengths`` (each <= ``capacity``): longest first, each into the first bin it fits.

    e.g. lengths ``[60, 70, 20, 40, 50]``, capacity 128 -> order 70, 60, 50, 40, 20 -> bins
    ``[70, 50]``, ``[60, 40, 20]`` -> ``[[1, 4], [0, 3, 2]]``.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    room = np.empty(len(lengths), dtype=np.int64)
    bins: list[list[int]] = []
    for i in order.tolist():
        length = int(lengths[i])
        fits = np.flatnonzero(room[: len(bins)] >= length)
        if fits.size:
            room[fits[0]] -= length
            bins[fits[0]].append(i)
        else:
            room[len(bins)] = capacity - length
            bins.append([i])
    return bins


class PackedPretrainingDataset(Dataset):
    """Rows of ``max_seq_length`` tokens, each several complete pairs of ``pairs`` (``data.packing``).

    Which pairs share a row: epoch ``e``'s pairs (``pairs.sample(e, 0..n-1)``, whose order is already a shuffle)
    are cut into windows of ``window`` consecutive indices, and each window is packed by first-fit decreasing
    (:func:`first_fit_decreasing`); a window's rows are shuffled (seeded by (seed, epoch, window)), a row's pairs
    follow their indices. So a row is
    a pure function of (seed, epoch, its window), every pair of the epoch is trained exactly once, any process
    builds the same rows without communicating (ranks read disjoint rows as they read samples), and resume is exact.

    Why first-fit decreasing over a window: it needs no global pass over the data (Graphcore's histogram packing
    needs every length first) and no randomness of its own, it reaches ~1% padding on short-document corpora
    (``PACKING_WINDOW``), and a window of consecutive (already shuffled) pairs keeps the epoch's order mixed.
    The price: a window's row count is known only after its pairs' lengths are drawn, so an epoch's plan (its
    windows' rows) is built when the epoch is first read: one ``pair_length`` per pair, like the epoch order's
    permutation an O(epoch) step, cached for the two most recent epochs. Global row ``i`` is row ``i - R`` of
    the first epoch whose cumulative row count ``R`` passes it; epochs have slightly different row counts.

    Each item: ``input_ids``, ``token_type_ids``, ``labels``, ``attention_mask`` (1 on the pairs' tokens, 0 on the
    trailing padding), ``position_ids`` (restarting at 0 in every pair) and ``pair_ids`` (the pair number of each
    position, -1 on padding: attention never crosses two numbers), shape ``(max_seq_length,)``; ``cls_positions``
    and ``next_sentence_label`` (-100 past the row's pairs), shape ``(max_seq_length // 5,)``: each pair has at
    least 5 tokens.
    """

    def __init__(self, pairs: PretrainingDataset, window: int = PACKING_WINDOW) -> None:
        if pairs.nsp_mode == "none":
            raise ValueError("MLM-only rows (nsp_mode='none') are packed by construction: use PretrainingDataset")
        if window < 1:
            raise ValueError(f"window={window}: must be >= 1")
        self.pairs = pairs
        self.window = window
        self.seed = pairs.seed
        self.max_seq_length = pairs.max_seq_length
        self.max_pairs_per_row = pairs.max_seq_length // 5
        self.pad_id = pairs.pad_id
        self._plans: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._epoch_rows: list[int] = []  # rows of epochs 0, 1, ... as far as plans were built
        self.num_rows = self.rows_in_epoch(0)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_plans"] = OrderedDict()  # rebuilt by a worker when it needs them
        return state

    def __len__(self) -> int:
        return self.num_rows

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(pair_order, row_starts)``: row ``r`` of ``epoch`` holds pairs ``pair_order[row_starts[r]:row_starts[r + 1]]``."""
        cached = self._plans.get(epoch)
        if cached is not None:
            return cached
        n = self.pairs.num_samples
        lengths = np.fromiter((self.pairs.pair_length(epoch, j) for j in range(n)), dtype=np.int64, count=n)
        order, row_starts = [], [0]
        for first in range(0, n, self.window):
            rows = first_fit_decreasing(lengths[first : first + self.window], self.max_seq_length)
            # first-fit decreasing opens rows longest pair first: shuffled, or a window's batches would run from
            # rows of one long pair to rows of many short ones
            shuffle = np.random.default_rng([_PACK_STREAM, self.seed, epoch, first // self.window]).permutation(len(rows))
            for r in shuffle.tolist():
                order.extend(sorted(first + i for i in rows[r]))
                row_starts.append(len(order))
        plan = (np.asarray(order, dtype=_index_dtype(n)), np.asarray(row_starts, dtype=np.int64))
        self._plans[epoch] = plan
        while len(self._plans) > _CACHED_EPOCHS:
            self._plans.popitem(last=False)
        return plan

    def rows_in_epoch(self, epoch: int) -> int:
        while len(self._epoch_rows) <= epoch:
            self._epoch_rows.append(len(self.plan(len(self._epoch_rows))[1]) - 1)
        return self._epoch_rows[epoch]

    def locate(self, index: int) -> tuple[int, int]:
        """``(epoch, row)`` of global row ``index``."""
        epoch = 0
        while index >= self.rows_in_epoch(epoch):
            index -= self.rows_in_epoch(epoch)
            epoch += 1
        return epoch, index

    def pairs_of_row(self, epoch: int, row: int) -> list[int]:
        order, row_starts = self.plan(epoch)
        return order[row_starts[row] : row_starts[row + 1]].tolist()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.row(*self.locate(int(index)))

    def row(self, epoch: int, row: int) -> dict[str, torch.Tensor]:
        seq, max_pairs = self.max_seq_length, self.max_pairs_per_row
        out = {
            "input_ids": np.full(seq, self.pad_id, dtype=np.int64),
            "token_type_ids": np.zeros(seq, dtype=np.int64),
            "attention_mask": np.zeros(seq, dtype=np.int64),
            "labels": np.full(seq, IGNORE_INDEX, dtype=np.int64),
            "position_ids": np.zeros(seq, dtype=np.int64),
            "pair_ids": np.full(seq, -1, dtype=np.int64),
            "cls_positions": np.zeros(max_pairs, dtype=np.int64),
            "next_sentence_label": np.full(max_pairs, IGNORE_INDEX, dtype=np.int64),
        }
        position = 0
        for p, j in enumerate(self.pairs_of_row(epoch, row)):
            pair = self.pairs.pair_arrays(epoch, j)
            end = position + pair["input_ids"].size
            for key in ("input_ids", "token_type_ids", "labels"):
                out[key][position:end] = pair[key]
            out["attention_mask"][position:end] = 1
            out["position_ids"][position:end] = np.arange(end - position)
            out["pair_ids"][position:end] = p
            out["cls_positions"][p] = position
            out["next_sentence_label"][p] = pair["next_sentence_label"]
            position = end
        return {key: torch.from_numpy(value) for key, value in out.items()}


__all__ = ["PACKING_WINDOW", "PackedPretrainingDataset", "first_fit_decreasing"]
