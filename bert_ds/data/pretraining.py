"""BERT pretraining samples (NSP or SOP sentence pairs + dynamic MLM masks) built online from shards.

The semantics are those of Google's ``create_pretraining_data.py``, but nothing is
materialised on disk: each sample is a pure function of ``(seed, epoch, index)``.

Sample map
----------
*Anchors* (built once per shard, vectorised, in blocks of documents): a document is cut
into chunks of about ``max_num_tokens = max_seq_length - 3`` tokens; sentence ``i`` starts a
chunk when ``offset_in_document(i) // max_num_tokens`` steps up (the first sentence always
does). e.g. with ``max_num_tokens = 10`` and sentence lengths ``[4, 4, 4, 9, 2, 3]``:
offsets ``[0, 4, 8, 12, 21, 23]`` -> chunk numbers ``[0, 0, 0, 1, 2, 2]`` -> anchors are
sentences 0, 3 and 4. A document's last sentence never anchors (no continuation would be
left for segment B), and documents with fewer than 2 sentences give no anchors at all:
they cannot give a true pair, but they still serve as random-B sources. One anchor is
one sample of a pass, like one instance of Google's walk with ``dupe_factor=1``, so the
default epoch size is ``num_samples = number of anchors`` (summed over all prefixes).

*Epoch order*: for shard ``k`` with ``n_k`` samples in the epoch, the anchors in the order
of ``ceil(n_k / num_anchors)`` permutations drawn from ``(seed, k, epoch, repeat)``,
truncated to ``n_k``: an int array (int32 when the shard has < 2**31 sentences), built
lazily and cached for the two most recent epochs, so samples are shuffled across
documents and every epoch pairs them differently.

*Blending*: ``n_k`` is the largest-remainder share of ``num_samples`` for weight ``k``; item
``j`` of shard ``k`` is placed at "time" ``(j + 0.5) / n_k`` and the shards are merged by
time (ties by shard number). The position of every item is computed with integers, no
sort, and any prefix of ``m`` samples holds ``m * weight_k`` samples of shard ``k`` to
within two (within one for two shards). It is the same every epoch; the per-shard orders change.

*The sample* at global index ``i``: ``epoch, index = divmod(i, num_samples)``; the blend
picks ``(k, j)``; the anchor is ``epoch_order_k[j]``. Everything else (target length, the
A/B split, the NSP/SOP coin, the random document, truncation, the masks) is drawn from
generators seeded by ``(stream, seed, epoch, index)``. So every rank builds the same map
without communicating, any process can produce any sample, resume is O(1), and an
evaluation set with fixed masks is just indices ``[0, n)`` (epoch 0).

Memory: 4 bytes per anchor + 4 bytes per sample for each of <= 2 cached epoch orders
(+ 6 bytes per sample for the blend schedule when there are several prefixes); anchors
and samples are ~``sentence_tokens / max_num_tokens`` per sentence (~1/5 at seq 128).
The shards themselves are memory-mapped (page cache, shared by all processes).

Which rank reads which sample is the loader's business (``bert_ds.data.loader``); several pairs per row is
``bert_ds.data.packing``'s; a run's datasets from its config, ``bert_ds.data.run_datasets``.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from bert_ds.data import word_boundaries
from bert_ds.data.indexed_dataset import IndexedDataset, IndexedDatasetError, bin_path
from bert_ds.data.masking import IGNORE_INDEX, MaskingVocab, mask_tokens

logger = logging.getLogger(__name__)

NEXT_IS_CONTINUATION = 0
"""``next_sentence_label`` when B follows A (``BertForPreTraining`` convention)."""
NEXT_IS_RANDOM = 1
"""``next_sentence_label`` when B is random (NSP) or A and B are swapped (SOP)."""

# first word of every SeedSequence, so the streams drawn from one seed never coincide
_ORDER_STREAM = 0x4F524452  # "ORDR": per-shard epoch permutations
_PAIR_STREAM = 0x50414952  # "PAIR": target length, split, NSP/SOP coin, random document, truncation
_MASK_STREAM = 0x4D41534B  # "MASK": MLM masks
# documents per anchor-building block are chosen so a block holds about this many
# sentences: bounds the temporaries (~6 int64 arrays) for shards of any size
_ANCHOR_BLOCK_SENTENCES = 1 << 20
# blend positions are computed this many at a time (bounded int64 temporaries)
_BLEND_BLOCK = 1 << 20
# epoch orders kept per shard: a batch (or a worker's prefetch) may straddle two epochs
_CACHED_EPOCHS = 2

NspMode = Literal["nsp", "sop", "none"]


def _index_dtype(n: int) -> np.dtype:
    """int32 halves the map for any shard under 2**31 sentences."""
    return np.dtype(np.int32) if n < 2**31 else np.dtype(np.int64)


def find_anchors(document_indices: np.ndarray, sequence_lengths: np.ndarray, max_num_tokens: int) -> np.ndarray:
    """Sentences that start a sample (see the module docstring), in increasing order."""
    num_documents = len(document_indices) - 1
    num_sentences = int(document_indices[-1])
    parts = []
    d0 = 0
    while d0 < num_documents:
        s0 = int(document_indices[d0])
        d1 = int(np.searchsorted(document_indices, s0 + _ANCHOR_BLOCK_SENTENCES, side="right")) - 1
        d1 = min(max(d1, d0 + 1), num_documents)
        s1 = int(document_indices[d1])
        starts = np.asarray(document_indices[d0:d1], dtype=np.int64) - s0
        counts = np.diff(np.asarray(document_indices[d0 : d1 + 1], dtype=np.int64))
        lengths = np.asarray(sequence_lengths[s0:s1], dtype=np.int64)
        before = np.append(np.cumsum(lengths) - lengths, 0)  # the extra 0 lets empty documents index it
        offset = before[:-1] - np.repeat(before[starts], counts)
        chunk = offset // max_num_tokens
        anchor = np.ones(s1 - s0, dtype=bool)
        anchor[1:] = chunk[1:] != chunk[:-1]
        nonempty = counts > 0
        anchor[starts[nonempty]] = True  # chunk numbers restart at 0 in every document
        anchor[(starts + counts - 1)[nonempty]] = False
        anchor &= np.repeat(counts >= 2, counts)
        parts.append((np.flatnonzero(anchor) + s0).astype(_index_dtype(num_sentences)))
        d0 = d1
    return np.concatenate(parts) if parts else np.zeros(0, _index_dtype(num_sentences))


def blend_schedule(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic weighted interleaving of shards (see the module docstring).

    Returns:
        ``(dataset_index, dataset_sample_index)``: for each of ``num_samples`` positions the
        shard and the running number of that shard's samples.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blending weights must be non-negative with a positive sum, got {list(weights)}")
    raw = w / w.sum() * num_samples
    counts = np.floor(raw).astype(np.int64)
    # largest remainder: the counts sum to num_samples exactly
    counts[np.argsort(-(raw - counts), kind="stable")[: num_samples - int(counts.sum())]] += 1
    dataset_index = np.empty(num_samples, dtype=np.int16)
    dataset_sample_index = np.empty(num_samples, dtype=_index_dtype(num_samples))
    for k, n_k in enumerate(counts.tolist()):
        for first in range(0, n_k, _BLEND_BLOCK):
            j = np.arange(first, min(first + _BLEND_BLOCK, n_k), dtype=np.int64)
            position = j.copy()
            # item (k2, j2) precedes (k, j) iff (2*j2 + 1) * n_k < (2*j + 1) * n_k2, ties going to
            # the lower shard; counting the odd numbers 2*j2 + 1 below the bound needs integers only
            for k2, n_k2 in enumerate(counts.tolist()):
                if k2 == k or n_k2 == 0:
                    continue
                x = (2 * j + 1) * n_k2
                bound = x // n_k if k2 < k else (x - 1) // n_k
                position += np.minimum((bound + 1) // 2, n_k2)
            dataset_index[position] = k
            dataset_sample_index[position] = j
    return dataset_index, dataset_sample_index


def truncated_lengths(len_a: int, len_b: int, max_num_tokens: int) -> tuple[int, int]:
    """Lengths left by Google's ``truncate_seq_pair`` (trim the longer, B on ties), in O(1)."""
    excess = len_a + len_b - max_num_tokens
    if excess <= 0:
        return len_a, len_b
    if len_a - excess >= len_b:  # only A is trimmed
        return len_a - excess, len_b
    if len_b - excess >= len_a - 1:  # only B is trimmed
        return len_a, len_b - excess
    # both reach the balanced state (k, k) or (k, k - 1)
    return (max_num_tokens + 1) // 2, max_num_tokens // 2


