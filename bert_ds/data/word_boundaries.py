"""Chinese word boundaries beside a shard (``PREFIX.words``): which CJK tokens continue a segmented word.

BERT's tokenizer makes every CJK character a token of its own, so ``##`` pieces say nothing
about Chinese words; a word segmenter does (``data_tools.preprocess --word-segmenter jieba``).
What it found is stored beside the shard, not in it, so ``.bin``/``.idx`` stay Megatron's format.

``PREFIX.words``, all integers little-endian:

| offset | size | field |
|---|---|---|
| 0 | 8 | magic ``BDSWORDS`` |
| 8 | 8 | uint64 version, 1 |
| 16 | 8 | uint64 T: tokens in ``PREFIX.bin`` |
| 24 | ceil(T/8) | one bit per token, packed little-endian (bit k of byte j is token 8j+k); padding bits 0 |

A bit is 1 when its token is character 2..n of a segmented word made only of CJK characters: the
token continues the word of the token before it. Segmentation runs per sentence, so the first token
of a sentence never has its bit set. e.g. the sentence ``我们喜欢 BERT 模型`` -> jieba
``[我们, 喜欢, " ", BERT, " ", 模型]`` -> tokens ``[我, 们, 喜, 欢, bert, 模, 型]`` -> bits
``[0, 1, 0, 1, 0, 0, 1]``. English words keep their ``##`` pieces, read from the vocabulary at masking time.

The file is one more member of the shard's ``FileUnit`` (``.bin``, ``.idx``, ``.words``, then the
``.json`` marker), and it counts only when the ``.json`` records a ``word_segmentation`` that made
it: a ``.words`` left by an earlier run under the same prefix is never read.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bert_ds.data.indexed_dataset import IndexedDataset
from bert_ds.data.metadata import MetadataError, read_metadata

WORDS_HEADER = b"BDSWORDS"
WORDS_VERSION = 1
HEADER_SIZE = len(WORDS_HEADER) + 8 + 8
METADATA_KEY = "word_segmentation"
"""Key of the shard metadata describing the segmentation (segmenter, library, version, user dictionaries, counts)."""
NO_SEGMENTER = "none"

# BERT's _is_chinese_char (Google's tokenization.py, Hugging Face's BertNormalizer): exactly the
# characters the tokenizer cuts into one token each; kana, hangul and CJK punctuation are not among them
CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip
CJK_CHARACTER_CLASS = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in CJK_RANGES)
"""The ranges as the inside of a ``re`` character class."""

# bits are checked and counted this many tokens at a time (1 MiB of bits)
_CHUNK_TOKENS = 1 << 23


class WordBoundaryError(ValueError):
    """A word-boundary file is missing, corrupt, inconsistent with its shard, or needed and absent."""


def words_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.words")


def is_cjk_codepoint(codepoints: np.ndarray) -> np.ndarray:
    """bool per code point: one of BERT's CJK characters."""
    out = np.zeros(codepoints.shape, dtype=bool)
    for lo, hi in CJK_RANGES:
        out |= (codepoints >= lo) & (codepoints <= hi)
    return out


def codepoints(text: str) -> np.ndarray:
    """The code points of ``text`` (one per Python character) as uint32, without a Python loop."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def cjk_token_table(tokens: Sequence[str]) -> np.ndarray:
    """``table[id]`` is True for vocabulary entries that are one CJK character (the tokens Chinese text becomes)."""
    single = np.fromiter((ord(t) if len(t) == 1 else 0 for t in tokens), np.uint32, len(tokens))
    return is_cjk_codepoint(single)


class WordFlagsWriter:
    """Streams bits into a ``.words`` file: :meth:`add` any number of flags, then :meth:`close` (writes the count)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.num_tokens = 0
        self.num_continuations = 0
        self._carry = np.zeros(0, dtype=bool)  # < 8 bits not yet packed into a byte
        self._file = open(self.path, "wb")
        self._file.write(self._header(0))

    @staticmethod
    def _header(num_tokens: int) -> bytes:
        return WORDS_HEADER + struct.pack("<QQ", WORDS_VERSION, num_tokens)

    def add(self, flags: np.ndarray) -> None:
        flags = np.asarray(flags, dtype=bool)
        self.num_tokens += flags.size
        self.num_continuations += int(np.count_nonzero(flags))
        if self._carry.size:
            flags = np.concatenate([self._carry, flags])
        whole = flags.size - flags.size % 8
        self._file.write(np.packbits(flags[:whole], bitorder="little").tobytes())
        self._carry = flags[whole:].copy()

    def close(self) -> None:
        if self._file.closed:
            return
        if self._carry.size:
            self._file.write(np.packbits(self._carry, bitorder="little").tobytes())  # pads with zero bits
        self._file.seek(0)
        self._file.write(self._header(self.num_tokens))
        self._file.close()


