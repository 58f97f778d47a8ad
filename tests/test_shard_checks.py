"""Shards are not trusted beyond their size: the checks a shard gets when it is opened for training, when a run
starts, per sample, and in ``inspect --verify``.

The hostile shards are written byte by byte here (``craft``), as another tool (or an attacker) could: a header that
agrees with the file size, and arrays inside that do not add up.
"""

from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bert_ds.data.indexed_dataset import INDEX_HEADER, IndexedDataset, IndexedDatasetError, IndexedDatasetWriter
from tests.conftest import REPO, run_module

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = 100


def craft(prefix: Path, lengths, doc_indices, tokens, pointers=None, dtype=np.uint16) -> Path:
    """A .bin/.idx pair with exactly these arrays (pointers default to the consistent ones)."""
    lengths = np.asarray(lengths, np.int32)
    itemsize = np.dtype(dtype).itemsize
    if pointers is None:
        pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * itemsize)]) if len(lengths) else np.zeros(0)
    code = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}[np.dtype(dtype)]
    header = INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<QQ", len(lengths), len(doc_indices))
    body = lengths.tobytes() + np.asarray(pointers, np.int64).tobytes() + np.asarray(doc_indices, np.int64).tobytes()
    Path(f"{prefix}.idx").write_bytes(header + body)
    Path(f"{prefix}.bin").write_bytes(np.asarray(tokens, dtype).tobytes())
    return prefix


