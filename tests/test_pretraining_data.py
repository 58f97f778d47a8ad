"""bert_ds.data.pretraining and bert_ds.data.loader on synthetic shards whose every token is unique.

Token id = ``base + global token offset``, so any token traces back to its sentence and
document; statistical tolerances are 4 binomial sigmas.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from bert_ds.data.indexed_dataset import IndexedDatasetWriter
from bert_ds.data.loader import RankBatchSampler, build_dataloader
from bert_ds.data.masking import IGNORE_INDEX
from bert_ds.data.pretraining import (
    NEXT_IS_CONTINUATION,
    NEXT_IS_RANDOM,
    PretrainingDataset,
    blend_schedule,
    find_anchors,
    truncated_lengths,
)

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
BASE = 10  # first data token id
SEQ = 128
MAX_NUM_TOKENS = SEQ - 3


@dataclass
class Corpus:
    prefix: Path
    base: int
    sentence_starts: np.ndarray  # token offset of each sentence, plus the total at the end
    sentence_doc: np.ndarray  # document of each sentence
    sentences_per_doc: np.ndarray

    @property
    def end(self) -> int:
        """One past the largest token id."""
        return self.base + int(self.sentence_starts[-1])

    def trace(self, tokens: np.ndarray) -> Segment:
        offsets = tokens - self.base
        assert ((offsets >= 0) & (offsets < self.sentence_starts[-1])).all(), "token from another shard"
        sentences = np.searchsorted(self.sentence_starts, offsets, side="right") - 1
        docs = self.sentence_doc[sentences]
        assert (docs == docs[0]).all(), "a segment mixes documents"
        assert (np.diff(offsets) == 1).all(), "a segment is not a contiguous run of its document"
        return Segment(
            doc=int(docs[0]),
            first=int(offsets[0]),
            last=int(offsets[-1]),
            starts_sentence=bool(self.sentence_starts[sentences[0]] == offsets[0]),
            ends_sentence=bool(self.sentence_starts[sentences[-1] + 1] == offsets[-1] + 1),
        )


@dataclass
class Segment:
    doc: int
    first: int  # token offsets
    last: int
    starts_sentence: bool
    ends_sentence: bool


def write_corpus(prefix: Path, sentences_per_doc, sentence_lengths, base: int = BASE) -> Corpus:
    sentences_per_doc = np.asarray(sentences_per_doc, dtype=np.int64)
    sentence_lengths = np.asarray(sentence_lengths, dtype=np.int64)
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        writer.add_documents(base + np.arange(sentence_lengths.sum()), sentence_lengths, sentences_per_doc)
    return Corpus(
        prefix=prefix,
        base=base,
        sentence_starts=np.concatenate([[0], np.cumsum(sentence_lengths)]),
        sentence_doc=np.repeat(np.arange(sentences_per_doc.size), sentences_per_doc),
        sentences_per_doc=sentences_per_doc,
    )


def random_corpus(prefix: Path, seed: int, base: int = BASE, num_docs: int = 300) -> Corpus:
    """Documents of 2-40 sentences of 3-30 tokens, plus single-sentence ones (no empty document: shards with one are refused)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, 41, size=num_docs)
    counts[rng.random(num_docs) < 0.2] = 1
    return write_corpus(prefix, counts, rng.integers(3, 31, size=int(counts.sum())), base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return random_corpus(tmp_path_factory.mktemp("shard") / "wiki", seed=0)


def make_dataset(corpora: Corpus | list[Corpus], **overrides) -> PretrainingDataset:
    corpora = corpora if isinstance(corpora, list) else [corpora]
    args = dict(
        vocab_size=max(c.end for c in corpora),
        cls_id=CLS,
        sep_id=SEP,
        pad_id=PAD,
        mask_id=MASK,
        unk_id=UNK,
        max_seq_length=SEQ,
        max_predictions_per_seq=20,
        seed=1234,
    )
    args.update(overrides)
    return PretrainingDataset([c.prefix for c in corpora], **args)


def split(sample: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, int]:
    """Unmasked segments A and B of a sample, and its label."""
    labels = sample["labels"].numpy()
    ids = np.where(labels != IGNORE_INDEX, labels, sample["input_ids"].numpy())
    seps = np.flatnonzero(ids == SEP)
    assert seps.size == 2
    return ids[1 : seps[0]], ids[seps[0] + 1 : seps[1]], int(sample["next_sentence_label"])


def four_sigma(p: float, n: int) -> float:
    return 4 * math.sqrt(p * (1 - p) * n)


# --- the sample map ---------------------------------------------------------------------


def test_anchors_follow_the_worked_example_and_skip_short_documents_and_last_sentences():
    # doc 0: lengths [4, 4, 4, 9, 2, 3] -> offsets [0, 4, 8, 12, 21, 23] -> chunks [0, 0, 0, 1, 2, 2]
    # doc 1: one sentence (no true pair); doc 2: empty; doc 3: two sentences, the last never anchors
    document_indices = np.array([0, 6, 7, 7, 9])
    lengths = np.array([4, 4, 4, 9, 2, 3, 5, 3, 20], dtype=np.int32)
    assert find_anchors(document_indices, lengths, max_num_tokens=10).tolist() == [0, 3, 4, 7]


def test_default_epoch_size_is_the_number_of_anchors(corpus):
    ds = make_dataset(corpus)
    lengths = np.diff(corpus.sentence_starts)
    document_indices = np.concatenate([[0], np.cumsum(corpus.sentences_per_doc)])
    assert len(ds) == find_anchors(document_indices, lengths, MAX_NUM_TOKENS).size
    # about one anchor per max_num_tokens tokens of documents with >= 2 sentences
    usable = corpus.sentences_per_doc[corpus.sentence_doc] >= 2
    assert len(ds) == pytest.approx(lengths[usable].sum() / MAX_NUM_TOKENS, rel=0.35)


def test_epoch_order_is_a_shuffled_pass_over_the_anchors(corpus):
    ds = make_dataset(corpus)
    order = ds.epoch_anchors(0)
    assert order.dtype == np.int32 and order.size == len(ds)
    assert sorted(order.tolist()) == sorted(set(order.tolist()))  # each anchor once
    assert not np.array_equal(order, np.sort(order))
    assert not np.array_equal(order, ds.epoch_anchors(1))
    # a bigger epoch repeats every anchor once before any anchor a third time
    big = make_dataset(corpus, num_samples=2 * len(ds) + 7).epoch_anchors(0)
    assert np.bincount(np.bincount(big)[np.unique(big)]).tolist()[2:] == [len(ds) - 7, 7]


def test_truncated_lengths_match_googles_loop():
    for max_num_tokens in range(2, 30):
        for len_a in range(1, 35):
            for len_b in range(1, 35):
                a, b = len_a, len_b
                while a + b > max_num_tokens:
                    if a > b:
                        a -= 1
                    else:
                        b -= 1
                assert truncated_lengths(len_a, len_b, max_num_tokens) == (a, b)


# --- sample layout ------------------------------------------------------------------------


@pytest.mark.parametrize("max_seq_length", [16, 128, 512])
def test_samples_are_cls_a_sep_b_sep_with_token_types_and_padding(corpus, max_seq_length):
    ds = make_dataset(corpus, max_seq_length=max_seq_length)
    for i in range(0, 3 * len(ds), 7):
        s = ds[i]
        assert {k: (v.dtype, tuple(v.shape)) for k, v in s.items()} == {
            **{k: (torch.int64, (max_seq_length,)) for k in ("input_ids", "token_type_ids", "attention_mask", "labels")},
            "next_sentence_label": (torch.int64, ()),
        }
        a, b, _ = split(s)
        assert a.size >= 1 and b.size >= 1
        length = 3 + a.size + b.size
        assert length <= max_seq_length
        ids, types, attention = s["input_ids"].numpy(), s["token_type_ids"].numpy(), s["attention_mask"].numpy()
        assert ids[0] == CLS and ids[1 + a.size] == SEP and ids[length - 1] == SEP
        assert (ids[length:] == PAD).all()
        assert types.tolist() == [0] * (2 + a.size) + [1] * (b.size + 1) + [0] * (max_seq_length - length)
        assert attention.tolist() == [1] * length + [0] * (max_seq_length - length)
        labels = s["labels"].numpy()
        assert (labels[[0, 1 + a.size]] == IGNORE_INDEX).all() and (labels[length - 1 :] == IGNORE_INDEX).all()


def test_nsp_is_half_random_and_random_b_never_comes_from_a_document(corpus):
    ds = make_dataset(corpus)
    n = 4000
    num_random = num_exact = b_from_single_sentence_docs = 0
    for i in range(n):
        a, b, label = split(ds[i])
        seg_a, seg_b = corpus.trace(a), corpus.trace(b)
        assert corpus.sentences_per_doc[seg_a.doc] >= 2  # short documents never give A
        if label == NEXT_IS_RANDOM:
            num_random += 1
            assert seg_b.doc != seg_a.doc
            b_from_single_sentence_docs += int(corpus.sentences_per_doc[seg_b.doc] == 1)
        else:
            assert label == NEXT_IS_CONTINUATION
            assert seg_b.doc == seg_a.doc and seg_b.first > seg_a.last
            # A's last token and B's first lie in different sentences: the A/B boundary is between
            # them, and the gap (if any) is what truncation trimmed
            assert np.searchsorted(corpus.sentence_starts, seg_b.first, "right") > np.searchsorted(
                corpus.sentence_starts, seg_a.last, "right"
            )
            if a.size + b.size < MAX_NUM_TOKENS:  # nothing trimmed: B starts right where A ends
                num_exact += 1
                assert seg_b.first == seg_a.last + 1 and seg_a.starts_sentence and seg_a.ends_sentence
    assert abs(num_random - n / 2) < four_sigma(0.5, n)
    assert num_exact > 100
    assert b_from_single_sentence_docs > 50  # short documents still serve as random B


def test_sop_keeps_both_segments_in_one_document_and_swaps_half(corpus):
    ds = make_dataset(corpus, nsp_mode="sop")
    n = 3000
    num_swapped = 0
    for i in range(n):
        a, b, label = split(ds[i])
        seg_a, seg_b = corpus.trace(a), corpus.trace(b)
        assert seg_a.doc == seg_b.doc
        if label == NEXT_IS_RANDOM:
            num_swapped += 1
            assert seg_a.first > seg_b.last
        else:
            assert seg_b.first > seg_a.last
        if a.size + b.size < MAX_NUM_TOKENS:
            first, second = (seg_b, seg_a) if label == NEXT_IS_RANDOM else (seg_a, seg_b)
            assert second.first == first.last + 1
    assert abs(num_swapped - n / 2) < four_sigma(0.5, n)


@pytest.mark.parametrize("short_seq_prob", [0.0, 0.1, 1.0])
def test_short_seq_prob_shortens_that_share_of_samples(tmp_path, short_seq_prob):
    # 5-token sentences, 100 per document: every anchor chunk is exactly max_num_tokens (125)
    # long, so only a short target t <= 120 (119 of the 124 values in [2, 125]) leaves a sample
    # shorter than max_seq_length
    corpus = write_corpus(tmp_path / "flat", [100] * 40, [5] * 4000)
    ds = make_dataset(corpus, nsp_mode="sop", short_seq_prob=short_seq_prob)
    n = 3000
    short = sum(int(ds[i]["attention_mask"].sum()) < SEQ for i in range(n))
    p = short_seq_prob * 119 / 124
    assert abs(short - p * n) <= four_sigma(p, n)


# --- masking through the dataset ------------------------------------------------------


@pytest.mark.parametrize("mask_prob", [0.15, 0.30])
def test_masked_share_and_whole_words_in_samples(corpus, mask_prob):
    # every 4th token of the corpus is a "##" piece of the token before it
    is_continuation = np.zeros(corpus.end, dtype=bool)
    is_continuation[BASE + 3 :: 4] = True
    ds = make_dataset(corpus, mask_prob=mask_prob, max_predictions_per_seq=SEQ, whole_word_mask=True, is_continuation=is_continuation)
    masked = candidates = 0
    for i in range(500):
        s = ds[i]
        labels, attention = s["labels"].numpy(), s["attention_mask"].numpy()
        ids = np.where(labels != IGNORE_INDEX, labels, s["input_ids"].numpy())
        chosen = labels != IGNORE_INDEX
        candidates += int(((ids >= BASE) & (attention == 1)).sum())
        masked += int(chosen.sum())
        # a chosen ## piece right after a data token means that token (its word head) is chosen too
        cont = is_continuation[ids] & chosen
        cont[0] = False
        prev_is_data = np.concatenate([[False], ids[:-1] >= BASE])
        assert (chosen[np.flatnonzero(cont & prev_is_data) - 1]).all()
        # and the piece after a chosen token, if it continues the same word, is chosen too
        following = np.flatnonzero(chosen[:-1] & is_continuation[ids[1:]] & (ids[1:] >= BASE)) + 1
        assert chosen[following].all()
    assert abs(masked / candidates - mask_prob) < 0.01


# --- determinism, ranks, resume ---------------------------------------------------------


def assert_samples_equal(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def test_a_sample_is_a_function_of_seed_epoch_and_index(corpus):
    ds, again = make_dataset(corpus), make_dataset(corpus)
    n = len(ds)
    for i in (0, 1, 17, n - 1, n, 5 * n + 3):
        assert_samples_equal(ds[i], ds[i])
        assert_samples_equal(ds[i], again[i])
    assert_samples_equal(ds[n + 5], ds.sample(1, 5))
    other_seed = make_dataset(corpus, seed=99)
    assert sum(not torch.equal(ds[i]["input_ids"], other_seed[i]["input_ids"]) for i in range(100)) > 95


def test_dataset_pickles_without_its_shards_for_spawned_workers(corpus):
    ds = make_dataset(corpus)
    ds.epoch_anchors(0)  # a cached epoch order is not shipped either
    blob = pickle.dumps(ds)
    assert len(blob) < 100_000 + ds.masking_vocab.is_special.nbytes + ds.masking_vocab.random_ids.nbytes
    clone = pickle.loads(blob)
    for i in (0, 3, len(ds) + 2):
        assert_samples_equal(clone[i], ds[i])


def test_masks_are_redrawn_every_epoch(corpus):
    ds = make_dataset(corpus)
    n = len(ds)
    # the same anchor in two epochs (found through the epoch orders) gets different masks
    order0, order1 = ds.epoch_anchors(0), ds.epoch_anchors(1)
    where1 = {int(a): j for j, a in enumerate(order1)}
    differ = sum(
        not torch.equal(ds.sample(0, j)["labels"] != IGNORE_INDEX, ds.sample(1, where1[int(order0[j])])["labels"] != IGNORE_INDEX)
        for j in range(200)
    )
    assert differ > 190
    assert sum(not torch.equal(ds[j]["labels"], ds[j + n]["labels"]) for j in range(200)) > 190


def test_ranks_read_disjoint_samples_that_cover_the_global_sequence():
    batches = 10
    for micro_batch_size, world_size, consumed in ((4, 2, 0), (3, 2, 48), (2, 8, 64)):
        seen = []
        for rank in range(world_size):
            sampler = iter(RankBatchSampler(micro_batch_size, rank, world_size, consumed))
            seen += [i for _ in range(batches) for i in next(sampler)]
        assert sorted(seen) == list(range(consumed, consumed + batches * micro_batch_size * world_size))


def test_a_resumed_loader_continues_exactly_where_the_uninterrupted_one_was(corpus):
    ds = make_dataset(corpus, num_samples=40)  # small epochs: the stream crosses several
    micro_batch_size, world_size, grad_accum = 4, 2, 2
    global_batch = micro_batch_size * world_size * grad_accum
    steps_done, compare = 3, 4
    for rank in range(world_size):
        full = iter(build_dataloader(ds, micro_batch_size, rank, world_size, 0, num_workers=0, seed=0))
        expected = [next(full) for _ in range(steps_done * grad_accum + compare)][-compare:]
        resumed = iter(build_dataloader(ds, micro_batch_size, rank, world_size, steps_done * global_batch, num_workers=0, seed=0))
        for want in expected:
            assert_samples_equal(next(resumed), want)


def test_worker_count_does_not_change_the_batches(corpus):
    ds = make_dataset(corpus, num_samples=50)
    loaders = [build_dataloader(ds, 8, rank=1, world_size=2, consumed_samples=16, num_workers=w, seed=0) for w in (0, 2)]
    streams = [iter(loader) for loader in loaders]
    for _ in range(8):  # crosses epochs (8 * 16 samples > 2 * 50)
        assert_samples_equal(next(streams[0]), next(streams[1]))


def test_finite_loader_serves_max_samples(corpus):
    ds = make_dataset(corpus)
    loader = build_dataloader(ds, 4, 0, 2, 0, 0, 0, max_samples=40)
    assert len(loader) == 5 and sum(b["input_ids"].shape[0] for b in loader) == 20


def test_bad_arguments_name_the_problem(tmp_path, corpus):
    with pytest.raises(ValueError, match="multiple of world_size"):
        RankBatchSampler(4, 0, 2, consumed_samples=3)
    with pytest.raises(ValueError, match="outside world_size"):
        RankBatchSampler(4, 2, 2, consumed_samples=0)
    with pytest.raises(ValueError, match="needs is_continuation"):
        make_dataset(corpus, whole_word_mask=True)
    lonely = write_corpus(tmp_path / "lonely", [1, 1, 1], [5, 5, 5])
    with pytest.raises(ValueError, match="no document has 2 or more sentences"):
        make_dataset(lonely)


# --- blending ---------------------------------------------------------------------------


def test_blend_schedule_keeps_every_prefix_close_to_the_weights():
    weights = np.array([0.5, 0.3, 0.2])
    dataset_index, sample_index = blend_schedule(weights, 3001)
    counts = np.cumsum(np.eye(3, dtype=np.int64)[dataset_index], axis=0)
    assert counts[-1].tolist() == [1501, 900, 600]  # largest remainder of 3001 * weights = [1500.5, 900.3, 600.2]
    prefix = np.arange(1, 3002)[:, None]
    assert np.abs(counts - prefix * weights).max() < 1.5
    for k in range(3):  # each shard's samples appear once each, in order
        assert sample_index[dataset_index == k].tolist() == list(range(counts[-1, k]))


def test_blended_samples_come_from_the_scheduled_shard(tmp_path):
    corpora = []
    for k in range(3):
        base = BASE if k == 0 else corpora[-1].end
        corpora.append(random_corpus(tmp_path / f"shard{k}", seed=k, base=base, num_docs=60 + 40 * k))
    ds = make_dataset(corpora, weights=[0.5, 0.3, 0.2], num_samples=1000)
    realised = np.bincount([ds.shard_of(i)[0] for i in range(1000)], minlength=3)
    assert realised.tolist() == [500, 300, 200]
    for i in range(0, 1500, 3):  # across the epoch boundary too
        k = ds.shard_of(i % 1000)[0]
        a, b, label = split(ds[i])
        seg_a, seg_b = corpora[k].trace(a), corpora[k].trace(b)  # trace raises if a token is not shard k's
        assert (seg_a.doc == seg_b.doc) == (label == NEXT_IS_CONTINUATION), (i, k, seg_a, seg_b, label)
    # a shard asked for more samples than it has anchors repeats them (new pairs and masks)
    heavy = make_dataset(corpora, weights=[0.8, 0.1, 0.1], num_samples=1000)
    assert np.bincount([heavy.shard_of(i)[0] for i in range(1000)]).tolist() == [800, 100, 100]
    assert len(set(heavy.epoch_anchors(0, shard=0).tolist())) < 800 / 2
    for i in range(0, 1000, 10):
        if heavy.shard_of(i)[0] == 0:
            corpora[0].trace(split(heavy[i])[0])
    # without weights, shards weigh by their number of anchors (= concatenation)
    plain = make_dataset(corpora)
    sizes = [make_dataset(c).num_samples for c in corpora]
    assert plain.num_samples == sum(sizes)
    assert np.bincount([plain.shard_of(i)[0] for i in range(plain.num_samples)]).tolist() == sizes
