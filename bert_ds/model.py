"""BERT for pretraining (MLM + NSP): transformers' BertForPreTraining, MLM head on masked positions only.

Model architecture only: no DeepSpeed, no torch.distributed here.

Why a subclass: ``BertForPreTraining`` projects every position through the MLM decoder
(hidden x vocab). For small and medium models that projection is most of the FLOPs
(about 70% for 4 layers, hidden 256, vocab 30,522, seq 128), yet only ~15% of positions
have a label. Like NVIDIA's BERT we gather the masked positions first and run the head on
those rows only. The modules (``self.bert``, ``self.cls``) and so the weight names are
untouched: a state dict saves and loads as a plain ``BertForPreTraining``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForPreTraining
from transformers.initialization import no_init_weights
from transformers.integrations import is_deepspeed_zero3_enabled

from bert_ds.config import ModelConfig
from bert_ds.data.masking import IGNORE_INDEX  # the labels' "not predicted" value, defined once

log = logging.getLogger(__name__)


@dataclass
class PretrainingOutput:
    """Summed losses for backward, plus counts for metrics (sums, so they add up across micro-batches and ranks).

    A trainer divides the sums by the whole global batch's counts (``bert_ds.trainer.train_step``), so a masked token
    or a pair weighs the same however the batch is split; ``loss`` is this batch's own mean, for use on its own.
    """

    mlm_loss_sum: torch.Tensor
    """Sum of the MLM cross-entropy over this batch's masked tokens (fp32, with grad)."""
    nsp_loss_sum: torch.Tensor
    """Sum of the NSP/SOP cross-entropy over this batch's pairs (fp32, with grad)."""
    mlm_correct: torch.Tensor
    mlm_count: torch.Tensor
    nsp_correct: torch.Tensor
    nsp_count: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        """This batch's MLM mean plus its NSP mean (with grad)."""
        return self.mlm_loss_sum / self.mlm_count.clamp(min=1) + self.nsp_loss_sum / self.nsp_count.clamp(min=1)

    @property
    def mlm_loss(self) -> torch.Tensor:
        return (self.mlm_loss_sum / self.mlm_count.clamp(min=1)).detach()

    @property
    def nsp_loss(self) -> torch.Tensor:
        return (self.nsp_loss_sum / self.nsp_count.clamp(min=1)).detach()


def block_diagonal_mask(pair_ids: torch.Tensor) -> torch.Tensor:
    """bool ``(batch, 1, seq, seq)``: position ``i`` may attend to ``j`` iff both belong to the same pair.

    Padding (pair id -1) forms a block of its own, so every query row has a key to attend to (an all-False row
    makes some SDPA kernels return NaN). e.g. pair ids ``[0, 0, 1, 1, 1, -1]`` -> blocks of 2, 3 and 1.
    """
    return (pair_ids[:, :, None] == pair_ids[:, None, :])[:, None]


