"""Statistics of bert_ds.data.masking over many synthetic sequences (tolerances are 4 binomial sigmas)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from bert_ds.data.masking import IGNORE_INDEX, MaskingVocab, continuation_table, mask_tokens

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB_SIZE = 2000
FIRST_CONTINUATION = 1000  # ids >= 1000 are "##" pieces
SEQ_LEN = 128
VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + [f"w{i}" for i in range(5, FIRST_CONTINUATION)]
    + [f"##p{i}" for i in range(FIRST_CONTINUATION, VOCAB_SIZE)]
)


def four_sigma(p: float, n: int) -> float:
    return 4 * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def vocab() -> MaskingVocab:
    return MaskingVocab.build(VOCAB_SIZE, MASK, [PAD, UNK, CLS, SEP], continuation_table(VOCAB))


def random_pieces(rng: np.random.Generator, num_tokens: int) -> np.ndarray:
    """Word heads and ## pieces (a head ~55% of the time, so words have ~1.8 pieces), with some [UNK]."""
    heads = rng.integers(5, FIRST_CONTINUATION, size=num_tokens)
    pieces = rng.integers(FIRST_CONTINUATION, VOCAB_SIZE, size=num_tokens)
    out = np.where(rng.random(num_tokens) < 0.55, heads, pieces)
    out[rng.random(num_tokens) < 0.03] = UNK
    return out


