"""The model: the masked-rows-only MLM head computes what transformers' BertForPreTraining computes, and the
FLOP count behind MFU is what torch's own counter measures."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForPreTraining

from bert_ds.data.masking import IGNORE_INDEX
from bert_ds.model import BertForPreTrainingSparse, training_flops

SEQ, BATCH = 32, 4


def tiny_config(attn: str = "eager") -> BertConfig:
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64)  # fmt: skip
    config._attn_implementation = attn
    return config


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 300, (BATCH, SEQ), generator=g)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    attention_mask[1, 20:] = 0  # some padding
    token_type_ids = (torch.arange(SEQ) >= SEQ // 2).long().expand(BATCH, SEQ).clone()
    labels = torch.full((BATCH, SEQ), IGNORE_INDEX)
    picked = torch.rand(BATCH, SEQ, generator=g) < 0.15
    picked[1, 20:] = False
    labels[picked] = torch.randint(5, 300, (int(picked.sum()),), generator=g)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask, "labels": labels,
            "next_sentence_label": torch.tensor([0, 1, 1, 0])}  # fmt: skip


def test_the_masked_rows_only_head_gives_transformers_loss_and_gradients():
    torch.manual_seed(0)
    ours = BertForPreTrainingSparse(tiny_config())
    reference = BertForPreTraining(tiny_config())
    reference.load_state_dict(ours.state_dict())
    b = batch()
    out = ours(**b)
    ref = reference(**b)  # labels and next_sentence_label: transformers' own MLM + NSP loss over all positions
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref_grads = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    assert int(out.mlm_count) == int((b["labels"] != IGNORE_INDEX).sum()) > 0


def test_training_flops_equal_torchs_flop_counter():
    """Forward and backward of one batch, counted by torch.utils.flop_counter, equal training_flops (3x the forward's
    matmuls; recomputation under activation checkpointing is not useful work and is never counted).

    Eager attention: it runs the attention products as bmm, which the counter counts; the counter has no formula for
    torch's CPU SDPA kernel (it counts that attention as 0 FLOPs), though SDPA does the same products.
    """
    model = BertForPreTrainingSparse(tiny_config("eager"))
    b = batch()
    with FlopCounterMode(display=False) as counter:
        model(**b).loss.backward()
    masked = int((b["labels"] != IGNORE_INDEX).sum())
    assert counter.get_total_flops() == training_flops(model.config, SEQ, BATCH, masked)