def good_documents(num_docs: int = 6, seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """(sentence lengths, document indices, tokens) of a valid shard: 3-5 sentences of 4-9 tokens per document."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(3, 6, size=num_docs)
    lengths = rng.integers(4, 10, size=int(counts.sum()))
    tokens = rng.integers(10, VOCAB, size=int(lengths.sum()))
    return lengths.tolist(), np.concatenate([[0], np.cumsum(counts)]).tolist(), tokens.tolist()


def dataset(prefix, vocab_size: int = VOCAB, **kw):
    from bert_ds.data.pretraining import PretrainingDataset

    args = dict(vocab_size=vocab_size, cls_id=CLS, sep_id=SEP, pad_id=PAD, mask_id=MASK, unk_id=UNK, max_seq_length=32,
                max_predictions_per_seq=5, seed=1)
    return PretrainingDataset([prefix], **{**args, **kw})


def open_for_training_in_a_small_address_space(prefix: Path) -> subprocess.CompletedProcess:
    """Open the shard for training in a process that cannot map more than 3 GiB: a check that regressed fails the
    test with a MemoryError instead of taking the machine's memory."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_shard_checks import dataset
        dataset({str(prefix)!r})
    """)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, preexec_fn=limit)


# -- opening a shard for training ----------------------------------------------------------------


def test_document_indices_far_beyond_the_sentences_are_refused_at_open_not_allocated(tmp_path):
    lengths, _, tokens = good_documents()
    # one document "of 2**33 sentences": the header agrees with the file sizes; the anchors would need 64 GiB
    prefix = craft(tmp_path / "huge", lengths, [0, 2**33], tokens)
    proc = open_for_training_in_a_small_address_space(prefix)
    assert proc.returncode != 0 and "MemoryError" not in proc.stderr, proc.stderr[-2000:]
    assert f"{prefix}.idx: the last document ends at sentence {2**33}, but there are {len(lengths)} sentences" in proc.stderr, proc.stderr[-2000:]


def _swap_pointers(lengths, docs, tokens):
    pointers = np.concatenate([[0], np.cumsum(np.asarray(lengths[:-1], np.int64) * 2)])
    pointers[[1, 2]] = pointers[[2, 1]]
    return lengths, docs, tokens, pointers


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda L, D, T: (L, [1] + D[1:], T, None), "document indices must start at 0, found 1"),
        (lambda L, D, T: (L, D[:2] + [D[1] - 1] + D[3:], T, None), "document indices decrease at document 1"),
        (lambda L, D, T: (L, D[:-1] + [len(L) + 5], T, None), "the last document ends at sentence"),
        (_swap_pointers, "pointer of sentence 1 is"),
    ],
    ids=["first-not-0", "decreasing", "past-the-end", "pointers"],
)
def test_inconsistent_index_arrays_are_refused_when_a_shard_is_opened_for_training(tmp_path, damage, message):
    lengths, docs, tokens, pointers = damage(*good_documents())
    prefix = craft(tmp_path / "d", lengths, docs, tokens, pointers=pointers)
    IndexedDataset(prefix)  # the header and the file sizes agree: the pair opens
    with pytest.raises(IndexedDatasetError, match=message) as e:
        dataset(prefix)
    assert f"{prefix}.idx" in str(e.value)


def test_an_empty_sentence_is_refused_naming_the_file_and_the_sentence(tmp_path):
    lengths, docs, tokens = good_documents()
    lengths[7] = 0  # a sentence with no token (the anchors could make it segment A: it trained silently)
    tokens = tokens[: sum(lengths)]
    prefix = craft(tmp_path / "d", lengths, docs, tokens)
    with pytest.raises(IndexedDatasetError, match=rf"{prefix}.idx: sentence 7 is empty"):
        dataset(prefix)
    proc = run_module("data_tools.inspect", prefix, "--verify", "--samples", "0", check=False)
    assert proc.returncode != 0 and f"{prefix}.idx: sentence 7 is empty" in proc.stderr, proc.stdout + proc.stderr


def test_a_document_without_sentences_is_refused_naming_the_file_and_the_document(tmp_path):
    lengths, docs, tokens = good_documents()
    docs = docs[:3] + [docs[2]] + docs[3:]  # document 2 has no sentence (Megatron's builder writes such)
    prefix = craft(tmp_path / "d", lengths, docs, tokens)
    with pytest.raises(IndexedDatasetError, match=rf"{prefix}.idx: document 2 has no sentence"):
        dataset(prefix)
    proc = run_module("data_tools.inspect", prefix, "--verify", "--samples", "0", check=False)
    assert proc.returncode != 0 and f"{prefix}.idx: document 2 has no sentence" in proc.stderr, proc.stdout + proc.stderr


def test_the_writer_refuses_empty_sentences_and_documents(tmp_path):
    with IndexedDatasetWriter(tmp_path / "w", np.uint16) as w:
        with pytest.raises(ValueError, match="document 1 has no sentence"):
            w.add_document([[5, 6]]) or w.add_document([])
        with pytest.raises(ValueError, match="sentence 2 is empty"):
            w.add_documents(np.array([7, 8], np.uint16), np.array([2, 0]), np.array([2]))
        with pytest.raises(ValueError, match="token id 70000 does not fit uint16"):
            w.add_document([[70000]])


# -- token ids ------------------------------------------------------------------------------------


def test_a_token_id_outside_the_vocabulary_is_refused_when_its_sample_is_read(tmp_path):
    lengths, docs, tokens = good_documents()
    tokens[11] = VOCAB + 23  # a shard without metadata: nothing at open time knows it
    prefix = craft(tmp_path / "d", lengths, docs, tokens)
    ds = dataset(prefix)
    with pytest.raises(IndexedDatasetError) as e:
        for i in range(len(ds) * 4):  # every anchor, in several epochs: the bad token is in some sample
            ds[i]
    assert f"{prefix}.bin: token id {VOCAB + 23} at token 11 is outside the vocabulary (size {VOCAB})" in str(e.value)


def test_samples_of_a_valid_shard_are_unchanged_by_the_checks(tmp_path):
    """The checks add no randomness and change no sample: a digest of the first samples of a fixed shard."""
    lengths, docs, tokens = good_documents(num_docs=40, seed=3)
    prefix = craft(tmp_path / "d", lengths, docs, tokens)
    ds = dataset(prefix)
    digest = sum(int((ds[i]["input_ids"] * (np.arange(32) + 1)).sum()) + 7 * int(ds[i]["labels"].sum()) for i in range(50))
    assert digest == -12976, digest  # computed on main at ba56d61, before the checks


def test_preprocess_and_merge_record_the_largest_token_id_and_a_run_refuses_a_larger_one(vocab_dir, corpus_dir, tmp_path):
    from bert_ds.config import ConfigError, run_config_from_dict
    from bert_ds.data.vocab import resolve_vocab

    for i, name in enumerate(("a.txt", "b.txt")):
        run_module("data_tools.preprocess", "--input", corpus_dir / name, "--tokenizer", vocab_dir, "--output-prefix", tmp_path / f"p{i}",
                   "--workers", "1")
    run_module("data_tools.merge", "--inputs", tmp_path / "p0", tmp_path / "p1", "--output-prefix", tmp_path / "m")
    for prefix in ("p0", "p1", "m"):
        meta = json.loads((tmp_path / f"{prefix}.json").read_text())
        assert meta["max_token_id"] == int(np.asarray(IndexedDataset(tmp_path / prefix).tokens).max()), prefix
    assert json.loads((tmp_path / "m.json").read_text())["max_token_id"] == max(
        json.loads((tmp_path / f"p{i}.json").read_text())["max_token_id"] for i in range(2))

    cfg = run_config_from_dict({"run_dir": str(tmp_path / "run"), "data": {"train_prefix": str(tmp_path / "m"), "tokenizer": str(vocab_dir)},
                                "train": {"max_steps": 1}})
    assert resolve_vocab(cfg).size == 400
    meta = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**meta, "max_token_id": 400}))  # a .json that disagrees with the vocabulary
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'm'}.json: the largest token id in the shard is 400, outside the vocabulary"):
        resolve_vocab(cfg)
    run = run_module("data_tools.inspect", tmp_path / "m", "--verify", "--samples", "0", check=False)
    assert run.returncode != 0 and "metadata says the largest token id is 400, the shard's is" in run.stderr