@functools.cache
def make_sequences(num: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """[CLS] A [SEP] B [SEP] [PAD]...; A or B may start with a ## piece (a truncated word)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(num):
        len_a = int(rng.integers(1, 70))
        len_b = int(rng.integers(1, SEQ_LEN - 3 - len_a + 1))
        seq = np.full(SEQ_LEN, PAD, dtype=np.int64)
        seq[0], seq[1 + len_a], seq[2 + len_a + len_b] = CLS, SEP, SEP
        seq[1 : 1 + len_a] = random_pieces(rng, len_a)
        seq[2 + len_a : 2 + len_a + len_b] = random_pieces(rng, len_b)
        seq.flags.writeable = False  # shared by tests through the cache
        seqs.append(seq)
    return tuple(seqs)


def run(seqs, vocab, *, rate, cap=SEQ_LEN, whole_word=False, seed=1):
    rng = np.random.default_rng(seed)
    return [mask_tokens(s, vocab, rng, mask_prob=rate, max_predictions=cap, whole_word=whole_word) for s in seqs]


def num_candidates(seq: np.ndarray) -> int:
    return int((seq > MASK).sum())  # ids 0-4 are the special tokens


def test_continuation_table_marks_only_double_hash_pieces():
    table = continuation_table({"[CLS]": 0, "run": 1, "##ning": 2, "#": 3})
    assert table.tolist() == [False, False, True, False]
    assert continuation_table(VOCAB).sum() == VOCAB_SIZE - FIRST_CONTINUATION


@pytest.mark.parametrize("rate", [0.15, 0.30])
def test_each_sequence_masks_round_rate_times_candidates(vocab, rate):
    seqs = make_sequences(2000)
    out = run(seqs, vocab, rate=rate)
    counts = np.array([(labels != IGNORE_INDEX).sum() for _, labels in out])
    expected = np.array([max(1, math.floor(num_candidates(s) * rate + 0.5)) for s in seqs])
    np.testing.assert_array_equal(counts, expected)
    share = counts.sum() / sum(num_candidates(s) for s in seqs)
    assert abs(share - rate) < 0.005, share


@pytest.mark.parametrize("rate", [0.15, 0.30])
def test_replacement_split_is_80_10_10_and_never_special(vocab, rate):
    seqs = make_sequences(3000)
    out = run(seqs, vocab, rate=rate)
    orig = np.concatenate([s[labels != IGNORE_INDEX] for s, (_, labels) in zip(seqs, out, strict=True)])
    new = np.concatenate([m[labels != IGNORE_INDEX] for m, labels in out])
    labels = np.concatenate([labels[labels != IGNORE_INDEX] for _, labels in out])
    np.testing.assert_array_equal(labels, orig)
    n = orig.size
    as_mask = (new == MASK).mean()
    kept = (new == orig).mean()
    replaced = ((new != MASK) & (new != orig)).mean()
    assert abs(as_mask - 0.8) < four_sigma(0.8, n), as_mask
    assert abs(kept - 0.1) < four_sigma(0.1, n), kept
    assert abs(replaced - 0.1) < four_sigma(0.1, n), replaced
    assert not np.isin(new[new != MASK], [PAD, UNK, CLS, SEP]).any()  # random tokens are never special


def test_special_tokens_and_padding_are_never_masked(vocab):
    seqs = make_sequences(1000)
    for whole_word in (False, True):
        for s, (masked, labels) in zip(seqs, run(seqs, vocab, rate=0.3, whole_word=whole_word), strict=True):
            special = np.isin(s, [PAD, UNK, CLS, SEP])
            assert (labels[special] == IGNORE_INDEX).all()
            np.testing.assert_array_equal(masked[special], s[special])
            np.testing.assert_array_equal(masked[labels == IGNORE_INDEX], s[labels == IGNORE_INDEX])


def words_of(seq: np.ndarray) -> list[list[int]]:
    """Reference word segmentation (a word never spans a special token)."""
    words: list[list[int]] = []
    prev_candidate = False
    for i, t in enumerate(seq.tolist()):
        candidate = t not in (PAD, UNK, CLS, SEP, MASK)
        if candidate and t >= FIRST_CONTINUATION and prev_candidate:
            words[-1].append(i)
        elif candidate:
            words.append([i])
        prev_candidate = candidate
    return words


@pytest.mark.parametrize("rate", [0.15, 0.30])
def test_whole_word_masking_masks_words_entirely(vocab, rate):
    seqs = make_sequences(1000)
    out = run(seqs, vocab, rate=rate, whole_word=True)
    masked_total = candidates_total = partial_words = continuation_masked = 0
    for s, (_, labels) in zip(seqs, out, strict=True):
        chosen = labels != IGNORE_INDEX
        for word in words_of(s):
            flags = chosen[word]
            partial_words += int(flags.any() and not flags.all())
            continuation_masked += int(flags[1:].sum())
        budget = max(1, math.floor(num_candidates(s) * rate + 0.5))
        assert chosen.sum() <= budget
        masked_total += int(chosen.sum())
        candidates_total += num_candidates(s)
    assert partial_words == 0
    assert continuation_masked > 1000  # the check above was not vacuous
    # the greedy fill keeps the share on target even though words have 1-3 pieces
    assert abs(masked_total / candidates_total - rate) < 0.005


def test_whole_word_masking_starts_a_new_word_after_a_special_token(vocab):
    # [CLS] w5 ##p1000 [SEP] ##p1001 w6 [SEP]: "##p1001" must not join "w5 ##p1000" across [SEP]
    seq = np.array([CLS, 5, 1000, SEP, 1001, 6, SEP, PAD], dtype=np.int64)
    seen = set()
    for seed in range(200):
        _, labels = mask_tokens(seq, vocab, np.random.default_rng(seed), mask_prob=0.5, max_predictions=10, whole_word=True)
        seen.add(tuple(np.flatnonzero(labels != IGNORE_INDEX).tolist()))
    # budget 2: the 2-piece word, or both 1-piece words (the scan skips a word that no longer fits)
    assert seen == {(1, 2), (4, 5)}
    assert words_of(seq) == [[1, 2], [4], [5]]


@pytest.mark.parametrize("whole_word", [False, True])
def test_max_predictions_caps_the_number_of_targets(vocab, whole_word):
    seqs = make_sequences(1000)
    counts = [(labels != IGNORE_INDEX).sum() for _, labels in run(seqs, vocab, rate=0.3, cap=10, whole_word=whole_word)]
    assert max(counts) <= 10
    expected = [min(10, max(1, math.floor(num_candidates(s) * 0.3 + 0.5))) for s in seqs]
    if not whole_word:
        assert counts == expected
    else:  # words must fit the budget whole, so the cap is met almost always but never exceeded
        assert np.mean(np.array(counts) == np.array(expected)) > 0.95


def test_masking_is_a_pure_function_of_the_generator(vocab):
    seq = make_sequences(1)[0]
    before = seq.copy()
    a = mask_tokens(seq, vocab, np.random.default_rng(7), mask_prob=0.15, max_predictions=20, whole_word=True)
    b = mask_tokens(seq, vocab, np.random.default_rng(7), mask_prob=0.15, max_predictions=20, whole_word=True)
    np.testing.assert_array_equal(seq, before)  # input untouched
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_sequence_without_candidates_has_no_targets(vocab):
    seq = np.array([CLS, SEP, SEP, PAD], dtype=np.int64)
    masked, labels = mask_tokens(seq, vocab, np.random.default_rng(0), mask_prob=0.15, max_predictions=5)
    np.testing.assert_array_equal(masked, seq)
    assert (labels == IGNORE_INDEX).all()


def test_bad_vocabulary_tables_are_rejected():
    with pytest.raises(ValueError, match="special token ids"):
        MaskingVocab.build(10, 4, [10])
    with pytest.raises(ValueError, match="is_continuation has shape"):
        MaskingVocab.build(10, 4, [0], np.zeros(9, dtype=bool))
    with pytest.raises(ValueError, match="whole-word masking needs"):
        mask_tokens(
            np.arange(5, 9), MaskingVocab.build(10, 4, [0]), np.random.default_rng(0), mask_prob=0.5, max_predictions=2, whole_word=True
        )
