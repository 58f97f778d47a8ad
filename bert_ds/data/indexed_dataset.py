"""Megatron-compatible indexed dataset: one token sequence per sentence, documents kept.

The on-disk format is specified byte by byte in ``data_tools/README.md``; this module is
its single implementation (``data_tools`` writes with it, the trainer reads with it).

A dataset is a file pair sharing a prefix:

* ``PREFIX.bin``: the token ids of every sequence, back to back, in one numpy dtype.
* ``PREFIX.idx``: a header (magic, version, dtype code, counts) followed by three
  arrays: sequence lengths (int32), byte pointers into ``.bin`` (int64) and document
  indices (int64, ``num_documents + 1`` entries, starting at 0).

The writer streams: tokens go straight to ``.bin`` and the per-sequence index arrays are
spooled to temporary files, so its memory does not grow with the corpus. ``.bin``, ``.idx``
and the metadata ``.json`` (``bert_ds.data.metadata``) are one unit (``bert_ds.files.FileUnit``):
written under ``.partial`` names and renamed only when complete, the ``.json`` last, so a
crashed run never leaves files that look valid or a ``.json`` that describes other data.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping, Sequence
from enum import IntEnum
from pathlib import Path

import numpy as np

from bert_ds.data.metadata import metadata_path, metadata_text
from bert_ds.files import FileUnit

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# header = magic (9) + version u64 (8) + dtype code u8 (1) + sequence count u64 (8) + document count u64 (8)
HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8
# Megatron picks uint16 below this vocabulary size (not 65,536: it keeps headroom for added tokens).
UINT16_VOCAB_LIMIT = 65500
# index arrays are streamed through memory in pieces of this many entries
_CHUNK = 1 << 20
# merge copies this many documents at a time (bounded memory, few Python calls)
_MERGE_DOCS = 1 << 14


class DTypeCode(IntEnum):
    """Numeric dtype codes of the .idx header, as Megatron's ``DType`` enum."""

    uint8 = 1
    int8 = 2
    int16 = 3
    int32 = 4
    int64 = 5
    float64 = 6
    float32 = 7
    uint16 = 8

    @classmethod
    def of(cls, dtype: np.dtype | type) -> DTypeCode:
        return cls[np.dtype(dtype).name]

    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.name)


