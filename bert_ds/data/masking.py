"""Dynamic MLM masking (BERT's 80/10/10 rule, optional whole-word masking) as a pure function.

The rules follow Google's ``create_pretraining_data.py``, vectorised with numpy:

* candidates are all positions whose token is not special. Special means [CLS], [SEP],
  [PAD], [MASK] and, when the caller passes it, [UNK]: predicting [UNK] teaches nothing
  (HF's ``DataCollatorForLanguageModeling`` excludes it too; Google's script does not).
* ``num_to_predict = min(max_predictions, max(1, round(num_candidates * mask_prob)))``,
  rounding half up.
* words are drawn in random order and taken greedily while they fit the budget (a word
  that would overflow it is skipped, the scan goes on), exactly as Google's loop does; a
  word is a single token unless whole-word masking joins WordPiece ``##`` pieces to it, and,
  for Chinese, the characters a segmenter put in one word (``word_continues``, from the
  shard's ``.words``; ``bert_ds.data.word_boundaries``). A word's length is its maskable
  tokens: an [UNK] character inside a Chinese word is never predicted but does not split it.
* each chosen position independently becomes [MASK] (80%), a random non-special token
  (10%) or stays unchanged (10%): per token, also inside a whole word, as Google's
  whole-word masking and HFL's Chinese-BERT-wwm do (and as this code did before Chinese words).
* labels are the original ids at chosen positions and ``-100`` elsewhere (the ignore index
  of ``transformers``' ``BertForPreTraining``).

Randomness comes only from the ``numpy.random.Generator`` argument, so a sample's masks
are a function of how the caller seeds it (the dataset uses ``(seed, epoch, sample)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
"""Label of positions that are not predicted (``torch.nn.CrossEntropyLoss`` default)."""

# the 80/10/10 rule as cumulative thresholds on one uniform draw per masked position
_MASK_TOKEN_SHARE = 0.8
_KEEP_TOKEN_SHARE_END = 0.9


def continuation_table(vocab: Mapping[str, int] | Sequence[str], vocab_size: int | None = None) -> np.ndarray:
    """``is_continuation[id]`` is True for WordPiece continuation pieces (``"##..."``).

    Args:
        vocab: token -> id mapping (e.g. ``tokenizer.get_vocab()``) or the tokens in id order.
        vocab_size: table length; defaults to the largest id + 1.
    """
    pairs = vocab.items() if isinstance(vocab, Mapping) else ((tok, i) for i, tok in enumerate(vocab))
    continuation_ids = [i for tok, i in pairs if tok.startswith("##")]
    size = vocab_size if vocab_size is not None else (max(vocab.values()) + 1 if isinstance(vocab, Mapping) else len(vocab))
    table = np.zeros(size, dtype=bool)
    table[np.asarray(continuation_ids, dtype=np.int64)] = True
    return table


@dataclass(frozen=True)
class MaskingVocab:
    """Lookup tables derived once from the vocabulary; build with :meth:`build`."""

    mask_id: int
    """Id of [MASK]."""
    is_special: np.ndarray
    """bool[vocab_size]: never masked, never used as a random replacement."""
    random_ids: np.ndarray
    """int64 ids a masked token may be replaced with (all non-special ids)."""
    is_continuation: np.ndarray | None
    """bool[vocab_size] marking ``##`` pieces; only whole-word masking reads it."""

    @classmethod
    def build(
        cls,
        vocab_size: int,
        mask_id: int,
        special_ids: Iterable[int],
        is_continuation: np.ndarray | None = None,
    ) -> MaskingVocab:
        """Derive the tables.

        Args:
            vocab_size: number of token ids.
            mask_id: id of [MASK] (always treated as special).
            special_ids: ids never to mask ([CLS], [SEP], [PAD], [UNK], ...).
            is_continuation: optional bool[vocab_size] from :func:`continuation_table`.
        """
        is_special = np.zeros(vocab_size, dtype=bool)
        special = np.asarray([*special_ids, mask_id], dtype=np.int64)
        if special.size and (special.min() < 0 or special.max() >= vocab_size):
            raise ValueError(f"special token ids {sorted(set(special.tolist()))} must lie in [0, vocab_size={vocab_size})")
        is_special[special] = True
        random_ids = np.flatnonzero(~is_special).astype(np.int64)
        if random_ids.size == 0:
            raise ValueError("the vocabulary has no non-special token to mask or to use as a random replacement")
        if is_continuation is not None:
            is_continuation = np.asarray(is_continuation, dtype=bool)
            if is_continuation.shape != (vocab_size,):
                raise ValueError(
                    f"is_continuation has shape {is_continuation.shape}, expected ({vocab_size},) (one flag per vocabulary id)"
                )
        return cls(mask_id=int(mask_id), is_special=is_special, random_ids=random_ids, is_continuation=is_continuation)


