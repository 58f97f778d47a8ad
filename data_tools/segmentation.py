"""Chinese word segmentation at preprocessing time: which CJK tokens continue a word (for whole-word masking).

The segmenter is jieba's algorithm through ``rjieba`` (the maintained binding of the Rust port
jieba-rs: ~16 MB/s of Chinese on one core here, where Python ``jieba``, last released in 2020, runs
~0.4 MB/s), with its built-in dictionary, HMM for words the dictionary lacks, and optional user
dictionaries in jieba's format (``--user-dict FILE``; ``rjieba.Jieba.add_word``).

Alignment (:func:`encode_segmented`): BERT's normalizer puts spaces around every CJK character, so
each becomes one token (its own id or [UNK]) and the text between CJK characters is tokenized on its
own. A sentence is therefore cut into pieces, single CJK characters and the runs between them, and
the pieces are encoded as they are: the ids are exactly those of the whole sentence (tested), and the
token of every CJK character is known. Characters 2..n of a segmented word made only of CJK
characters are continuations; words are segmented per sentence, so none crosses a sentence end.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import normalizers, pre_tokenizers

from bert_ds.data.word_boundaries import CJK_CHARACTER_CLASS, NO_SEGMENTER, codepoints, is_cjk_codepoint
from data_tools.tokenizer import SentenceEncoder

SEGMENTERS = (NO_SEGMENTER, "jieba")
# jieba's user dictionary line: a word, then optionally a frequency and a part-of-speech tag (jieba's re_userdict)
_USER_DICT_LINE = re.compile(r"^(.+?)( [0-9]+)?( [a-z]+)?$")
# one CJK character, or a run of anything else
_PIECES = re.compile(f"[{CJK_CHARACTER_CLASS}]|[^{CJK_CHARACTER_CLASS}]+")


class SegmentationError(ValueError):
    """Bad segmenter settings, an unreadable user dictionary, or a tokenizer the alignment does not hold for."""


@dataclass(frozen=True)
class UserDictionary:
    """A parsed jieba user dictionary: ``(word, frequency or None, tag or None)`` per line, and the file's identity."""

    path: str
    sha256: str
    entries: tuple[tuple[str, int | None, str | None], ...]

    def to_json(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "words": len(self.entries)}


def read_user_dictionary(path: str | Path) -> UserDictionary:
    """Parse a jieba user dictionary (UTF-8, one ``word [freq] [tag]`` per line, blank lines allowed).

    Raises SegmentationError naming the file and line of anything it cannot read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SegmentationError(f"--user-dict {path}: cannot read ({e.strerror})") from None
    entries = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff").strip()
        except UnicodeDecodeError as e:
            raise SegmentationError(f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if not line:
            continue
        word, freq, tag = _USER_DICT_LINE.match(line).groups()  # the pattern matches any non-empty line
        if any(c.isspace() for c in word):
            raise SegmentationError(f"{path}:{number}: {line!r} is not 'word [frequency] [tag]' (a word has no spaces; "
                                    "a frequency is a whole number, a tag lower-case letters)")
        entries.append((word, int(freq) if freq else None, tag.strip() if tag else None))
    if not entries:
        raise SegmentationError(f"{path}: no words (expected one 'word [frequency] [tag]' per line)")
    return UserDictionary(str(path.resolve()), hashlib.sha256(data).hexdigest(), tuple(entries))


@dataclass(frozen=True)
class SegmenterSpec:
    """What a worker needs to build the segmenter (picklable; the segmenter itself is not)."""

    name: str = NO_SEGMENTER
    user_dictionaries: tuple[UserDictionary, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in SEGMENTERS:
            raise SegmentationError(f"--word-segmenter {self.name!r}: choose one of {', '.join(SEGMENTERS)}")
        if self.user_dictionaries and self.name == NO_SEGMENTER:
            raise SegmentationError("--user-dict needs --word-segmenter jieba")

    @property
    def enabled(self) -> bool:
        return self.name != NO_SEGMENTER

    def build(self):
        """An ``rjieba.Jieba`` with the user dictionaries added, in order (a later entry wins)."""
        import rjieba

        jieba = rjieba.Jieba()
        for d in self.user_dictionaries:
            for word, freq, tag in d.entries:
                jieba.add_word(word, freq, tag)
        return jieba

    def metadata(self) -> dict:
        """The shard metadata's ``word_segmentation`` entry, without the counts."""
        if not self.enabled:
            return {"segmenter": NO_SEGMENTER}
        return {
            "segmenter": self.name,
            "library": "rjieba",
            "library_version": importlib.metadata.version("rjieba"),
            "hmm": True,
            "user_dictionaries": [d.to_json() for d in self.user_dictionaries],
            "unit": "characters 2..n of all-CJK words, segmented per sentence",
        }