class IndexedDatasetError(ValueError):
    """A shard file pair is missing, truncated, corrupt or of the wrong format."""


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 halves the shard size and fits any BERT vocabulary (30,522 for English)."""
    return np.dtype(np.uint16) if vocab_size < UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


class IndexedDatasetWriter:
    """Streams documents into ``PREFIX.bin`` / ``PREFIX.idx`` (and ``PREFIX.json`` with :meth:`finalize`'s metadata).

    Use as a context manager, or call :meth:`finalize`; the files appear only then, together.
    ``sidecars`` are further files of the same unit (e.g. ``bert_ds.data.word_boundaries``' ``PREFIX.words``):
    the caller writes each to :meth:`temp_path` before :meth:`finalize`, which commits them with the pair,
    before the ``.json``.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type, sidecars: Sequence[str | os.PathLike] = ()):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        DTypeCode.of(self.dtype)  # reject dtypes the format has no code for
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self.max_token_id: int | None = None  # recorded in the metadata: a run checks it against its vocabulary
        self._sidecars = [Path(p) for p in sidecars]
        self._unit = FileUnit([bin_path(self.prefix), idx_path(self.prefix), *self._sidecars, metadata_path(self.prefix)])
        self._bin_partial = self._unit.temp(bin_path(self.prefix))
        self._lengths_spool = Path(f"{self.prefix}.lengths.partial")
        self._docs_spool = Path(f"{self.prefix}.docs.partial")
        self._bin = open(self._bin_partial, "wb")
        self._lengths = open(self._lengths_spool, "wb")
        self._docs = open(self._docs_spool, "wb")

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def temp_path(self, sidecar: str | os.PathLike) -> Path:
        """Where to write ``sidecar`` (one of the constructor's) until :meth:`finalize` commits it."""
        return self._unit.temp(sidecar)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def add_documents(
        self,
        tokens: np.ndarray,
        sequence_lengths: np.ndarray,
        document_sequence_counts: np.ndarray,
    ) -> None:
        """Append whole documents at once (the fast path used by the preprocessor).

        Args:
            tokens: all token ids of the documents, concatenated.
            sequence_lengths: tokens per sequence (sentence); sums to ``len(tokens)``.
            document_sequence_counts: sequences per document; sums to ``len(sequence_lengths)``.
        """
        sequence_lengths = np.asarray(sequence_lengths, dtype=np.int32)
        document_sequence_counts = np.asarray(document_sequence_counts, dtype=np.int64)
        if int(sequence_lengths.sum()) != len(tokens):
            raise ValueError("sequence lengths do not add up to the number of tokens")
        if int(document_sequence_counts.sum()) != len(sequence_lengths):
            raise ValueError("document sequence counts do not add up to the number of sequences")
        # the reader refuses these (an empty sentence would become an empty segment): never write them
        if (document_sequence_counts <= 0).any():
            raise ValueError(f"{self.prefix}: document {self.num_documents + int(np.argmax(document_sequence_counts <= 0))} has no sentence")
        if (sequence_lengths <= 0).any():
            raise ValueError(f"{self.prefix}: sentence {self.num_sequences + int(np.argmax(sequence_lengths <= 0))} is empty")
        tokens = np.asarray(tokens)
        if len(tokens):
            low, high = int(tokens.min()), int(tokens.max())
            info = np.iinfo(self.dtype)
            if low < max(info.min, 0) or high > info.max:
                raise ValueError(f"{self.prefix}: token id {low if low < 0 else high} does not fit {self.dtype.name}")
            self.max_token_id = high if self.max_token_id is None else max(self.max_token_id, high)
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self._lengths.write(sequence_lengths.tobytes())
        # document index entries are the running sequence count at each document's end
        ends = self.num_sequences + np.cumsum(document_sequence_counts, dtype=np.int64)
        self._docs.write(ends.tobytes())
        self.num_tokens += len(tokens)
        self.num_sequences += len(sequence_lengths)
        self.num_documents += len(document_sequence_counts)

    def add_document(self, sequences: Sequence[Sequence[int]]) -> None:
        """Append one document given as a list of token-id sequences."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int32)
        # int64 first: add_documents checks that every id fits the shard's dtype (a cast would wrap silently)
        tokens = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if sequences else np.zeros(0, np.int64)
        self.add_documents(tokens, lengths, np.array([len(sequences)]))

    def finalize(self, metadata: dict | None = None) -> None:
        """Write the index and commit the unit; ``metadata`` (``counts`` and ``max_token_id`` filled in here) becomes ``PREFIX.json``.

        Without metadata, no ``PREFIX.json`` is left: a stale one would describe other data.
        """
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        idx_partial = self._unit.temp(idx_path(self.prefix))
        with open(idx_partial, "wb") as out:
            out.write(INDEX_HEADER)
            out.write(struct.pack("<Q", INDEX_VERSION))
            out.write(struct.pack("<B", DTypeCode.of(self.dtype)))
            out.write(struct.pack("<Q", self.num_sequences))
            out.write(struct.pack("<Q", self.num_documents + 1))
            _copy_file(self._lengths_spool, out)
            # pointers: byte offset of each sequence in .bin, a running sum carried across pieces
            lengths = np.fromfile(self._lengths_spool, dtype=np.int32)
            offset = 0
            for start in range(0, len(lengths), _CHUNK):
                piece = lengths[start : start + _CHUNK].astype(np.int64) * self.dtype.itemsize
                pointers = np.empty_like(piece)
                pointers[0:1] = offset
                np.cumsum(piece[:-1], out=pointers[1:])
                pointers[1:] += offset
                offset += int(piece.sum())
                out.write(pointers.tobytes())
            del lengths
            out.write(np.zeros(1, dtype=np.int64).tobytes())  # document indices start at 0
            _copy_file(self._docs_spool, out)
        self._lengths_spool.unlink()
        self._docs_spool.unlink()
        json_path = metadata_path(self.prefix)
        if metadata is None:
            json_path.unlink(missing_ok=True)
            self._unit = FileUnit([bin_path(self.prefix), idx_path(self.prefix), *self._sidecars])  # the same temporary names
        else:
            counts = {"documents": self.num_documents, "sentences": self.num_sequences, "tokens": self.num_tokens}
            meta = {**metadata, "counts": counts, "max_token_id": self.max_token_id}
            self._unit.temp(json_path).write_text(metadata_text(meta), encoding="utf-8")
        self._unit.commit()

    def abort(self) -> None:
        """Remove everything written so far; the previous files under the prefix stay as they were."""
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        for p in (self._lengths_spool, self._docs_spool):
            p.unlink(missing_ok=True)
        self._unit.abort()


def _copy_file(src: Path, out) -> None:
    with open(src, "rb") as f:
        while block := f.read(1 << 24):
            out.write(block)


class IndexedDataset:
    """Memory-mapped reader. ``ds[i]`` is sequence (sentence) ``i`` as a numpy array.

    Nothing is copied at open time, so opening a 100 GB shard costs only the header read and the
    size checks. Nothing inside the arrays is trusted until checked: :meth:`check_index` reads the
    index (not the tokens) and is what the trainer runs on every shard it opens; :meth:`verify` adds
    every token id (``inspect --verify``).
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx, binf = idx_path(prefix), bin_path(prefix)
        for p in (idx, binf):
            if not p.exists():
                raise IndexedDatasetError(f"{p}: file not found (expected the pair {idx.name} + {binf.name})")
        idx_size = idx.stat().st_size
        with open(idx, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            raise IndexedDatasetError(f"{idx}: truncated header ({len(header)} of {HEADER_SIZE} bytes)")
        magic = header[: len(INDEX_HEADER)]
        if magic != INDEX_HEADER:
            raise IndexedDatasetError(f"{idx}: bad magic {magic!r}, expected {INDEX_HEADER!r} (not a Megatron/bert-ds index file)")
        pos = len(INDEX_HEADER)
        (version,) = struct.unpack_from("<Q", header, pos)
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{idx}: unsupported index version {version}, this reader knows version {INDEX_VERSION}")
        (code,) = struct.unpack_from("<B", header, pos + 8)
        try:
            self.dtype = DTypeCode(code).numpy_dtype()
        except ValueError:
            raise IndexedDatasetError(f"{idx}: unknown dtype code {code} (known: 1-8)") from None
        self.num_sequences, num_doc_indices = struct.unpack_from("<QQ", header, pos + 9)
        if num_doc_indices < 1:
            raise IndexedDatasetError(f"{idx}: document index count is 0; it must be at least 1 (the leading 0)")
        self.num_documents = num_doc_indices - 1
        expected = HEADER_SIZE + self.num_sequences * (4 + 8) + num_doc_indices * 8
        # Megatron's multimodal variant appends one int8 mode per sequence; accept and ignore it.
        if idx_size not in (expected, expected + self.num_sequences):
            raise IndexedDatasetError(
                f"{idx}: size {idx_size} bytes does not match its header "
                f"({self.num_sequences} sequences, {num_doc_indices} document indices -> {expected} bytes); "
                "the file is truncated or corrupt"
            )
        self._idx_map = np.memmap(idx, mode="r", dtype=np.uint8)
        buf = memoryview(self._idx_map)
        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=self.num_sequences, offset=offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=self.num_sequences, offset=offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=num_doc_indices, offset=offset)
        bin_size = binf.stat().st_size
        if self.num_sequences:
            end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        else:
            end = 0
        if end != bin_size:
            raise IndexedDatasetError(
                f"{binf}: size {bin_size} bytes, but {idx.name} says the last sequence ends at byte {end}; "
                "the .bin is truncated or belongs to another index"
            )
        # an empty file cannot be memory-mapped
        self._bin_map = np.memmap(binf, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)
        self.tokens = np.frombuffer(memoryview(self._bin_map), dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sequence_lengths[i])]

    def document_range(self, doc: int) -> range:
        """Sequence indices of document ``doc``."""
        return range(int(self.document_indices[doc]), int(self.document_indices[doc + 1]))

    def document(self, doc: int) -> list[np.ndarray]:
        return [self[i] for i in self.document_range(doc)]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def check_index(self) -> None:
        """The checks that read the index but not the tokens; raises :class:`IndexedDatasetError` naming the problem.

        Document indices rise from 0 to the number of sentences, every document has a sentence, every sentence a
        token, and every pointer is where the lengths before it put it. With the sizes checked at open, every
        sentence then lies inside ``.bin``: nothing read later can index out of bounds or size an allocation.
        """
        idx = idx_path(self.prefix)
        docs = self.document_indices
        if docs[0] != 0:
            raise IndexedDatasetError(f"{idx}: document indices must start at 0, found {int(docs[0])}")
        if docs[-1] != self.num_sequences:
            raise IndexedDatasetError(f"{idx}: the last document ends at sentence {int(docs[-1])}, but there are {self.num_sequences} sentences")
        for start in range(0, self.num_documents, _CHUNK):
            steps = np.diff(docs[start : start + _CHUNK + 1])
            if (steps <= 0).any():
                bad = start + int(np.argmax(steps <= 0))
                if steps[bad - start] < 0:
                    raise IndexedDatasetError(f"{idx}: document indices decrease at document {bad} ({int(docs[bad])} -> {int(docs[bad + 1])})")
                raise IndexedDatasetError(f"{idx}: document {bad} has no sentence (bert-ds writes none; rewrite the shard with data_tools.preprocess)")
        offset = 0
        for start in range(0, self.num_sequences, _CHUNK):
            lengths = self.sequence_lengths[start : start + _CHUNK].astype(np.int64)
            if (lengths <= 0).any():
                bad = start + int(np.argmax(lengths <= 0))
                what = "is empty" if lengths[bad - start] == 0 else f"has a negative length {int(lengths[bad - start])}"
                raise IndexedDatasetError(f"{idx}: sentence {bad} {what} (bert-ds writes no empty sentence; rewrite the shard with data_tools.preprocess)")
            nbytes = lengths * self.dtype.itemsize
            expected = offset + np.concatenate([[0], np.cumsum(nbytes[:-1])])
            actual = self.sequence_pointers[start : start + _CHUNK]
            if not np.array_equal(expected, actual):
                bad = start + int(np.argmax(expected != actual))
                raise IndexedDatasetError(f"{idx}: pointer of sentence {bad} is {int(self.sequence_pointers[bad])}, expected {int(expected[bad - start])}")
            offset += int(nbytes.sum())

    def verify(self, vocab_size: int | None = None) -> int | None:
        """Check the whole file pair (the index as :meth:`check_index`, then every token id); returns the largest token id.

        Raises :class:`IndexedDatasetError` naming the problem.
        """
        self.check_index()
        largest = None
        for start in range(0, self.num_tokens, _CHUNK * 8):
            piece = self.tokens[start : start + _CHUNK * 8]
            low, high = int(piece.min()), int(piece.max())
            if low < 0 or (vocab_size is not None and high >= vocab_size):
                bad = start + int(np.argmax((piece < 0) | (piece >= (vocab_size if vocab_size is not None else np.inf))))
                raise IndexedDatasetError(
                    f"{bin_path(self.prefix)}: token id {int(self.tokens[bad])} at position {bad} is outside the vocabulary"
                    + (f" (size {vocab_size})" if vocab_size is not None else "")
                )
            largest = high if largest is None else max(largest, high)
        return largest


