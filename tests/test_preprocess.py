"""preprocess end to end: round trip, determinism across workers and shards, input formats, bad input."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from bert_ds.data.indexed_dataset import IndexedDataset
from bert_ds.data.vocab import load_tokenizer
from data_tools.text import document_sentences, normalize_document
from tests.conftest import last_json, run_module


def preprocess(inputs, vocab_dir, prefix, *extra, check=True):
    inputs = inputs if isinstance(inputs, list | tuple) else [inputs]
    proc = run_module("data_tools.preprocess", "--input", *inputs, "--tokenizer", vocab_dir, "--output-prefix", prefix, "--workers", "1", *extra, check=check)
    return (last_json(proc.stdout) if proc.returncode == 0 else None), proc


def documents_of(path: Path) -> list[str]:
    return [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def test_round_trip_decodes_to_the_tokenizers_own_encoding_and_counts_add_up(corpus_dir, vocab_dir, tmp_path):
    summary, _ = preprocess(corpus_dir, vocab_dir, tmp_path / "d")
    docs = documents_of(corpus_dir / "a.txt") + documents_of(corpus_dir / "b.txt")
    tok = load_tokenizer(vocab_dir)
    ds = IndexedDataset(tmp_path / "d")
    expected_docs = [document_sentences(normalize_document(d)) for d in docs]
    assert summary["docs_in"] == len(docs)
    assert summary["docs_in"] == summary["docs_written"] + sum(summary["docs_skipped"].values())
    assert ds.num_documents == summary["docs_written"]
    assert ds.num_sequences == summary["sentences"] == sum(len(s) for s in expected_docs if len(s))
    assert ds.num_tokens == summary["tokens"]
    for doc in random.Random(0).sample(range(len(docs)), 60):
        expected = [e.ids for e in tok.encode_batch(expected_docs[doc], add_special_tokens=False)]
        assert [s.tolist() for s in ds.document(doc)] == expected
    meta = json.loads((tmp_path / "d.json").read_text())
    assert meta["counts"] == {"documents": ds.num_documents, "sentences": ds.num_sequences, "tokens": ds.num_tokens}
    assert meta["tokenizer"]["vocab_size"] == tok.get_vocab_size() and len(meta["tokenizer"]["vocab_sha256"]) == 64
    assert meta["dtype"] == "uint16" and {s["path"] for s in meta["sources"]} == {str(corpus_dir / "a.txt"), str(corpus_dir / "b.txt")}


@pytest.fixture()
def small_units(monkeypatch):
    """Many small work units, so the small test corpus exercises unit boundaries and 2 workers."""
    monkeypatch.setenv("BERT_DS_UNIT_BYTES", "3000")


def test_one_and_two_workers_and_two_shards_merged_give_identical_bytes(corpus_dir, vocab_dir, tmp_path, small_units):
    base, _ = preprocess(corpus_dir, vocab_dir, tmp_path / "w1", "--valid-fraction", "0.1")
    two, _ = preprocess(corpus_dir, vocab_dir, tmp_path / "w2", "--valid-fraction", "0.1", "--workers", "2")
    for i in range(2):
        preprocess(corpus_dir, vocab_dir, tmp_path / f"part{i}", "--valid-fraction", "0.1", "--shard-index", str(i), "--num-shards", "2")
    run_module("data_tools.merge", "--inputs", tmp_path / "part0", tmp_path / "part1", "--output-prefix", tmp_path / "merged")
    assert base["docs_written_valid"] > 0
    for other in ("w2", "merged", "merged_valid"):
        for ext in ("bin", "idx"):
            ref = "w1_valid" if other.endswith("valid") else "w1"
            assert (tmp_path / f"{other}.{ext}").read_bytes() == (tmp_path / f"{ref}.{ext}").read_bytes(), (other, ext)
    parts = [IndexedDataset(tmp_path / f"part{i}") for i in range(2)]
    assert all(p.num_documents > 0 for p in parts)  # both tasks really got work
    assert {k: two[k] for k in ("docs_in", "sentences", "tokens")} == {k: base[k] for k in ("docs_in", "sentences", "tokens")}


def test_merge_never_leaves_a_held_out_part_that_is_not_these_inputs(corpus_dir, vocab_dir, tmp_path):
    """merge skipped the _valid parts silently when not every input had one, and left an old OUTPUT_valid in place."""
    preprocess(corpus_dir, vocab_dir, tmp_path / "a", "--valid-fraction", "0.1")
    preprocess(corpus_dir, vocab_dir, tmp_path / "b")  # no held-out part
    mixed = run_module("data_tools.merge", "--inputs", tmp_path / "a", tmp_path / "b", "--output-prefix", tmp_path / "m", check=False)
    assert mixed.returncode != 0 and f"{tmp_path / 'b'} not" in mixed.stderr and not (tmp_path / "m.bin").exists()
    run_module("data_tools.merge", "--inputs", tmp_path / "a", tmp_path / "a", "--output-prefix", tmp_path / "m")
    assert (tmp_path / "m_valid.idx").exists()  # every input has one: merged
    proc = run_module("data_tools.merge", "--inputs", tmp_path / "b", tmp_path / "b", "--output-prefix", tmp_path / "m")
    assert not list(tmp_path.glob("m_valid.*")) and "removed" in proc.stderr  # the earlier run's held-out part is gone
    assert IndexedDataset(tmp_path / "m").num_documents == 2 * IndexedDataset(tmp_path / "b").num_documents


def test_valid_split_is_by_document_and_disjoint(corpus_dir, vocab_dir, tmp_path):
    summary, _ = preprocess(corpus_dir, vocab_dir, tmp_path / "d", "--valid-fraction", "0.2")
    train, valid = IndexedDataset(tmp_path / "d"), IndexedDataset(tmp_path / "d_valid")
    assert valid.num_documents == summary["docs_written_valid"]
    assert 0.12 < valid.num_documents / summary["docs_written"] < 0.28
    train_docs = {tuple(np.concatenate(train.document(i)).tolist()) for i in range(train.num_documents)}
    assert not any(tuple(np.concatenate(valid.document(i)).tolist()) in train_docs for i in range(valid.num_documents))
    assert json.loads((tmp_path / "d_valid.json").read_text())["split"] == "valid"


def test_explicit_valid_files(corpus_dir, vocab_dir, tmp_path):
    summary, _ = preprocess(corpus_dir / "a.txt", vocab_dir, tmp_path / "d", "--valid-input", corpus_dir / "b.txt")
    assert summary["docs_written_valid"] == len(documents_of(corpus_dir / "b.txt"))
    assert IndexedDataset(tmp_path / "d_valid").num_documents == summary["docs_written_valid"]


def test_every_input_format_gives_the_same_shard(corpus_dir, vocab_dir, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents_of(corpus_dir / "a.txt")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
        f.write((tmp_path / "docs.jsonl").read_text())
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet", row_group_size=100)
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "lines.txt").write_text("".join(d.replace("\n", " ") + "\n" for d in docs))
    preprocess(corpus_dir / "a.txt", vocab_dir, tmp_path / "ref")
    variants = {
        "jsonl": [tmp_path / "docs.jsonl"], "jsonl.gz": [tmp_path / "docs.jsonl.gz"], "parquet": [tmp_path / "docs.parquet"],
        "hf": [tmp_path / "hf"], "glob": [str(tmp_path / "docs.jsonl*")],
    }
    for name, inputs in variants.items():
        summary, _ = preprocess(inputs, vocab_dir, tmp_path / name, "--text-key", "body")
        expected_docs = len(docs) * (2 if name == "glob" else 1)
        assert summary["docs_in"] == expected_docs, name
        if name != "glob":
            assert (tmp_path / f"{name}.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes(), name
    preprocess(tmp_path / "lines.txt", vocab_dir, tmp_path / "lines", "--one-doc-per-line")
    assert (tmp_path / "lines.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


def test_invalid_utf8_is_replaced_and_counted(vocab_dir, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"Good text here. Another one.\n\nBroken \xff\xfe bytes here. And \xc3 more.\n\nClean again. Yes.\n")
    summary, proc = preprocess(tmp_path / "bad.txt", vocab_dir, tmp_path / "d")
    assert summary["invalid_utf8_sequences_replaced"] == 3  # \xff, \xfe and the truncated \xc3
    assert summary["docs_with_invalid_utf8"] == 1 and summary["docs_written"] == 3
    assert "replaced 3 invalid UTF-8" in proc.stderr


def test_empty_and_one_sentence_documents_are_counted_kept_or_dropped(vocab_dir, tmp_path):
    # a document of only control characters tokenizes to nothing: skipped as empty
    (tmp_path / "c.txt").write_text("Two sentences. Right here.\n\nOnly one sentence\n\n\x01\x02\x03\n\nAgain two. Yes two.\n")
    kept, _ = preprocess(tmp_path / "c.txt", vocab_dir, tmp_path / "k")
    assert kept["docs_in"] == 4 and kept["docs_skipped"] == {"empty": 1, "one_sentence": 0, "too_long": 0} and kept["docs_with_one_sentence_kept"] == 1
    dropped, _ = preprocess(tmp_path / "c.txt", vocab_dir, tmp_path / "d", "--drop-short-docs")
    assert dropped["docs_skipped"] == {"empty": 1, "one_sentence": 1, "too_long": 0} and dropped["docs_written"] == 2
    assert IndexedDataset(tmp_path / "d").num_documents == 2


def test_binary_file_is_an_error_naming_it_or_skipped_and_counted(corpus_dir, vocab_dir, tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x00\x01binary\x00" * 100)
    _, proc = preprocess([corpus_dir / "a.txt", tmp_path / "model.bin"], vocab_dir, tmp_path / "d", check=False)
    assert proc.returncode != 0
    assert f"{tmp_path / 'model.bin'}: looks like a binary file (NUL byte at offset 0)" in proc.stderr
    assert not (tmp_path / "d.bin").exists()
    summary, _ = preprocess([corpus_dir / "a.txt", tmp_path / "model.bin"], vocab_dir, tmp_path / "d", "--skip-bad-files")
    assert [f["path"] for f in summary["files_skipped"]] == [str(tmp_path / "model.bin")]


def test_unreadable_file_is_an_error_naming_it(vocab_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    if os.geteuid() == 0:
        # root reads files whatever their mode; reading /proc/self/mem at offset 0 fails with EIO
        secret.symlink_to("/proc/self/mem")
    else:
        secret.write_text("Hidden. Text.")
        secret.chmod(0)
    _, proc = preprocess(secret, vocab_dir, tmp_path / "d", check=False)
    assert proc.returncode != 0 and f"{secret}: cannot read" in proc.stderr


def test_missing_input_and_unreadable_path_are_errors_naming_them(vocab_dir, tmp_path):
    _, proc = preprocess(tmp_path / "nope.txt", vocab_dir, tmp_path / "d", check=False)
    assert proc.returncode != 0 and f"{tmp_path / 'nope.txt'}: no such file or directory" in proc.stderr
    _, proc = preprocess(str(tmp_path / "*.none"), vocab_dir, tmp_path / "d", check=False)
    assert "the pattern matches no file" in proc.stderr


def test_bad_jsonl_line_error_names_file_and_line(vocab_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "Fine. Good."}\n{"text": "Also fine. Yes."}\n{"text": broken\n')
    _, proc = preprocess(tmp_path / "d.jsonl", vocab_dir, tmp_path / "d", check=False)
    assert proc.returncode != 0 and f"{tmp_path / 'd.jsonl'}:3: invalid JSON" in proc.stderr
    (tmp_path / "k.jsonl").write_text('{"body": "Fine. Good."}\n')
    _, proc = preprocess(tmp_path / "k.jsonl", vocab_dir, tmp_path / "k", check=False)
    assert f"{tmp_path / 'k.jsonl'}:1: no text key 'text' (found ['body']); set --text-key" in proc.stderr
    assert not (tmp_path / "k.bin").exists() and not list(tmp_path.glob("*.partial"))


def test_wrong_tokenizer_dir_is_an_error_naming_it(corpus_dir, tmp_path):
    _, proc = preprocess(corpus_dir, tmp_path, tmp_path / "d", check=False)
    assert proc.returncode != 0 and f"{tmp_path}: neither tokenizer.json nor vocab.txt found" in proc.stderr


def test_inspect_counts_histogram_verify_and_json(corpus_dir, vocab_dir, tmp_path):
    preprocess(corpus_dir, vocab_dir, tmp_path / "d")
    out = run_module("data_tools.inspect", tmp_path / "d", "--verify").stdout
    assert "verify: OK" in out and "sentence length histogram" in out and "--- document" in out
    counts = last_json(run_module("data_tools.inspect", tmp_path / "d", "--json", "--verify").stdout)
    ds = IndexedDataset(tmp_path / "d")
    assert (counts["documents"], counts["sentences"], counts["tokens"]) == (ds.num_documents, ds.num_sequences, ds.num_tokens)
    assert sum(counts["sentence_length_histogram"].values()) == ds.num_sequences
    # a corrupt shard: inspect names the file and the problem
    raw = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(raw[:-8])
    proc = run_module("data_tools.inspect", tmp_path / "d", check=False)
    assert proc.returncode != 0 and f"{tmp_path / 'd.idx'}: size" in proc.stderr and "truncated or corrupt" in proc.stderr
