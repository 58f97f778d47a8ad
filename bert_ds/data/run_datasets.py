"""A run's datasets from its config: the training rows (pairs, packed pairs or MLM-only rows) and the fixed
evaluation set. The one place the ``data`` section becomes datasets, for the trainer, ``bert_ds.evaluate`` and the benches.
"""

from __future__ import annotations

from collections.abc import Sequence

from bert_ds.config import ConfigError, RunConfig
from bert_ds.data import word_boundaries
from bert_ds.data.masking import continuation_table
from bert_ds.data.packing import PackedPretrainingDataset
from bert_ds.data.pretraining import PretrainingDataset
from bert_ds.data.vocab import Vocab


def _run_dataset(cfg: RunConfig, vocab: Vocab, prefixes: Sequence[str], mask_prob: float, weights=None, num_samples: int | None = None) -> PretrainingDataset:
    data = cfg.data
    try:
        return PretrainingDataset(
            prefixes, vocab_size=vocab.size, cls_id=vocab.cls_id, sep_id=vocab.sep_id, pad_id=vocab.pad_id, mask_id=vocab.mask_id,
            unk_id=vocab.unk_id, max_seq_length=data.max_seq_length, max_predictions_per_seq=data.max_predictions(mask_prob),
            seed=cfg.seed, weights=weights, is_continuation=continuation_table(vocab.tokens),
            is_cjk_token=word_boundaries.cjk_token_table(vocab.tokens) if data.whole_word_mask else None, short_seq_prob=data.short_seq_prob,
            mask_prob=mask_prob, whole_word_mask=data.whole_word_mask, nsp_mode=data.nsp_mode, num_samples=num_samples,
        )
    except word_boundaries.WordBoundaryError as e:  # the shards do not fit data.whole_word_mask: a setting to fix, not a crash
        raise ConfigError(str(e)) from None


def train_dataset(cfg: RunConfig, vocab: Vocab) -> PretrainingDataset | PackedPretrainingDataset:
    """A run's training rows: its ``data`` section over ``data.train_prefix`` (blended by ``data.train_weights``),
    pairs packed into rows with ``data.packing`` (MLM-only rows, ``data.nsp_mode: none``, are packed by construction)."""
    pairs = _run_dataset(cfg, vocab, cfg.data.train_prefix, cfg.data.mask_prob, weights=cfg.data.train_weights or None)
    return PackedPretrainingDataset(pairs) if cfg.data.packing and cfg.data.nsp_mode != "none" else pairs


def eval_dataset(cfg: RunConfig, vocab: Vocab) -> PretrainingDataset | None:
    """A run's fixed evaluation set (None without ``data.valid_prefix``).

    Epoch 0 of a dataset whose epoch is exactly ``eval.num_samples`` samples of ``data.valid_prefix``,
    masked at ``eval.mask_prob``: the same pairs and masks at every evaluation, in training and for
    ``bert_ds.evaluate`` on the checkpoint or its export. Pairs are never packed here (``data.packing`` only packs
    training rows), so a packed and an unpacked run are scored on the same set.
    """
    if not cfg.data.valid_prefix:
        return None
    return _run_dataset(cfg, vocab, [cfg.data.valid_prefix], cfg.eval.mask_prob, num_samples=cfg.eval.num_samples)


__all__ = ["eval_dataset", "train_dataset"]
