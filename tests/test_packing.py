"""Packed pretraining rows (``data.packing``) and MLM-only rows (``data.nsp_mode: none``): the rows themselves, and
the model on them (no cross-talk between the pairs of a row).

The corpora are the unique-token shards of ``test_pretraining_data``: every token id traces back to its place.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig

from bert_ds.data.loader import build_dataloader
from bert_ds.data.masking import IGNORE_INDEX
from bert_ds.data.packing import PackedPretrainingDataset, first_fit_decreasing
from bert_ds.model import BertForPreTrainingSparse, block_diagonal_mask, training_flops, useful_training_flops
from tests.test_pretraining_data import CLS, PAD, SEP, SEQ, Corpus, make_dataset, random_corpus, write_corpus


def short_document_corpus(prefix, seed: int = 3, num_docs: int = 400) -> Corpus:
    """Documents of 2-4 sentences of 3-20 tokens: the shape of reviews, posts and tickets (mostly padding unpacked)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, 5, size=num_docs)
    return write_corpus(prefix, counts, rng.integers(3, 21, size=int(counts.sum())))


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory) -> Corpus:
    return short_document_corpus(tmp_path_factory.mktemp("short") / "reviews")


@pytest.fixture(scope="module")
def long_docs(tmp_path_factory) -> Corpus:
    return random_corpus(tmp_path_factory.mktemp("long") / "wiki", seed=0)


def packed(corpus: Corpus, **overrides) -> PackedPretrainingDataset:
    window = overrides.pop("window", 64)
    return PackedPretrainingDataset(make_dataset(corpus, **overrides), window=window)


def padding(rows) -> float:
    return 1 - sum(int(r["attention_mask"].sum()) for r in rows) / (len(rows) * SEQ)


# --- the rows -----------------------------------------------------------------------------


def test_first_fit_decreasing_follows_the_worked_example():
    assert first_fit_decreasing(np.array([60, 70, 20, 40, 50]), 128) == [[1, 4], [0, 3, 2]]


@pytest.mark.parametrize("nsp_mode", ["nsp", "sop"])
def test_a_packed_row_holds_its_pairs_exactly_as_they_are_alone(short_docs, nsp_mode):
    ds = packed(short_docs, nsp_mode=nsp_mode)
    assert {int(ds.pairs.sample(0, j)["next_sentence_label"]) for j in range(40)} == {0, 1}
    for index in range(0, len(ds), 7):
        epoch, row_number = ds.locate(index)
        row = ds[index]
        pairs = ds.pairs_of_row(epoch, row_number)
        assert len(pairs) >= 1
        position = 0
        for p, j in enumerate(pairs):
            alone = ds.pairs.sample(epoch, j)
            n = int(alone["attention_mask"].sum())
            span = slice(position, position + n)
            for key in ("input_ids", "token_type_ids", "labels"):  # the same tokens, types and masks
                assert torch.equal(row[key][span], alone[key][:n]), (index, p, key)
            assert row["position_ids"][span].tolist() == list(range(n))
            assert (row["pair_ids"][span] == p).all() and int(row["cls_positions"][p]) == position
            assert int(row["next_sentence_label"][p]) == int(alone["next_sentence_label"])
            assert int(row["input_ids"][position]) == CLS and int(row["input_ids"][position + n - 1]) == SEP
            position += n
        assert position <= SEQ
        assert (row["pair_ids"][position:] == -1).all() and (row["input_ids"][position:] == PAD).all()
        assert (row["attention_mask"][:position] == 1).all() and (row["attention_mask"][position:] == 0).all()
        assert (row["next_sentence_label"][len(pairs):] == IGNORE_INDEX).all()


