"""Fine-tune check: does a pretrained checkpoint help a downstream classification task?

    python -m bert_ds.finetune --model SOURCE --train train.csv --valid valid.csv [--json]
    python -m bert_ds.finetune --model SOURCE --train train.csv --valid valid.csv --random-init   # the baseline

SOURCE is a Hugging Face BERT directory (an export, a released model), a run directory (its newest
checkpoint) or a checkpoint directory. ``transformers.BertForSequenceClassification`` is built
on its encoder (and pooler); the classifier is new. The same command with ``--random-init`` trains
the same architecture from random weights with the same data, steps and seed: the gap between the
two accuracies is what pretraining bought on this task.

Data: CSV with a header, or JSONL, with a text and a label column (``--text-key``, ``--label-key``;
default ``text`` and ``label``); labels may be strings or numbers. The reported accuracy is the
validation accuracy after the last epoch (not the best epoch, which would be chosen on the very
set it is reported on). One CPU or GPU process, plain PyTorch: AdamW with BERT's fine-tuning
recipe (linear warmup over 10% of the steps then linear decay, weight decay 0.01 except biases
and LayerNorm, gradient clipping at 1.0).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from transformers import BertForSequenceClassification

from bert_ds.checkpoint import CheckpointError
from bert_ds.config import ConfigError
from bert_ds.data.vocab import TokenizerError, load_tokenizer
from bert_ds.hf.sources import CheckpointSource, HFSource, load_into, open_source, start_command
from bert_ds.optim import build_param_groups, build_scheduler

log = logging.getLogger("bert_ds.finetune")


class DataError(ValueError):
    """A training or validation file is missing, malformed or has unusable labels."""


def read_examples(path: str | Path, text_key: str = "text", label_key: str = "label") -> list[tuple[str, str]]:
    """(text, label) pairs from a CSV (with a header) or JSONL file; labels as strings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            rows = []
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: not JSON ({e})") from None
        else:
            rows = list(csv.DictReader(f))
    examples = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or text_key not in row or label_key not in row:
            raise DataError(f"{path}: record {i} lacks '{text_key}' or '{label_key}' (use --text-key / --label-key); got {str(row)[:100]}")
        examples.append((str(row[text_key]), str(row[label_key])))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def encode(tok, texts: list[str], max_seq_length: int, cls_id: int, sep_id: int) -> list[list[int]]:
    """[CLS] text [SEP], truncated to ``max_seq_length`` (special tokens added here, whatever the tokenizer's post-processor)."""
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    return [[cls_id, *e.ids[: max_seq_length - 2], sep_id] for e in encodings]


def _batches(ids: list[list[int]], labels: list[int], order: list[int], batch_size: int, pad_id: int):
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chunk)  # pad to the longest in the batch, not to max_seq_length
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
        yield input_ids, (input_ids != pad_id).long(), torch.tensor([labels[i] for i in chunk])


def build_classifier(source: HFSource | CheckpointSource, num_labels: int, random_init: bool, seed: int) -> BertForSequenceClassification:
    """BERT + a new classification head; the encoder from ``source`` unless ``random_init``."""
    config = source.bert_config.__class__.from_dict(source.bert_config.to_dict())
    config.num_labels = num_labels
    torch.manual_seed(seed)  # the classifier (and, with random_init, everything) starts from the same numbers
    if random_init:
        return BertForSequenceClassification._from_config(config, dtype=torch.float32)
    if isinstance(source, HFSource):
        return BertForSequenceClassification.from_pretrained(source.path, config=config, dtype=torch.float32)
    model = BertForSequenceClassification._from_config(config, dtype=torch.float32)
    weights, where = source.fp32_weights()
    load_into(model, weights, str(source.tag_dir), prefix_filter="bert.")
    log.info("encoder from %s: %s", source.describe(), where)
    return model


@torch.no_grad()
def accuracy(model, ids, labels, batch_size: int, pad_id: int, device: torch.device) -> float:
    model.eval()
    correct = 0
    for input_ids, mask, y in _batches(ids, labels, list(range(len(ids))), batch_size, pad_id):
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        correct += int((logits.argmax(-1).cpu() == y).sum())
    return correct / len(ids)