def mask_tokens(
    input_ids: np.ndarray,
    vocab: MaskingVocab,
    rng: np.random.Generator,
    *,
    mask_prob: float,
    max_predictions: int,
    whole_word: bool = False,
    word_continues: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose MLM targets in one sequence and corrupt them; the input is not modified.

    Args:
        input_ids: int array (seq_len,), special tokens and padding included.
        vocab: lookup tables from :meth:`MaskingVocab.build`.
        rng: the only source of randomness.
        mask_prob: share of candidate tokens to predict (0.15 for BERT, 0.30 for Mosaic BERT).
        max_predictions: cap on predicted positions per sequence.
        whole_word: mask every ``##`` piece together with the word it continues.
        word_continues: optional bool (seq_len,): True where the token continues the segmented
            (Chinese) word of the token before it; only read with ``whole_word``. Must be False on
            [CLS], [SEP] and [PAD], so a word never spans them.

    Returns:
        ``(masked_ids, labels)``, both int64 (seq_len,); labels are -100 where not predicted.
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
    masked = input_ids.copy()
    candidate = ~vocab.is_special[input_ids]
    cand_pos = np.flatnonzero(candidate)
    num_candidates = cand_pos.size
    if num_candidates == 0:
        return masked, labels
    num_to_predict = min(max_predictions, max(1, int(num_candidates * mask_prob + 0.5)))

    if whole_word:
        if vocab.is_continuation is None:
            raise ValueError("whole-word masking needs MaskingVocab.is_continuation (build it with continuation_table)")
        # A word starts at every candidate that is not a ## piece, and at a ## piece whose left
        # neighbour is not a candidate (truncation or [SEP] cut its head off), so words never
        # span a special token; Megatron's loop would glue such a piece to the previous segment.
        # e.g. [cls, the, ##re, ##fore, sep, ##s, a, sep, pad]
        #   candidate  [0, 1, 1, 1, 0, 1, 1, 0, 0]
        #   word start [0, 1, 0, 0, 0, 1, 1, 0, 0]  -> words [1, 2, 3], [5], [6]
        prev_candidate = np.concatenate(([False], candidate[:-1]))
        if word_continues is None:
            starts = ~(vocab.is_continuation[input_ids[cand_pos]] & prev_candidate[cand_pos])
        else:
            # Chinese words link every position, [UNK] included, so a word restarts only where its
            # segmenter said; words are then the runs of one link number among the candidates.
            # e.g. [cls, 中, 国, [UNK], 人, sep, 民, sep] with word_continues [0, 0, 1, 0, 1, 0, 1, 0]
            #   link number [1, 2, 2, 3, 3, 4, 4, 5] -> candidate words [1, 2], [4], [6]
            # ([UNK] started a word: 人 joins it, not 国; 民 joins [SEP]'s number, so no word crosses it)
            link = (vocab.is_continuation[input_ids] & prev_candidate) | np.asarray(word_continues, dtype=bool)
            number = np.cumsum(~link)[cand_pos]
            starts = np.concatenate(([True], number[1:] != number[:-1]))
        word_of = np.cumsum(starts) - 1  # word number of each candidate
        word_len = np.diff(np.append(np.flatnonzero(starts), num_candidates))
        chosen = np.zeros(word_len.size, dtype=bool)
        chosen[_greedy_pick(word_len, num_to_predict, rng)] = True
        positions = cand_pos[chosen[word_of]]
    else:
        # every word is one token, so the greedy scan is just the first num_to_predict of a shuffle
        positions = cand_pos[rng.permutation(num_candidates)[:num_to_predict]]

    labels[positions] = input_ids[positions]
    u = rng.random(positions.size)
    masked[positions[u < _MASK_TOKEN_SHARE]] = vocab.mask_id
    replace = positions[u >= _KEEP_TOKEN_SHARE_END]
    masked[replace] = vocab.random_ids[rng.integers(0, vocab.random_ids.size, size=replace.size)]
    return masked, labels


def _greedy_pick(word_len: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Words (indices) Google's loop takes: scan a random order, take each word that still fits.

    The prefix that fits is found with one cumsum; only the small leftover budget is filled by
    a loop, which runs at most ``budget - prefix_total`` times (each pass takes >= 1 token).
    """
    order = rng.permutation(word_len.size)
    lengths = word_len[order]
    total = np.cumsum(lengths)
    num_prefix = int(np.searchsorted(total, budget, side="right"))
    taken = [order[:num_prefix]]
    left = budget - (int(total[num_prefix - 1]) if num_prefix else 0)
    pos = num_prefix + 1  # the word at num_prefix did not fit
    while left > 0 and pos < lengths.size:
        fits = np.flatnonzero(lengths[pos:] <= left)
        if fits.size == 0:
            break
        pos += int(fits[0])
        taken.append(order[pos : pos + 1])
        left -= int(lengths[pos])
        pos += 1
    return np.concatenate(taken)