@pytest.mark.parametrize("epoch", [0, 1])
def test_every_pair_of_an_epoch_is_packed_exactly_once(short_docs, epoch):
    ds = packed(short_docs)
    order, row_starts = ds.plan(epoch)
    assert sorted(order.tolist()) == list(range(ds.pairs.num_samples))
    lengths = np.array([ds.pairs.pair_length(epoch, j) for j in order.tolist()])
    per_row = np.add.reduceat(lengths, row_starts[:-1])
    assert per_row.max() <= SEQ and len(per_row) == ds.rows_in_epoch(epoch)
    # a row's pairs come from one window of consecutive pair indices
    for r in range(len(per_row)):
        pairs = order[row_starts[r] : row_starts[r + 1]]
        assert len(set((pairs // ds.window).tolist())) == 1


def test_a_windows_rows_are_shuffled_not_longest_first(short_docs):
    ds = packed(short_docs, window=256)
    order, row_starts = ds.plan(0)
    rows = ds.rows_in_epoch(0)
    longest = [max(ds.pairs.pair_length(0, j) for j in order[row_starts[r] : row_starts[r + 1]].tolist()) for r in range(rows)]
    in_window = [i for i in range(rows) if order[row_starts[i]] < 256]  # the first window's rows
    lengths = [longest[i] for i in in_window]
    quarter = len(lengths) // 4
    # first-fit decreasing opens its rows longest pair first; after the shuffle the first and last quarter look alike
    assert abs(np.mean(lengths[:quarter]) - np.mean(lengths[-quarter:])) < 0.5 * np.std(lengths), lengths


def test_rows_are_a_function_of_the_seed_and_a_fresh_dataset_builds_the_same(short_docs):
    a, b = packed(short_docs), packed(short_docs)
    other = packed(short_docs, seed=99)
    index = a.rows_in_epoch(0) + 3  # epoch 1
    for i in (0, 5, index):
        assert all(torch.equal(a[i][k], b[i][k]) for k in a[i])
    assert any(not torch.equal(a[i]["input_ids"], other[i]["input_ids"]) for i in range(5))
    # different epochs pack different pairs together
    assert a.pairs_of_row(0, 0) != a.pairs_of_row(1, 0) or not np.array_equal(a.plan(0)[0], a.plan(1)[0])


def test_ranks_read_disjoint_rows_and_a_resumed_loader_continues_exactly(short_docs):
    ds = packed(short_docs)
    world, micro, steps = 2, 4, 6
    seen = {}
    for rank in range(world):
        loader = build_dataloader(ds, micro, rank, world, consumed_samples=0, num_workers=0, seed=0, max_samples=world * micro * steps)
        seen[rank] = [b for b in loader]
    keys = [tuple(r.tolist()) for rank in seen for b in seen[rank] for r in b["input_ids"]]
    assert len(keys) == world * micro * steps and len(set(keys)) == len(keys)  # disjoint rows, no pair twice
    # resume after 4 steps: each rank gets exactly the batches it would have had next (epoch 0 crossed into 1 or not)
    for rank in range(world):
        resumed = build_dataloader(ds, micro, rank, world, consumed_samples=world * micro * 4, num_workers=0, seed=0,
                                   max_samples=world * micro * 2)
        for got, want in zip(resumed, seen[rank][4:], strict=True):
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_across_an_epoch_boundary_is_exact(short_docs):
    ds = packed(short_docs)
    n0 = ds.rows_in_epoch(0)
    fresh = packed(short_docs)  # a resumed process: nothing cached
    for i in (n0 - 1, n0, n0 + ds.rows_in_epoch(1) + 2):
        assert all(torch.equal(ds[i][k], fresh[i][k]) for k in ds[i])
    assert ds.locate(n0) == (1, 0)


def test_packing_removes_the_padding_of_short_documents(short_docs, long_docs):
    for corpus, unpacked_at_least in ((short_docs, 0.5), (long_docs, 0.0)):
        ds = packed(corpus, window=256)
        rows = [ds[i] for i in range(len(ds))]
        pairs = [ds.pairs[i] for i in range(ds.pairs.num_samples)]
        assert padding(pairs) > unpacked_at_least
        assert padding(rows) < 0.05, (corpus.prefix, padding(rows), padding(pairs))
        assert len(rows) < len(pairs)


def test_workers_build_the_same_rows(short_docs):
    ds = packed(short_docs)
    kwargs = dict(micro_batch_size=4, rank=0, world_size=1, consumed_samples=8, seed=0, max_samples=12)
    a = list(build_dataloader(ds, num_workers=0, **kwargs))
    b = list(build_dataloader(ds, num_workers=1, **kwargs))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


# --- MLM-only rows --------------------------------------------------------------------------


def test_mlm_only_rows_are_the_documents_in_order_with_a_sep_between_two(short_docs):
    ds = make_dataset(short_docs, nsp_mode="none")
    order = ds.epoch_anchors(0)
    assert sorted(order.tolist()) == list(range(len(ds)))
    stream = []
    for block in range(len(ds)):
        row = ds.sample(0, int(np.flatnonzero(order == block)[0]))
        assert "next_sentence_label" not in row and (row["token_type_ids"] == 0).all()
        labels, ids = row["labels"].numpy(), row["input_ids"].numpy()
        ids = np.where(labels != IGNORE_INDEX, labels, ids)[: int(row["attention_mask"].sum())]
        assert ids[0] == CLS and ids[-1] == SEP
        stream.extend(ids[1:-1].tolist())
    stream = np.array(stream)
    tokens = stream[stream != SEP]
    assert tokens.tolist() == list(range(short_docs.base, short_docs.end))  # every token once, in order
    doc_ends = short_docs.sentence_starts[np.cumsum(short_docs.sentences_per_doc)][:-1]
    assert (stream == SEP).sum() == len(doc_ends)  # one [SEP] between two documents
    assert padding([ds[i] for i in range(len(ds))]) < 0.02


def test_mlm_only_rows_mask_about_the_configured_share(short_docs):
    ds = make_dataset(short_docs, nsp_mode="none", max_predictions_per_seq=19)
    for row in (ds[i] for i in range(len(ds))):
        candidates = int(((row["input_ids"] != SEP) & (row["input_ids"] != CLS) & (row["input_ids"] != PAD)).sum())
        candidates += int(((row["labels"] != IGNORE_INDEX) & (row["input_ids"] == SEP)).sum())  # a [MASK] may replace... never [SEP]
        assert int((row["labels"] != IGNORE_INDEX).sum()) == min(19, max(1, int(candidates * 0.15 + 0.5)))


# --- the model: no cross-talk --------------------------------------------------------------


def tiny_model(vocab_size: int, attn: str, initializer_range: float = 0.02) -> BertForPreTrainingSparse:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=SEQ,
                        initializer_range=initializer_range)
    return BertForPreTrainingSparse._from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # fp32, relative tolerance 1e-5 (of the larger magnitude, so near-zero entries compare at that scale)
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    assert float((a - b).abs().max()) <= 1e-5 * scale, (what, float((a - b).abs().max()), scale)


def labels_of_one_pair(row: dict[str, torch.Tensor], p: int) -> dict[str, torch.Tensor]:
    """A batch of one packed row whose MLM and NSP labels are pair ``p``'s only: the row's loss is that pair's."""
    only = dict(row)
    only["labels"] = torch.where(row["pair_ids"] == p, row["labels"], IGNORE_INDEX)
    only["next_sentence_label"] = torch.full_like(row["next_sentence_label"], IGNORE_INDEX)
    only["next_sentence_label"][0, p] = row["next_sentence_label"][0, p]
    return only


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_row_computes_exactly_what_its_pairs_compute_one_per_row(short_docs, attn):
    ds = packed(short_docs)
    index = next(i for i in range(len(ds)) if len(ds.pairs_of_row(*ds.locate(i))) >= 3)
    epoch, row_number = ds.locate(index)
    row = {k: v[None] for k, v in ds[index].items()}
    alone = [{k: v[None] for k, v in ds.pairs.sample(epoch, j).items()} for j in ds.pairs_of_row(epoch, row_number)]
    model = tiny_model(ds.pairs.vocab_size, attn)

    # hidden states -> every MLM logit of every position, and each pair's NSP logits
    with torch.no_grad():
        mask = block_diagonal_mask(row["pair_ids"])
        if attn != "sdpa":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        hidden = model.bert(input_ids=row["input_ids"], token_type_ids=row["token_type_ids"], attention_mask=mask,
                            position_ids=row["position_ids"], return_dict=False)[0]
        for p, sample in enumerate(alone):
            n = int(sample["attention_mask"].sum())
            start = int(row["cls_positions"][0, p])
            own = model.bert(input_ids=sample["input_ids"], token_type_ids=sample["token_type_ids"],
                             attention_mask=sample["attention_mask"], return_dict=False)
            assert_close(model.cls.predictions(hidden[0, start : start + n]), model.cls.predictions(own[0][0, :n]), f"mlm logits {p}")
            pooled = model.bert.pooler.activation(model.bert.pooler.dense(hidden[0, start]))
            assert_close(model.cls.seq_relationship(pooled), model.cls.seq_relationship(own[1][0]), f"nsp logits {p}")

    # per-pair losses: the packed row with only pair p's labels against pair p alone
    for p, sample in enumerate(alone):
        only = labels_of_one_pair(row, p)
        with torch.no_grad():
            got, want = model(**only), model(**sample)
        assert_close(got.mlm_loss_sum, want.mlm_loss_sum, f"mlm loss {p}")
        assert_close(got.nsp_loss_sum, want.nsp_loss_sum, f"nsp loss {p}")
        assert int(got.mlm_count) == int(want.mlm_count) and int(got.nsp_count) == 1

    # gradients: the packed row's summed losses against the sum over its pairs one per row
    model.zero_grad()
    out = model(**row)
    (out.mlm_loss_sum + out.nsp_loss_sum).backward()
    packed_grads = grads(model)
    model.zero_grad()
    for sample in alone:
        out = model(**sample)
        (out.mlm_loss_sum + out.nsp_loss_sum).backward()
    alone_grads = grads(model)
    assert packed_grads.keys() == alone_grads.keys() and len(packed_grads) > 10
    largest = max(float(g.abs().max()) for g in alone_grads.values())
    for name in packed_grads:
        if name.endswith("attention.self.key.bias"):
            # exactly 0 in exact arithmetic (softmax ignores a shift shared by all of a query's scores): rounding noise
            assert float(packed_grads[name].abs().max()) < 1e-7 * largest, name
            continue
        assert_close(packed_grads[name], alone_grads[name], f"grad {name}")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_row_in_bf16_gives_each_pair_its_own_losses(short_docs, attn):
    """bf16 (the trainer's precision on AMX CPUs and most GPUs): the block mask, the eager kernel's additive mask at
    bf16's minimum and the trailing padding's own block give finite losses, each pair's within bf16 rounding of alone."""
    ds = packed(short_docs)
    index = next(i for i in range(len(ds)) if len(ds.pairs_of_row(*ds.locate(i))) >= 3 and int(ds[i]["attention_mask"].sum()) < SEQ)
    epoch, row_number = ds.locate(index)
    row = {k: v[None] for k, v in ds[index].items()}
    # weights 10x BERT's init scale: attention that is far from uniform, so a pair reading its neighbours' tokens would
    # change its losses by ~50% (measured with an all-True mask), not by the 4e-5 of a freshly initialised model
    model = tiny_model(ds.pairs.vocab_size, attn, initializer_range=0.2).to(torch.bfloat16)
    for p, j in enumerate(ds.pairs_of_row(epoch, row_number)):
        only = labels_of_one_pair(row, p)
        with torch.no_grad():
            got, want = model(**only), model(**{k: v[None] for k, v in ds.pairs.sample(epoch, j).items()})
        for name in ("mlm_loss_sum", "nsp_loss_sum"):
            a, b = float(getattr(got, name)), float(getattr(want, name))
            assert np.isfinite(a) and abs(a - b) <= 0.02 * max(abs(b), 1e-3), (p, name, a, b)


def test_a_block_mask_gives_padding_a_block_of_its_own():
    mask = block_diagonal_mask(torch.tensor([[0, 0, 1, 1, 1, -1, -1]]))[0, 0]
    assert mask.any(dim=-1).all()  # no query row is fully masked
    assert mask[:2, :2].all() and not mask[:2, 2:].any() and mask[5:, 5:].all() and not mask[5:, :5].any()


def test_mlm_only_rows_run_no_nsp_head():
    model = tiny_model(50, "sdpa")
    batch = {"input_ids": torch.randint(5, 50, (2, 16)), "token_type_ids": torch.zeros(2, 16, dtype=torch.long),
             "attention_mask": torch.ones(2, 16, dtype=torch.long), "labels": torch.full((2, 16), IGNORE_INDEX)}
    batch["labels"][:, 3] = 7
    out = model(**batch)
    out.mlm_loss_sum.backward()
    assert int(out.nsp_count) == 0 and float(out.nsp_loss_sum) == 0.0
    assert model.cls.seq_relationship.weight.grad is None


def test_useful_flops_of_one_unpadded_pair_equal_the_dense_count():
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    assert useful_training_flops(config, 40, 40 * 40, 1, 6) == pytest.approx(training_flops(config, 40, 1, 6))
    # two pairs of 20 packed in a row of 40: the same tokens, half the attention
    assert useful_training_flops(config, 40, 2 * 20 * 20, 2, 6) < training_flops(config, 40, 1, 6)


# --- the trainer, 2 ranks, the real DeepSpeed engine ----------------------------------------

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# packed NSP pairs under ZeRO-3 (the stage whose hooks must gather the pooler that every pair's [CLS] goes through)
PACKED_RUN = dict(
    model={"preset": "tiny", "overrides": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, **NO_DROPOUT}},
    train={"max_steps": 60, "micro_batch_size": 8, "zero_stage": 3, "precision": "fp32", "log_interval": 1},
    optimizer={"name": "adamw", "lr": 3e-3}, scheduler={"name": "linear", "warmup_steps": 6, "total_steps": 60},
    eval={"interval_steps": 0, "num_samples": 128},
)  # fmt: skip
# MLM only: what it logs, its padding, its export (whether it learns: test_train's learning launch)
MLM_RUN = dict(
    model={"preset": "tiny", "overrides": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2}},
    train={"max_steps": 20, "micro_batch_size": 8, "log_interval": 5}, eval={"num_samples": 64},
)  # fmt: skip