class BertForPreTrainingSparse(BertForPreTraining):
    """Inputs are one pair per row (``attention_mask`` over the padding), or packed rows (``data.packing``:
    ``pair_ids``, ``position_ids`` and ``cls_positions`` too; ``next_sentence_label`` one per ``cls_positions``
    entry, -100 past the row's pairs), or MLM-only rows (no ``next_sentence_label``: no NSP head, no NSP loss)."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        next_sentence_label: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pair_ids: torch.Tensor | None = None,
        cls_positions: torch.Tensor | None = None,
    ) -> PretrainingOutput:
        if pair_ids is not None:
            # transformers' BertModel passes a 4-D mask through unchanged: SDPA takes it as bool (True = attend),
            # the eager kernel adds it, so it gets 0 / the dtype's minimum there
            attention_mask = block_diagonal_mask(pair_ids)
            if self.config._attn_implementation != "sdpa":
                attention_mask = torch.zeros(attention_mask.shape, dtype=self.dtype, device=pair_ids.device).masked_fill(
                    ~attention_mask, torch.finfo(self.dtype).min
                )
        sequence_output, pooled_output = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
            return_dict=False,
        )[:2]
        masked = labels != IGNORE_INDEX
        # boolean indexing: a device-to-host sync on GPU (the number of masked rows), paid once per micro-batch
        masked_hidden = sequence_output[masked]
        masked_labels = labels[masked]
        mlm_logits = self.cls.predictions(masked_hidden)
        # losses in fp32 whatever the compute dtype: log-softmax over 30k classes loses precision in bf16
        mlm_logits = mlm_logits.float()
        mlm_loss_sum = F.cross_entropy(mlm_logits, masked_labels, reduction="sum")  # 0 when nothing is masked
        zero = mlm_loss_sum.new_zeros(())
        nsp_loss_sum, nsp_correct, nsp_count = zero, zero.long(), zero.long()
        if next_sentence_label is not None:
            if cls_positions is not None:
                # every pair's [CLS] through the pooler (the stock pooler reads position 0 only)
                real = next_sentence_label != IGNORE_INDEX
                cls_hidden = sequence_output[torch.arange(labels.size(0), device=labels.device)[:, None].expand_as(cls_positions)[real],
                                             cls_positions[real]]
                pooled_output = self.bert.pooler.activation(self.bert.pooler.dense(cls_hidden))
                next_sentence_label = next_sentence_label[real]
            nsp_logits = self.cls.seq_relationship(pooled_output).float()
            nsp_loss_sum = F.cross_entropy(nsp_logits, next_sentence_label, reduction="sum")
            nsp_count = torch.tensor(next_sentence_label.numel(), device=labels.device)
            with torch.no_grad():
                nsp_correct = (nsp_logits.argmax(-1) == next_sentence_label).sum()
        with torch.no_grad():
            # argmax on the fp32 copy: on CPU a bf16 argmax over 30k classes costs ~5x more
            mlm_correct = (mlm_logits.argmax(-1) == masked_labels).sum()
        return PretrainingOutput(
            mlm_loss_sum=mlm_loss_sum,
            nsp_loss_sum=nsp_loss_sum,
            mlm_correct=mlm_correct,
            mlm_count=torch.tensor(masked_labels.numel(), device=labels.device),
            nsp_correct=nsp_correct,
            nsp_count=nsp_count,
        )


def build_bert_config(cfg: ModelConfig, vocab_size: int) -> BertConfig:
    if cfg.init_from:
        bert_config = BertConfig.from_pretrained(cfg.init_from)
        for key, value in cfg.overrides.items():
            setattr(bert_config, key, value)
    else:
        bert_config = BertConfig(vocab_size=vocab_size, **cfg.bert_kwargs())
    if bert_config.vocab_size != vocab_size:
        raise ValueError(
            f"model vocabulary size {bert_config.vocab_size} differs from the tokenizer's {vocab_size}"
            + (f" (model.init_from {cfg.init_from})" if cfg.init_from else "")
        )
    return bert_config


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> BertForPreTrainingSparse:
    """A fresh model from a preset, or one loaded from ``cfg.init_from`` (missing heads initialised and reported).

    Fresh weights are a function of ``seed`` alone, the same whether or not ZeRO-3 builds the model partitioned
    (``bert_ds.zero.partitioned_construction``): construction draws no random number (transformers'
    ``no_init_weights``), then BERT's initialisation runs module by module in one fixed order, on the whole model
    here, or under ZeRO-3 on each module's gathered parameters, drawn on rank 0 (transformers does that itself when
    it sees ZeRO-3 enabled). ``init_from`` weights likewise go straight into partitions under ZeRO-3.
    """
    bert_config = build_bert_config(cfg, vocab_size)
    torch.manual_seed(seed)
    if cfg.init_from:
        model, info = BertForPreTrainingSparse.from_pretrained(
            cfg.init_from, config=bert_config, attn_implementation=cfg.attn_implementation, output_loading_info=True
        )
        if info["missing_keys"]:
            log.warning("initialised %d tensors missing from %s: %s", len(info["missing_keys"]), cfg.init_from, _summarize(info["missing_keys"]))
        if info["unexpected_keys"]:
            log.warning("ignored %d tensors of %s: %s", len(info["unexpected_keys"]), cfg.init_from, _summarize(info["unexpected_keys"]))
    elif is_deepspeed_zero3_enabled():
        model = BertForPreTrainingSparse._from_config(bert_config, attn_implementation=cfg.attn_implementation)
    else:
        with no_init_weights():
            model = BertForPreTrainingSparse._from_config(bert_config, attn_implementation=cfg.attn_implementation)
        model.init_weights()  # initialise, then tie the decoder to the word embeddings
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def freeze_nsp_head(model: BertForPreTrainingSparse) -> None:
    """MLM-only training (``data.nsp_mode: none``): the pooler and the NSP head get no gradient and no optimizer state."""
    for module in (model.bert.pooler, model.cls.seq_relationship):
        if module is not None:
            module.requires_grad_(False)


def _summarize(keys, limit: int = 6) -> str:
    keys = sorted(keys)  # transformers 5 reports sets
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")


def training_flops(config: BertConfig, seq_length: int, num_samples: float, num_masked: float) -> float:
    """Model FLOPs of training ``num_samples`` samples with ``num_masked`` predicted tokens in all (fwd + bwd = 3x fwd).

    Counts matmuls only (2 FLOPs per multiply-add): per token and layer the QKV/output
    projections (4 h^2), the MLP (2 h i) and attention scores and values (2 s h); the pooler
    and NSP head per sample; the MLM head's transform (h^2) and decoder (h v) per masked token.
    """
    # every sample one pair of seq_length tokens: the useful-work count with nothing left out
    return useful_training_flops(config, num_samples * seq_length, num_samples * seq_length**2, num_samples, num_masked)


def useful_training_flops(config: BertConfig, tokens: float, squared_lengths: float, pairs: float, num_masked: float) -> float:
    """Model FLOPs of training on ``tokens`` non-padding tokens (fwd + bwd = 3x fwd): what MFU counts, packed or not.

    As :func:`training_flops` but only for useful work: the per-token matmuls on real tokens, attention on each
    pair's own tokens (``squared_lengths`` = the sum of each pair's length squared), the pooler and NSP head once
    per pair (``pairs``; 0 for MLM-only rows) and the MLM head per masked token. Padding and the attention a block
    mask discards are not counted. For one unpadded pair of ``s`` tokens it equals ``training_flops``.
    """
    h, i, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    per_token = layers * (4 * h * h + 2 * h * i)
    return 3 * 2 * (tokens * per_token + squared_lengths * layers * 2 * h + pairs * (h * h + 2 * h) + num_masked * (h * h + h * v))


def training_flops_per_sample(config: BertConfig, seq_length: int, masked_per_sample: float) -> float:
    return training_flops(config, seq_length, 1, masked_per_sample)