class _Shard:
    """One prefix: the memory-mapped dataset, its anchors and its per-epoch orders."""

    def __init__(self, prefix: str, shard_id: int, seed: int, max_num_tokens: int, blocks: bool = False) -> None:
        self.prefix = prefix
        self.shard_id = shard_id
        self.seed = seed
        self._open(check=True)
        sentences_per_doc = np.diff(self.document_indices)
        self.num_short_documents = int((sentences_per_doc < 2).sum())
        self.stream_starts = None
        if blocks:  # MLM-only rows: the "anchors" are the numbers of the token stream's blocks
            self._build_stream()
            self.anchors = np.arange(-(-int(self.stream_starts[-1]) // max_num_tokens), dtype=np.int64)
        else:
            self.anchors = find_anchors(self.document_indices, self.lengths, max_num_tokens)
        # every document has a sentence (checked at open): any other one can give a random B
        self.num_b_documents = len(sentences_per_doc)
        self.num_samples = 0  # set by the blend
        self.words: word_boundaries.WordFlags | None = None  # Chinese word boundaries, for whole-word masking
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()

    def _open(self, check: bool = False) -> None:
        ds = IndexedDataset(self.prefix)
        if check:
            # the index is not trusted: document ranges and pointers must add up before anchors are built from them
            # (a worker that reopens the shard skips this: the dataset checked it when it was built)
            ds.check_index()
        self.document_indices = ds.document_indices
        self.lengths = ds.sequence_lengths
        self.pointers = ds.sequence_pointers
        self.tokens = ds.tokens
        self.itemsize = ds.dtype.itemsize
        self._ds = ds

    def __getstate__(self) -> dict:
        # memory maps would be pickled as full copies (spawn/forkserver workers): reopen instead
        state = self.__dict__.copy()
        for key in ("_ds", "document_indices", "lengths", "pointers", "tokens"):
            del state[key]
        state["_orders"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def _build_stream(self) -> None:
        """The shard as one token stream: its documents in order, one [SEP] between two documents.

        ``stream_starts[d]`` is where document ``d`` starts in the stream (the last entry is the stream's length).
        e.g. documents of 3, 2 and 4 tokens -> stream ``a a a | b b | c c c c`` -> starts ``[0, 4, 7, 11]``.
        """
        first = np.asarray(self.document_indices[:-1], dtype=np.int64)
        last = np.asarray(self.document_indices[1:], dtype=np.int64) - 1
        self.doc_token_starts = np.asarray(self.pointers, dtype=np.int64)[first] // self.itemsize
        ends = np.asarray(self.pointers, dtype=np.int64)[last] // self.itemsize + np.asarray(self.lengths, dtype=np.int64)[last]
        self.doc_token_lengths = ends - self.doc_token_starts
        self.stream_starts = np.concatenate(([0], np.cumsum(self.doc_token_lengths + 1)))
        self.stream_starts[-1] -= 1  # no [SEP] after the last document

    def block_pieces(self, block: int, block_tokens: int) -> list[tuple[int, int]]:
        """Stream positions ``[block * block_tokens, (block + 1) * block_tokens)`` as ``(token offset, length)`` pieces,
        ``(-1, 1)`` standing for a [SEP] between documents."""
        s0 = block * block_tokens
        s1 = min(s0 + block_tokens, int(self.stream_starts[-1]))
        d = int(np.searchsorted(self.stream_starts, s0, side="right")) - 1
        pieces = []
        while s0 < s1:
            offset = s0 - int(self.stream_starts[d])
            length = int(self.doc_token_lengths[d])
            if offset < length:
                n = min(length - offset, s1 - s0)
                pieces.append((int(self.doc_token_starts[d]) + offset, n))
                s0 += n
            else:
                pieces.append((-1, 1))
                s0 += 1
                d += 1
        return pieces

    def token_offset(self, sentence: int) -> int:
        """Position of ``sentence``'s first token in ``tokens`` (a document's sentences are contiguous)."""
        return int(self.pointers[sentence]) // self.itemsize

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Anchor sentence of each of this shard's samples in ``epoch``."""
        order = self._orders.get(epoch)
        if order is None:
            parts, needed, repeat = [], self.num_samples, 0
            while needed > 0:
                rng = np.random.default_rng([_ORDER_STREAM, self.seed, self.shard_id, epoch, repeat])
                part = self.anchors[rng.permutation(self.anchors.size)[:needed]]
                parts.append(part)
                needed -= part.size
                repeat += 1
            order = np.concatenate(parts) if parts else self.anchors[:0]
            self._orders[epoch] = order
            while len(self._orders) > _CACHED_EPOCHS:
                self._orders.popitem(last=False)
        return order

    def random_other_document(self, document: int, rng: np.random.Generator) -> int:
        """A uniformly random document, never ``document`` (no retries needed)."""
        other = int(rng.integers(0, self.num_b_documents - 1))
        return other + (other >= document)

    def check_token_ids(self, starts_lengths: tuple[tuple[int, int], ...], vocab_size: int, where: str) -> None:
        """Every token of the given ``(offset, length)`` ranges is a vocabulary id; else an error naming the file and token."""
        for start, length in starts_lengths:
            piece = self.tokens[start : start + length]
            if length and (int(piece.max()) >= vocab_size or int(piece.min()) < 0):
                bad = start + int(np.argmax((piece >= vocab_size) | (piece < 0)))
                raise IndexedDatasetError(
                    f"{bin_path(self.prefix)}: token id {int(self.tokens[bad])} at token {bad} is outside the vocabulary "
                    f"(size {vocab_size}); {where}. The shard was not tokenized with this vocabulary, or it is corrupt"
                )


class PretrainingDataset(Dataset):
    """Map-style dataset of BERT pretraining samples; ``ds[i]`` works for any ``i >= 0``.

    ``len(ds)`` is one epoch (``num_samples``); index ``i`` is sample ``i % num_samples`` of
    epoch ``i // num_samples``, so a sampler can run across epochs without rebuilding anything.
    Each item is a dict of int64 tensors: ``input_ids``, ``token_type_ids``, ``attention_mask``,
    ``labels`` (shape ``(max_seq_length,)``, -100 = not predicted) and ``next_sentence_label``
    (shape ``()``; 0 = B continues A, 1 = B is random (NSP) or swapped (SOP)).
    """

    def __init__(
        self,
        prefixes: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        vocab_size: int,
        cls_id: int,
        sep_id: int,
        pad_id: int,
        mask_id: int,
        max_seq_length: int,
        max_predictions_per_seq: int,
        seed: int,
        unk_id: int | None = None,
        weights: Sequence[float] | None = None,
        is_continuation: np.ndarray | None = None,
        is_cjk_token: np.ndarray | None = None,
        short_seq_prob: float = 0.1,
        mask_prob: float = 0.15,
        whole_word_mask: bool = False,
        nsp_mode: NspMode = "nsp",
        num_samples: int | None = None,
    ) -> None:
        """Open the shards and build the anchors (every rank does this, identically).

        Args:
            prefixes: one shard prefix or several to blend.
            vocab_size: number of token ids (the random-replacement range).
            cls_id: id of [CLS].
            sep_id: id of [SEP].
            pad_id: id of [PAD].
            mask_id: id of [MASK].
            max_seq_length: every sample is padded to this length (>= 5).
            max_predictions_per_seq: cap on MLM targets per sample (Google: 20 at 128, 80 at 512).
            seed: the one seed of the data order, the pairs and the masks.
            unk_id: id of [UNK]; when given, [UNK] is never masked (recommended).
            weights: blending weights, one per prefix; None weighs prefixes by their number of
                anchors, which is the same as concatenating them.
            is_continuation: bool[vocab_size] marking ``##`` pieces; needed for whole-word masking.
            is_cjk_token: bool[vocab_size] marking single CJK characters
                (``word_boundaries.cjk_token_table``); with whole-word masking, a shard holding them
                must have word boundaries (``PREFIX.words``) or the dataset refuses it.
            short_seq_prob: probability of a random target length in [2, max_seq_length - 3].
            mask_prob: share of non-special tokens to predict.
            whole_word_mask: mask ``##`` pieces together with their word, and Chinese characters
                together with their segmented word where the shard has ``PREFIX.words``.
            nsp_mode: "nsp" (B random half the time) or "sop" (A and B swapped half the time).
            num_samples: samples per epoch; None = the number of anchors over all prefixes.
        """
        prefix_list = [prefixes] if isinstance(prefixes, str | os.PathLike) else list(prefixes)
        if not prefix_list:
            raise ValueError("prefixes: give at least one shard prefix")
        if max_seq_length < 5:
            raise ValueError(f"max_seq_length={max_seq_length}: need >= 5 ([CLS] A [SEP] B [SEP] with A, B >= 1 token)")
        if nsp_mode not in ("nsp", "sop", "none"):
            raise ValueError(f"nsp_mode={nsp_mode!r}: use 'nsp', 'sop' or 'none'")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob={mask_prob}: must be in (0, 1)")
        if not 0.0 <= short_seq_prob <= 1.0:
            raise ValueError(f"short_seq_prob={short_seq_prob}: must be in [0, 1]")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        if max_predictions_per_seq < 1:
            raise ValueError(f"max_predictions_per_seq={max_predictions_per_seq}: must be >= 1")
        if whole_word_mask and is_continuation is None:
            raise ValueError("whole_word_mask=True needs is_continuation (bert_ds.data.masking.continuation_table(vocab))")
        if weights is not None and len(weights) != len(prefix_list):
            raise ValueError(f"{len(weights)} blending weights for {len(prefix_list)} prefixes")
        self.max_seq_length = max_seq_length
        # tokens of A and B beside [CLS] and two [SEP]s; MLM-only rows: of the stream beside [CLS] and [SEP]
        self.max_num_tokens = max_seq_length - (2 if nsp_mode == "none" else 3)
        self.short_seq_prob = short_seq_prob
        self.mask_prob = mask_prob
        self.max_predictions_per_seq = max_predictions_per_seq
        self.whole_word_mask = whole_word_mask
        self.nsp_mode = nsp_mode
        self.seed = seed
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.vocab_size = vocab_size
        special = [cls_id, sep_id, pad_id] + ([unk_id] if unk_id is not None else [])
        self.masking_vocab = MaskingVocab.build(vocab_size, mask_id, special, is_continuation)
        full_length_targets = int(self.max_num_tokens * mask_prob + 0.5)
        if max_predictions_per_seq < full_length_targets:
            logger.warning(
                "max_predictions_per_seq=%d caps masking below mask_prob=%.2f for full-length samples (%d targets); "
                "raise it to at least %d to mask the configured share",
                max_predictions_per_seq, mask_prob, full_length_targets, full_length_targets,
            )  # fmt: skip

        self._shards = [_Shard(str(p), k, seed, self.max_num_tokens, blocks=nsp_mode == "none") for k, p in enumerate(prefix_list)]
        for shard in self._shards:
            if whole_word_mask and is_cjk_token is not None:
                shard.words = word_boundaries.for_whole_word_masking(shard.prefix, shard.tokens, is_cjk_token)
            elif whole_word_mask and word_boundaries.segmentation_of(shard.prefix) is not None:
                shard.words = word_boundaries.WordFlags(shard.prefix, len(shard.tokens))
            if shard.anchors.size == 0 and nsp_mode == "none":
                raise ValueError(f"{shard.prefix}: the shard holds no token")
            if shard.anchors.size == 0:
                raise ValueError(f"{shard.prefix}: no document has 2 or more sentences, so no sentence pair can be built")
            if nsp_mode == "nsp" and shard.num_b_documents < 2:
                raise ValueError(f"{shard.prefix}: NSP needs at least 2 non-empty documents to draw a random B from another one")
        num_anchors = [s.anchors.size for s in self._shards]
        self.num_samples = int(num_samples) if num_samples is not None else sum(num_anchors)
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: must be >= 1")
        self.weights = [float(w) for w in (weights if weights is not None else num_anchors)]
        if len(self._shards) == 1:
            self._dataset_index = self._dataset_sample_index = None  # identity: no arrays
            self._shards[0].num_samples = self.num_samples
        else:
            self._dataset_index, self._dataset_sample_index = blend_schedule(self.weights, self.num_samples)
            for k, n_k in enumerate(np.bincount(self._dataset_index, minlength=len(self._shards)).tolist()):
                self._shards[k].num_samples = n_k
        for shard in self._shards:
            logger.info(
                "%s: %d documents (%d with < 2 sentences: random-B only), %d sentences, %d anchors, %d samples per epoch",
                shard.prefix, len(shard.document_indices) - 1, shard.num_short_documents, len(shard.lengths),
                shard.anchors.size, shard.num_samples,
            )  # fmt: skip
        logger.info("%d samples per epoch of sequence length %d (%s, seed %d)", self.num_samples, max_seq_length, nsp_mode, seed)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # __getitem__ never raises IndexError, so without this `for x in ds` would not end
        return (self[i] for i in range(self.num_samples))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, index_in_epoch = divmod(int(index), self.num_samples)
        return self.sample(epoch, index_in_epoch)

    def shard_of(self, index_in_epoch: int) -> tuple[int, int]:
        """``(shard, sample number within that shard's epoch)`` of a position in the epoch."""
        if self._dataset_index is None:
            return 0, index_in_epoch
        return int(self._dataset_index[index_in_epoch]), int(self._dataset_sample_index[index_in_epoch])

    def epoch_anchors(self, epoch: int, shard: int = 0) -> np.ndarray:
        """Anchor sentence of each of ``shard``'s samples in ``epoch``, in sample order."""
        return self._shards[shard].epoch_order(epoch)

    def sample(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index`` (``0 <= index < num_samples``) of ``epoch``; a pure function of (seed, epoch, index)."""
        if self.nsp_mode == "none":
            return self._mlm_row(epoch, index)
        pair = self.pair_arrays(epoch, index)
        seq, end = self.max_seq_length, pair["input_ids"].size
        input_ids = np.full(seq, self.pad_id, dtype=np.int64)
        input_ids[:end] = pair["input_ids"]
        token_type_ids = np.zeros(seq, dtype=np.int64)
        token_type_ids[:end] = pair["token_type_ids"]
        attention_mask = np.zeros(seq, dtype=np.int64)
        attention_mask[:end] = 1
        labels = np.full(seq, IGNORE_INDEX, dtype=np.int64)
        labels[:end] = pair["labels"]
        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
            "next_sentence_label": torch.tensor(pair["next_sentence_label"], dtype=torch.int64),
        }

    def _segments(self, epoch: int, index: int) -> tuple[_Shard, tuple[int, int], tuple[int, int], int]:
        if not 0 <= index < self.num_samples or epoch < 0:
            raise IndexError(f"sample {index} of epoch {epoch}: the epoch has {self.num_samples} samples")
        k, j = self.shard_of(index)
        shard = self._shards[k]
        anchor = int(shard.epoch_order(epoch)[j])
        pair_rng = np.random.default_rng([_PAIR_STREAM, self.seed, epoch, index])
        a, b, label = self._pair(shard, anchor, pair_rng)
        return shard, a, b, label

    def pair_length(self, epoch: int, index: int) -> int:
        """Tokens of pair ``index`` of ``epoch``, [CLS] and both [SEP] included (what packing needs; no token is read)."""
        _, (_, len_a), (_, len_b), _ = self._segments(epoch, index)
        return 3 + len_a + len_b

    def pair_arrays(self, epoch: int, index: int) -> dict[str, np.ndarray | int]:
        """One masked pair ``[CLS] A [SEP] B [SEP]``, unpadded: int64 ``input_ids``, ``token_type_ids``, ``labels`` and
        the int ``next_sentence_label``. The same tokens and masks whether the pair is padded alone or packed."""
        shard, (a_start, len_a), (b_start, len_b), label = self._segments(epoch, index)
        end = 3 + len_a + len_b
        input_ids = np.empty(end, dtype=np.int64)
        input_ids[0] = self.cls_id
        input_ids[1 : 1 + len_a] = shard.tokens[a_start : a_start + len_a]
        input_ids[1 + len_a] = self.sep_id
        input_ids[2 + len_a : end - 1] = shard.tokens[b_start : b_start + len_b]
        input_ids[end - 1] = self.sep_id
        # token ids come from a file: one out of range would index past the embedding (on a GPU, an opaque device assert)
        if int(input_ids.max()) >= self.vocab_size or int(input_ids.min()) < 0:
            shard.check_token_ids(((a_start, len_a), (b_start, len_b)), self.vocab_size, f"sample {index} of epoch {epoch}")
        token_type_ids = np.zeros(end, dtype=np.int64)
        token_type_ids[2 + len_a :] = 1

        word_continues = None
        if shard.words is not None:  # [CLS] and [SEP] stay False: no word spans them
            word_continues = np.zeros(end, dtype=bool)
            word_continues[1 : 1 + len_a] = shard.words.window(a_start, len_a)
            word_continues[2 + len_a : end - 1] = shard.words.window(b_start, len_b)
        # masking the unpadded pair draws exactly what masking it padded drew (padding is never a candidate)
        masked_ids, labels = self._mask(input_ids, word_continues, epoch, index)
        return {"input_ids": masked_ids, "token_type_ids": token_type_ids, "labels": labels, "next_sentence_label": label}

    def _mask(self, input_ids: np.ndarray, word_continues: np.ndarray | None, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Dynamic masking of one sample, drawn from its own stream: a function of (seed, epoch, index) only."""
        mask_rng = np.random.default_rng([_MASK_STREAM, self.seed, epoch, index])
        return mask_tokens(
            input_ids,
            self.masking_vocab,
            mask_rng,
            mask_prob=self.mask_prob,
            max_predictions=self.max_predictions_per_seq,
            whole_word=self.whole_word_mask,
            word_continues=word_continues,
        )

    def _mlm_row(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """``nsp_mode="none"``: ``[CLS]`` + one block of the shard's token stream + ``[SEP]`` (see ``_Shard.block_pieces``)."""
        if not 0 <= index < self.num_samples or epoch < 0:
            raise IndexError(f"sample {index} of epoch {epoch}: the epoch has {self.num_samples} samples")
        k, j = self.shard_of(index)
        shard = self._shards[k]
        block = int(shard.epoch_order(epoch)[j])
        seq = self.max_seq_length
        input_ids = np.full(seq, self.pad_id, dtype=np.int64)
        word_continues = np.zeros(seq, dtype=bool) if shard.words is not None else None
        input_ids[0] = self.cls_id
        position = 1
        for start, length in shard.block_pieces(block, self.max_num_tokens):
            if start < 0:  # a document ended: [SEP] between it and the next one, as RoBERTa's full-sentences rows
                input_ids[position] = self.sep_id
                position += 1
                continue
            input_ids[position : position + length] = shard.tokens[start : start + length]
            piece = input_ids[position : position + length]
            if length and (int(piece.max()) >= self.vocab_size or int(piece.min()) < 0):
                shard.check_token_ids(((start, length),), self.vocab_size, f"row {index} of epoch {epoch}")
            if word_continues is not None:
                word_continues[position : position + length] = shard.words.window(start, length)
            position += length
        input_ids[position] = self.sep_id
        if word_continues is not None:
            word_continues[1] = False  # a row may start inside a word: the piece left here is a word of its own
        attention_mask = np.zeros(seq, dtype=np.int64)
        attention_mask[: position + 1] = 1
        masked_ids, labels = self._mask(input_ids, word_continues, epoch, index)
        return {
            "input_ids": torch.from_numpy(masked_ids),
            "token_type_ids": torch.zeros(seq, dtype=torch.int64),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }

    def _pair(self, shard: _Shard, anchor: int, rng: np.random.Generator) -> tuple[tuple[int, int], tuple[int, int], int]:
        """Segments A and B as (token offset, length) in ``shard.tokens``, and the NSP/SOP label.

        Google's per-instance logic: a target length (shorter with ``short_seq_prob``), the
        sentences from the anchor until the target is reached, A = a random non-empty
        prefix of them; B = the rest (true) or sentences of a random other document filling
        the remaining target (random); then the longer segment is trimmed from a random end.
        """
        target = self.max_num_tokens
        if rng.random() < self.short_seq_prob:
            target = int(rng.integers(2, self.max_num_tokens + 1))
        document = int(np.searchsorted(shard.document_indices, anchor, side="right")) - 1
        document_end = int(shard.document_indices[document + 1])
        # >= 2 sentences: the anchor is never a document's last one and target >= 2
        lengths = shard.lengths[anchor : min(document_end, anchor + target)]
        cumulative = np.cumsum(lengths)
        num_chunk = min(int(np.searchsorted(cumulative, target)) + 1, lengths.size)
        a_end = int(rng.integers(1, num_chunk)) if num_chunk >= 2 else 1
        a_start = shard.token_offset(anchor)
        len_a = int(cumulative[a_end - 1])

        if self.nsp_mode == "nsp" and rng.random() < 0.5:
            label = NEXT_IS_RANDOM
            other = shard.random_other_document(document, rng)
            other_start, other_end = int(shard.document_indices[other]), int(shard.document_indices[other + 1])
            first = other_start + int(rng.integers(0, other_end - other_start))
            target_b = max(1, target - len_a)  # at least one sentence, as Google
            lengths_b = shard.lengths[first : min(other_end, first + target_b)]
            cumulative_b = np.cumsum(lengths_b)
            num_b = min(int(np.searchsorted(cumulative_b, target_b)) + 1, lengths_b.size)
            b_start, len_b = shard.token_offset(first), int(cumulative_b[num_b - 1])
        else:
            label = NEXT_IS_CONTINUATION
            # a one-sentence chunk (a long sentence) takes the next sentence as B; Google makes
            # such pairs random instead, which would skew the 50/50 label balance
            b_end = max(num_chunk, a_end + 1)
            b_start, len_b = a_start + len_a, int(cumulative[b_end - 1]) - len_a
            if self.nsp_mode == "sop" and rng.random() < 0.5:
                label = NEXT_IS_RANDOM
                a_start, len_a, b_start, len_b = b_start, len_b, a_start, len_a

        new_a, new_b = truncated_lengths(len_a, len_b, self.max_num_tokens)
        # each trimmed token comes off the front or the back with probability 1/2, as Google
        if new_a < len_a:
            a_start += int(rng.binomial(len_a - new_a, 0.5))
        if new_b < len_b:
            b_start += int(rng.binomial(len_b - new_b, 0.5))
        return (a_start, new_a), (b_start, new_b), label


__all__ = [
    "NEXT_IS_CONTINUATION",
    "NEXT_IS_RANDOM",
    "PretrainingDataset",
    "blend_schedule",
    "find_anchors",
    "truncated_lengths",
]