@pytest.fixture(scope="module")
def packed_runs(pretraining_shards, tmp_path_factory):
    """2-rank runs in one launch: pairs packed with NSP (data.packing, ZeRO-3) straight through 60 steps, the same run
    stopped at step 30 and resumed (``checkpoint.resume: auto``, a new engine), and MLM-only rows (data.nsp_mode: none)."""
    from tests.conftest import train_runs, write_run_config

    d = tmp_path_factory.mktemp("packed_runs")
    data = {"train_prefix": str(pretraining_shards["train"]), "valid_prefix": str(pretraining_shards["valid"]), "max_seq_length": 128}
    nsp = write_run_config(d / "nsp.yaml", pretraining_shards, d / "nsp", **PACKED_RUN, data={**data, "packing": True})
    resumed = write_run_config(d / "resumed.yaml", pretraining_shards, d / "resumed", **PACKED_RUN, data={**data, "packing": True})
    mlm = write_run_config(d / "mlm.yaml", pretraining_shards, d / "mlm", **MLM_RUN, data={**data, "nsp_mode": "none"})
    launch = train_runs((nsp,), (resumed, "train.max_steps=30"), (resumed,), (mlm,), num_ranks=2, timeout=1800)
    return d, dict(zip(("nsp", "stopped", "resumed", "mlm"), launch.results, strict=True))