def finetune(
    model_source: str | Path, train_file: str | Path, valid_file: str | Path, *, random_init: bool = False, epochs: int = 3,
    lr: float = 5e-5, batch_size: int = 32, max_seq_length: int = 128, seed: int = 0, warmup_ratio: float = 0.1,
    weight_decay: float = 0.01, text_key: str = "text", label_key: str = "label",
) -> dict:  # fmt: skip
    """Fine-tune and report validation accuracy per epoch; the returned dict is what ``--json`` prints."""
    start_time = time.perf_counter()
    source = open_source(model_source)
    train, valid = read_examples(train_file, text_key, label_key), read_examples(valid_file, text_key, label_key)
    names = sorted({label for _, label in train})
    if len(names) < 2:
        raise DataError(f"{train_file}: a single label ({names}); classification needs at least two")
    unseen = sorted({label for _, label in valid} - set(names))
    if unseen:
        raise DataError(f"{valid_file}: labels {unseen[:5]} never occur in {train_file}")
    index = {name: i for i, name in enumerate(names)}
    max_seq_length = min(max_seq_length, source.bert_config.max_position_embeddings)

    try:
        tok = load_tokenizer(source.tokenizer_dir)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    cls_id, sep_id, pad_id = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    train_ids = encode(tok, [t for t, _ in train], max_seq_length, cls_id, sep_id)
    valid_ids = encode(tok, [t for t, _ in valid], max_seq_length, cls_id, sep_id)
    train_y, valid_y = [index[label] for _, label in train], [index[label] for _, label in valid]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_classifier(source, len(names), random_init, seed).to(device)
    optimizer = torch.optim.AdamW(build_param_groups(model, weight_decay), lr=lr)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * epochs
    scheduler = build_scheduler(optimizer, "linear", int(warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(seed)
    log.info("fine-tuning %s%s on %d examples (%d labels) for %d epochs (%d steps)",
             source.describe(), " from RANDOM weights" if random_init else "", len(train), len(names), epochs, total)  # fmt: skip

    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for input_ids, mask, y in _batches(train_ids, train_y, order, batch_size, pad_id):
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=y.to(device))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += out.loss.detach().double().cpu() * len(y)
        acc = accuracy(model, valid_ids, valid_y, batch_size, pad_id, device)
        history.append({"epoch": epoch, "train_loss": float(loss_sum) / len(train), "accuracy": acc})
        log.info("epoch %d/%d: train loss %.4f, validation accuracy %.4f", epoch, epochs, history[-1]["train_loss"], acc)

    majority = max(valid_y.count(i) for i in range(len(names))) / len(valid_y)
    return {
        "accuracy": history[-1]["accuracy"],
        "majority_accuracy": majority,
        "init": "random" if random_init else "pretrained",
        "model": source.describe(),
        "labels": names,
        "train_examples": len(train),
        "valid_examples": len(valid),
        "epochs": history,
        "seconds": time.perf_counter() - start_time,
    }


def format_table(result: dict) -> str:
    lines = [
        f"model     {result['model']} ({result['init']} weights)",
        f"data      {result['train_examples']} training / {result['valid_examples']} validation examples, labels {', '.join(result['labels'])}",
    ]
    lines += [f"epoch {e['epoch']}   train loss {e['train_loss']:.4f}   validation accuracy {e['accuracy']:.4f}" for e in result["epochs"]]
    lines.append(f"accuracy  {result['accuracy']:.4f} (majority class: {result['majority_accuracy']:.4f})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bert_ds.finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face BERT dir, bert-ds run dir or checkpoint dir")
    p.add_argument("--train", required=True, help="CSV (header) or JSONL with text and label")
    p.add_argument("--valid", required=True, help="same format; accuracy is reported on it")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--random-init", action="store_true", help="same architecture, random weights: the baseline")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128, help="tokens per example incl. [CLS] and [SEP]")
    p.add_argument("--seed", type=int, default=0, help="classifier init, example order and dropout")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--text-key", default="text")
    p.add_argument("--label-key", default="label")
    args = p.parse_args(argv)
    start_command()
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise SystemExit("finetune error: --epochs and --batch-size must be >= 1 and --lr > 0")
    try:
        result = finetune(
            args.model, args.train, args.valid, random_init=args.random_init, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
            max_seq_length=args.max_seq_length, seed=args.seed, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
            text_key=args.text_key, label_key=args.label_key,
        )  # fmt: skip
    except (CheckpointError, ConfigError, DataError) as e:
        raise SystemExit(f"finetune error: {e}") from None
    sys.stdout.write(json.dumps(result) + "\n" if args.json else format_table(result))


if __name__ == "__main__":
    main()