def check_tokenizer(encoder: SentenceEncoder) -> None:
    """The alignment needs BERT's normalizer with Chinese-character splitting and BERT's pre-tokenizer."""
    norm = encoder.tok.normalizer
    if not (isinstance(norm, normalizers.BertNormalizer) and norm.handle_chinese_chars
            and isinstance(encoder.tok.pre_tokenizer, pre_tokenizers.BertPreTokenizer)):
        raise SegmentationError(
            "--word-segmenter needs a BERT WordPiece tokenizer that makes every Chinese character one token "
            f"(BertNormalizer with handle_chinese_chars, BertPreTokenizer); this one has {norm!r}"
        )


def continuation_chars(jieba, sentences: list[str]) -> np.ndarray:
    """bool per character of ``"".join(sentences)``: the character continues an all-CJK word (segmented per sentence)."""
    words: list[str] = []
    for s in sentences:
        words += jieba.cut(s)
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    cps = codepoints("".join(sentences))
    if int(lengths.sum()) != cps.size:
        raise SegmentationError(f"the segmenter returned {int(lengths.sum())} characters for {cps.size}; it must keep every character")
    lengths = lengths[lengths > 0]
    starts = np.cumsum(lengths) - lengths
    is_cjk = is_cjk_codepoint(cps)
    all_cjk = np.logical_and.reduceat(is_cjk, starts) if starts.size else np.zeros(0, bool)
    continues = np.repeat(all_cjk, lengths)
    continues[starts] = False
    return continues


def encode_segmented(encoder: SentenceEncoder, jieba, sentences: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``encoder.encode(sentences)`` plus one flag per token: True where it continues a segmented Chinese word."""
    if not sentences:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    continues = continuation_chars(jieba, sentences)
    pieces: list[str] = []
    pieces_per_sentence = np.empty(len(sentences), np.int64)
    for i, s in enumerate(sentences):
        found = _PIECES.findall(s)
        pieces += found
        pieces_per_sentence[i] = len(found)
    ids, piece_tokens = encoder.encode(pieces)
    piece_chars = np.fromiter(map(len, pieces), np.int64, len(pieces))
    first_char = np.cumsum(piece_chars) - piece_chars
    cjk_piece = is_cjk_codepoint(codepoints("".join(p[0] for p in pieces)))  # a CJK piece is one character
    if (piece_tokens[cjk_piece] != 1).any():
        bad = pieces[int(np.flatnonzero(cjk_piece & (piece_tokens != 1))[0])]
        raise SegmentationError(f"the tokenizer made {bad!r} into {int(piece_tokens[pieces.index(bad)])} tokens; "
                                "whole-word masking needs one token per Chinese character")
    first_token = np.cumsum(piece_tokens) - piece_tokens
    flags = np.zeros(ids.size, dtype=bool)
    flags[first_token[cjk_piece]] = continues[first_char[cjk_piece]]
    bounds = np.concatenate(([0], np.cumsum(piece_tokens)))[np.concatenate(([0], np.cumsum(pieces_per_sentence)))]
    return ids, np.diff(bounds), flags