@pytest.mark.slow
def test_packed_pairs_train_with_nsp_on_two_ranks(packed_runs):
    from tests.conftest import tensorboard_scalars

    d, results = packed_runs
    scalars = tensorboard_scalars(d / "nsp" / "tensorboard")
    assert results["nsp"]["state"]["step"] == 60 and results["nsp"]["state"]["consumed_samples"] == 60 * 16  # rows
    loss = [v for _, v in scalars["train/loss"]]
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 1.0, loss
    # this corpus's pairs at 128 tokens are 31% padding unpacked (1,445 pairs, mostly long): 1.35 per row, 7% padding packed
    assert np.mean([v for _, v in scalars["train/pairs_per_row"]]) > 1.2, scalars["train/pairs_per_row"]
    assert np.mean([v for _, v in scalars["train/padding_fraction"]]) < 0.12, scalars["train/padding_fraction"]
    assert {"train/nsp_loss", "train/nsp_acc", "eval/nsp_acc"} <= set(scalars)
    # samples/s counts pairs and tokens/s non-padding tokens: per window, tokens / pairs = 128 (1 - padding) / pairs per row
    pairs, tokens = dict(scalars["train/samples_per_sec"]), dict(scalars["train/tokens_per_sec"])
    padding, per_row = dict(scalars["train/padding_fraction"]), dict(scalars["train/pairs_per_row"])
    for step in pairs:
        assert tokens[step] / pairs[step] == pytest.approx(128 * (1 - padding[step]) / per_row[step], rel=1e-4), step