class WordFlags:
    """Memory-mapped reader of ``PREFIX.words``; checks the header and the size against the shard's token count."""

    def __init__(self, prefix: str | os.PathLike, num_tokens: int):
        self.path = words_path(prefix)
        if not self.path.exists():
            raise WordBoundaryError(f"{self.path}: file not found, but {prefix}.json records a word segmentation; "
                                    "the shard is incomplete: re-run data_tools.preprocess")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[: len(WORDS_HEADER)] != WORDS_HEADER:
            raise WordBoundaryError(f"{self.path}: not a word-boundary file (bad or truncated header)")
        version, self.num_tokens = struct.unpack_from("<QQ", header, len(WORDS_HEADER))
        if version != WORDS_VERSION:
            raise WordBoundaryError(f"{self.path}: unsupported version {version}, this reader knows version {WORDS_VERSION}")
        if self.num_tokens != num_tokens:
            raise WordBoundaryError(f"{self.path}: describes {self.num_tokens} tokens, but {prefix}.bin has {num_tokens}; "
                                    "it belongs to other data")
        expected = HEADER_SIZE + (self.num_tokens + 7) // 8
        if size != expected:
            raise WordBoundaryError(f"{self.path}: size {size} bytes, expected {expected} for {self.num_tokens} tokens; truncated or corrupt")
        self._map = np.memmap(self.path, mode="r", dtype=np.uint8, offset=HEADER_SIZE) if self.num_tokens else np.zeros(0, np.uint8)

    def __getstate__(self) -> dict:
        # a memory map would be pickled as a full copy (spawn/forkserver workers): reopen instead
        return {"prefix": str(self.path)[: -len(".words")], "num_tokens": self.num_tokens}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"], state["num_tokens"])

    def window(self, start: int, length: int) -> np.ndarray:
        """bool[length]: the bits of tokens ``[start, start + length)``."""
        first = start >> 3
        bits = np.unpackbits(self._map[first : (start + length + 7) >> 3], bitorder="little")
        offset = start - 8 * first
        return bits[offset : offset + length].view(bool)

    def bits_at(self, positions: np.ndarray) -> np.ndarray:
        """bool per token position (any order)."""
        positions = np.asarray(positions, dtype=np.int64)
        return ((self._map[positions >> 3] >> (positions & 7).astype(np.uint8)) & 1).astype(bool)

    def count(self) -> int:
        """Number of set bits (continuation tokens)."""
        return sum(int(np.unpackbits(self._map[i : i + _CHUNK_TOKENS // 8]).sum()) for i in range(0, len(self._map), _CHUNK_TOKENS // 8))


def write_concatenation(prefixes: Sequence[str | os.PathLike], num_tokens: Sequence[int], out: Path) -> None:
    """Write the ``.words`` of shards merged in this order (their bits end to end) to ``out``."""
    writer = WordFlagsWriter(out)
    try:
        for prefix, n in zip(prefixes, num_tokens, strict=True):
            flags = WordFlags(prefix, n)
            for start in range(0, n, _CHUNK_TOKENS):
                writer.add(flags.window(start, min(_CHUNK_TOKENS, n - start)))
    finally:
        writer.close()


def segmentation_of(prefix: str | os.PathLike, meta: dict | None = None) -> dict | None:
    """The shard's ``word_segmentation`` metadata when a segmenter made a ``.words`` for it, else None."""
    meta = read_metadata(prefix) if meta is None else meta
    seg = meta.get(METADATA_KEY)
    return seg if isinstance(seg, dict) and seg.get("segmenter", NO_SEGMENTER) != NO_SEGMENTER else None


def verify(ds: IndexedDataset, meta: dict, vocab_tokens: Sequence[str] | None = None) -> list[str]:
    """Check ``PREFIX.words`` against its shard and metadata; returns what was checked, raises WordBoundaryError.

    Args:
        ds: the shard.
        meta: its metadata (``read_metadata``).
        vocab_tokens: the vocabulary in id order; when given, every continuation and the token before it
            must be a CJK character token or [UNK] (words are all-CJK).
    """
    prefix, tokens = ds.prefix, ds.tokens
    seg = segmentation_of(prefix, meta)
    path = words_path(prefix)
    if seg is None:
        if path.exists():
            raise WordBoundaryError(f"{path}: present, but {prefix}.json records no word segmentation; "
                                    "a leftover of an earlier run under this prefix: delete it")
        return []
    flags = WordFlags(prefix, len(tokens))
    if flags.num_tokens % 8 and len(flags._map) and flags._map[-1] >> (flags.num_tokens % 8):
        raise WordBoundaryError(f"{path}: padding bits after the last token are not zero")
    for i in range(0, ds.num_sequences, _CHUNK_TOKENS):
        starts = np.asarray(ds.sequence_pointers[i : i + _CHUNK_TOKENS]) // ds.dtype.itemsize
        bad = np.flatnonzero(flags.bits_at(starts))
        if bad.size:
            raise WordBoundaryError(f"{path}: sentence {i + int(bad[0])} starts with a word continuation; words never cross sentences")
    checked = ["word-boundary header and size", "no word crosses a sentence"]
    total = 0
    allowed = None
    if vocab_tokens is not None:
        allowed = cjk_token_table(vocab_tokens)
        if "[UNK]" in vocab_tokens:
            allowed[vocab_tokens.index("[UNK]")] = True  # a character outside the vocabulary is still one token
        checked.append("continuations are CJK tokens after CJK tokens")
    for start in range(0, flags.num_tokens, _CHUNK_TOKENS):
        n = min(_CHUNK_TOKENS, flags.num_tokens - start)
        bits = flags.window(start, n)
        total += int(np.count_nonzero(bits))
        if allowed is not None:
            at = np.flatnonzero(bits) + start
            ok = allowed[tokens[at]] & allowed[tokens[at - 1]]  # at >= 1: token 0 starts sentence 0
            if not ok.all():
                pos = int(at[np.argmax(~ok)])
                raise WordBoundaryError(f"{path}: token {pos} (id {int(tokens[pos])}, {vocab_tokens[int(tokens[pos])]!r}) is marked "
                                        f"as continuing a Chinese word after {vocab_tokens[int(tokens[pos - 1])]!r}; only CJK characters join words")
    recorded = seg.get("continuations")
    if recorded is not None and recorded != total:
        raise WordBoundaryError(f"{prefix}.json: metadata says {recorded} word continuations, {path} has {total}")
    checked.append("word continuation count")
    return checked


def count_cjk_tokens(tokens: np.ndarray, is_cjk_token: np.ndarray, stop_at_first: bool = False) -> int:
    """CJK character tokens in ``tokens`` (counted in pieces; with ``stop_at_first``, 0 or 1)."""
    total = 0
    for start in range(0, len(tokens), _CHUNK_TOKENS):
        total += int(np.count_nonzero(is_cjk_token[tokens[start : start + _CHUNK_TOKENS]]))
        if stop_at_first and total:
            return 1
    return total


def for_whole_word_masking(prefix: str | os.PathLike, tokens: np.ndarray, is_cjk_token: np.ndarray) -> WordFlags | None:
    """What whole-word masking of this shard needs: its word boundaries, or None when it holds no Chinese.

    A shard asks for Chinese whole-word masking when it holds CJK character tokens. Those need the
    ``.words`` of a segmenter; without one, the run stops here naming the shard (masking Chinese
    character by character under ``data.whole_word_mask: true`` would be silently something else).
    Whether a shard without ``.words`` holds CJK tokens: its metadata's count when preprocess recorded
    one, else a scan of its tokens (stopping at the first).
    """
    try:
        meta = read_metadata(prefix)
    except MetadataError as e:
        raise WordBoundaryError(str(e)) from None
    if segmentation_of(prefix, meta) is not None:
        return WordFlags(prefix, len(tokens))
    recorded = (meta.get(METADATA_KEY) or {}).get("cjk_tokens")
    has_cjk = recorded > 0 if isinstance(recorded, int) else count_cjk_tokens(tokens, is_cjk_token, stop_at_first=True) > 0
    if has_cjk:
        counted = f"{recorded:,} Chinese character tokens" if isinstance(recorded, int) else "Chinese character tokens"
        raise WordBoundaryError(
            f"{prefix}: data.whole_word_mask is true and this shard holds {counted}, but it has no word segmentation "
            f"({words_path(prefix).name}): re-run data_tools.preprocess with --word-segmenter jieba for Chinese whole-word "
            "masking, or set data.whole_word_mask: false to mask Chinese character by character"
        )
    return None