def merge_datasets(
    prefixes: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    metadata: dict | None = None,
    sidecars: Mapping[Path, Callable[[Path], None]] | None = None,
) -> IndexedDataset:
    """Concatenate datasets in order; the result equals one dataset built from all their documents.

    ``metadata`` (counts filled in) is committed with the merged pair as ``OUTPUT_PREFIX.json``;
    ``sidecars`` maps further files of the unit to a function that writes one to the temporary path it is given.
    """
    if not prefixes:
        raise ValueError("nothing to merge")
    datasets = [IndexedDataset(p) for p in prefixes]
    for ds in datasets:
        ds.check_index()  # the document ranges below come from these arrays
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) != 1:
        names = ", ".join(f"{ds.prefix}: {ds.dtype}" for ds in datasets)
        raise IndexedDatasetError(f"cannot merge shards with different token dtypes ({names})")
    sidecars = dict(sidecars or {})
    writer = IndexedDatasetWriter(output_prefix, datasets[0].dtype, sidecars=list(sidecars))
    try:
        for path, write in sidecars.items():
            write(writer.temp_path(path))
        for ds in datasets:
            for start in range(0, ds.num_documents, _MERGE_DOCS):
                stop = min(start + _MERGE_DOCS, ds.num_documents)
                first_seq, last_seq = int(ds.document_indices[start]), int(ds.document_indices[stop])
                first_tok = int(ds.sequence_pointers[first_seq]) // ds.dtype.itemsize if first_seq < ds.num_sequences else ds.num_tokens
                last_tok = int(ds.sequence_pointers[last_seq]) // ds.dtype.itemsize if last_seq < ds.num_sequences else ds.num_tokens
                writer.add_documents(
                    ds.tokens[first_tok:last_tok],
                    ds.sequence_lengths[first_seq:last_seq],
                    np.diff(ds.document_indices[start : stop + 1]),
                )
    except BaseException:
        writer.abort()
        raise
    writer.finalize(metadata)
    return IndexedDataset(output_prefix)
