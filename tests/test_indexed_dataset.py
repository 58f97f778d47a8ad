"""The shard format: round trip, Megatron interoperability both ways, corrupt files."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest

from bert_ds.data.indexed_dataset import (
    HEADER_SIZE,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    merge_datasets,
    token_dtype_for_vocab,
)


def random_documents(rng: np.random.Generator, num_docs: int, vocab: int = 30000):
    return [[rng.integers(0, vocab, size=rng.integers(1, 40)).tolist() for _ in range(rng.integers(1, 8))] for _ in range(num_docs)]


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            w.add_document(doc)
    return IndexedDataset(prefix)


def test_round_trip_keeps_every_sentence_and_document_boundary(tmp_path):
    docs = random_documents(np.random.default_rng(0), 50)
    ds = write(tmp_path / "d", docs)
    assert ds.num_documents == 50
    assert ds.num_sequences == sum(len(d) for d in docs)
    for i, doc in enumerate(docs):
        assert [s.tolist() for s in ds.document(i)] == doc
    ds.verify(vocab_size=30000)


def test_dtype_is_uint16_below_megatron_limit_and_int32_above():
    assert token_dtype_for_vocab(30522) == np.uint16
    assert token_dtype_for_vocab(65499) == np.uint16
    assert token_dtype_for_vocab(65500) == np.int32


def test_header_is_byte_for_byte_the_documented_layout(tmp_path):
    ds = write(tmp_path / "d", [[[5, 6, 7], [8]], [[9, 10]]])
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", raw, 9) == (1,)
    assert raw[17] == 8  # uint16
    assert struct.unpack_from("<QQ", raw, 18) == (3, 3)  # 3 sequences, 2 documents + leading 0
    body = raw[HEADER_SIZE:]
    assert np.frombuffer(body[:12], np.int32).tolist() == [3, 1, 2]
    assert np.frombuffer(body[12:36], np.int64).tolist() == [0, 6, 8]  # byte pointers
    assert np.frombuffer(body[36:60], np.int64).tolist() == [0, 2, 3]  # document indices
    assert (tmp_path / "d.bin").read_bytes() == np.array([5, 6, 7, 8, 9, 10], np.uint16).tobytes()
    assert ds.num_tokens == 6


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset as megatron_indexed

    return megatron_indexed


def test_megatron_reads_a_bert_ds_shard(tmp_path):
    mega = _megatron()
    docs = random_documents(np.random.default_rng(1), 30)
    write(tmp_path / "ours", docs)
    theirs = mega.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == sum(len(d) for d in docs)
    flat = [s for d in docs for s in d]
    for i in range(len(flat)):
        assert theirs[i].tolist() == flat[i]
    assert theirs.document_indices.tolist() == np.cumsum([0] + [len(d) for d in docs]).tolist()


def test_bert_ds_reads_a_megatron_shard_and_writes_the_same_bytes(tmp_path):
    import torch

    mega = _megatron()
    docs = random_documents(np.random.default_rng(2), 30)
    builder = mega.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.tensor([t for s in doc for t in s]), [len(s) for s in doc])
    builder.finalize(str(tmp_path / "theirs.idx"))
    ds = IndexedDataset(tmp_path / "theirs")
    for i, doc in enumerate(docs):
        assert [s.tolist() for s in ds.document(i)] == doc
    write(tmp_path / "ours", docs)
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "theirs.idx").read_bytes()
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()


def test_merge_equals_writing_all_documents_at_once(tmp_path):
    docs = random_documents(np.random.default_rng(3), 40)
    write(tmp_path / "a", docs[:15])
    write(tmp_path / "b", docs[15:])
    write(tmp_path / "all", docs)
    merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    for ext in ("bin", "idx"):
        assert (tmp_path / f"merged.{ext}").read_bytes() == (tmp_path / f"all.{ext}").read_bytes()


def test_failed_write_leaves_no_file_pair(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
            w.add_document([[1, 2]])
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda idx, binf: idx.write_bytes(b"NOTMAGIC!" + idx.read_bytes()[9:]), "bad magic"),
        (lambda idx, binf: idx.write_bytes(idx.read_bytes()[:9] + struct.pack("<Q", 7) + idx.read_bytes()[17:]), "unsupported index version 7"),
        (lambda idx, binf: idx.write_bytes(idx.read_bytes()[:17] + b"\x63" + idx.read_bytes()[18:]), "unknown dtype code 99"),
        (lambda idx, binf: idx.write_bytes(idx.read_bytes()[:-5]), "truncated or corrupt"),
        (lambda idx, binf: idx.write_bytes(idx.read_bytes()[:20]), "truncated header"),
        (lambda idx, binf: binf.write_bytes(binf.read_bytes()[:-4]), "is truncated"),
        (lambda idx, binf: binf.unlink(), "file not found"),
    ],
    ids=["magic", "version", "dtype", "truncated-idx", "truncated-header", "truncated-bin", "missing-bin"],
)
def test_corrupt_shard_errors_name_the_file_and_the_problem(tmp_path, damage, message):
    write(tmp_path / "d", random_documents(np.random.default_rng(4), 5))
    idx, binf = tmp_path / "d.idx", tmp_path / "d.bin"
    damage(idx, binf)
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(tmp_path / "d")
    assert message in str(e.value)
    assert str(tmp_path / "d.") in str(e.value)


def test_verify_finds_corrupt_pointers_and_out_of_vocab_tokens(tmp_path):
    write(tmp_path / "d", [[[1, 2, 3], [4, 5]], [[6]]])
    raw = bytearray((tmp_path / "d.idx").read_bytes())
    struct.pack_into("<q", raw, HEADER_SIZE + 3 * 4 + 8, 2)  # second pointer 6 -> 2
    (tmp_path / "d.idx").write_bytes(bytes(raw))
    with pytest.raises(IndexedDatasetError, match="pointer of sentence 1"):
        IndexedDataset(tmp_path / "d").verify()
    write(tmp_path / "e", [[[1, 2, 999]]])
    with pytest.raises(IndexedDatasetError, match="token id 999 .* outside the vocabulary"):
        IndexedDataset(tmp_path / "e").verify(vocab_size=100)