@pytest.mark.slow
def test_mlm_only_rows_log_no_nsp_and_hold_almost_no_padding(packed_runs):
    from tests.conftest import tensorboard_scalars

    d, results = packed_runs
    scalars = tensorboard_scalars(d / "mlm" / "tensorboard")
    assert not [tag for tag in scalars if "nsp" in tag], [tag for tag in scalars if "nsp" in tag]
    assert not [key for key in results["mlm"]["train_metrics"] if "nsp" in key]
    assert all(v < 0.02 for _, v in scalars["train/padding_fraction"]), scalars["train/padding_fraction"]
    assert all(v == 1.0 for _, v in scalars["train/pairs_per_row"])


@pytest.mark.slow
def test_a_packed_run_stopped_and_resumed_reproduces_the_uninterrupted_steps_exactly(packed_runs):
    """Resume of packed rows under ZeRO-3: the rows after step 30 are the same rows (a function of seed, epoch, index,
    found again from consumed_samples), and so every logged number of steps 31-60 is the straight run's, bit for bit."""
    from tests.conftest import tensorboard_scalars

    d, results = packed_runs
    assert results["resumed"]["resumed_from"] == str(d / "resumed" / "checkpoints" / "step00000030")
    assert results["resumed"]["state"]["step"] == 60 and results["resumed"]["state"]["consumed_samples"] == 60 * 16
    straight, resumed = tensorboard_scalars(d / "nsp" / "tensorboard"), tensorboard_scalars(d / "resumed" / "tensorboard")
    for tag in ("train/loss", "train/mlm_loss", "train/nsp_loss", "train/grad_norm", "train/pairs_per_row", "train/padding_fraction"):
        after = {step: v for step, v in resumed[tag] if step > 30}
        assert sorted(after) == list(range(31, 61)), (tag, sorted(after))
        assert after == {step: v for step, v in straight[tag] if step > 30}, tag


@pytest.mark.slow
def test_mlm_only_export_loads_as_a_masked_lm_and_fills_masks(packed_runs, tmp_path):
    from transformers import BertForMaskedLM, pipeline

    from tests.conftest import run_module

    d, _ = packed_runs
    out = tmp_path / "hf"
    run_module("bert_ds.export", d / "mlm", out, env={"HF_HUB_OFFLINE": "1"})
    _, info = BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info
    fill = pipeline("fill-mask", model=str(out))
    predictions = fill("the quick [MASK] sees the river.")
    assert len(predictions) == 5 and all("[MASK]" not in p["sequence"] for p in predictions)
