"""Chinese word segmentation at preprocessing time: which CJK tokens continue a word (for whole-word masking).

The segmenter is jieba's algorithm through ``rjieba`` (the maintained binding of the Rust port
jieba-rs: ~16 MB/s of Chinese on one core here, where Python ``jieba``, last released in 2020, runs
~0.4 MB/s), with its built-in dictionary, HMM for words the dictionary lacks, and optional user
dictionaries in jieba's format (``--user-dict FILE``; ``rjieba.Jieba.add_word``).

Alignment (:class:`SegmentedEncoder`): BERT's normalizer puts spaces around every CJK character, so
each becomes one token (its own id or [UNK]) and the text between CJK characters is tokenized on its
own. A sentence is therefore cut into units, single CJK characters and the runs between them, and
the units are encoded as they are: the ids are exactly those of the whole sentence (tested: the
``.bin``/``.idx`` equal those written without a segmenter), and the token of every CJK character is known. Characters 2..n of a segmented word made only of CJK
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

from bert_ds.data.word_boundaries import NO_SEGMENTER, codepoints, is_cjk_codepoint
from data_tools.tokenizer import SentenceEncoder

SEGMENTERS = (NO_SEGMENTER, "jieba")
# jieba's user dictionary line: a word, then optionally a frequency and a part-of-speech tag (jieba's re_userdict)
_USER_DICT_LINE = re.compile(r"^(.+?)( [0-9]+)?( [a-z]+)?$")


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


class SegmentedEncoder:
    """``encoder.encode(sentences)`` plus one flag per token: True where it continues a segmented Chinese word.

    A CJK character is one token whatever surrounds it, so only the runs between CJK characters go through
    ``encoder``; each character's id comes from a code point -> id table filled, for each new character,
    by the same encoder (exact by construction, and one numpy gather per batch instead of a word each).
    """

    def __init__(self, encoder: SentenceEncoder, jieba):
        check_tokenizer(encoder)
        self.encoder, self.jieba = encoder, jieba
        self._char_ids = np.full(0x30000, -1, dtype=np.int64)  # BERT's CJK ranges end below U+30000

    def _ids_of(self, cps: np.ndarray) -> np.ndarray:
        new = np.unique(cps[self._char_ids[cps] < 0])
        if new.size:
            chars = [chr(c) for c in new.tolist()]
            ids, lengths = self.encoder.encode(chars)
            if (lengths != 1).any():
                bad = chars[int(np.argmax(lengths != 1))]
                raise SegmentationError(f"the tokenizer made {bad!r} into {int(lengths[np.argmax(lengths != 1)])} tokens; "
                                        "whole-word masking needs one token per Chinese character")
            self._char_ids[new] = ids
        return self._char_ids[cps]

    def encode(self, sentences: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids of all sentences end to end, ids per sentence, continuation flag per id)."""
        if not sentences:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
        continues = continuation_chars(self.jieba, sentences)
        text = "".join(sentences)
        cps = codepoints(text)
        is_cjk = is_cjk_codepoint(cps)
        chars_per_sentence = np.fromiter(map(len, sentences), np.int64, len(sentences))
        sentence_start = np.zeros(cps.size + 1, dtype=bool)
        sentence_start[np.cumsum(chars_per_sentence) - chars_per_sentence] = True
        # units in text order: every CJK character, and every maximal run of other characters within a sentence
        # e.g. sentences ["我用 BERT。", "好"] -> units 我 | 用 | " BERT。" | 好
        boundary = np.empty(cps.size + 1, dtype=bool)
        boundary[0], boundary[-1] = True, True
        boundary[1:-1] = is_cjk[1:] | is_cjk[:-1]
        boundary |= sentence_start
        unit_start = np.flatnonzero(boundary[:-1])
        unit_end = np.append(unit_start[1:], cps.size)
        unit_cjk = is_cjk[unit_start]
        runs = [text[a:b] for a, b in zip(unit_start[~unit_cjk].tolist(), unit_end[~unit_cjk].tolist(), strict=True)]
        run_ids, run_tokens = self.encoder.encode(runs) if runs else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        unit_tokens = np.ones(unit_start.size, dtype=np.int64)
        unit_tokens[~unit_cjk] = run_tokens
        first_token = np.cumsum(unit_tokens) - unit_tokens
        ids = np.empty(int(unit_tokens.sum()), dtype=np.int64)
        cjk_at = first_token[unit_cjk]
        ids[cjk_at] = self._ids_of(cps[unit_start[unit_cjk]])
        # token p of run r goes to first_token[r] + p
        run_first = first_token[~unit_cjk]
        ids[np.repeat(run_first - (np.cumsum(run_tokens) - run_tokens), run_tokens) + np.arange(run_ids.size)] = run_ids
        flags = np.zeros(ids.size, dtype=bool)
        flags[cjk_at] = continues[unit_start[unit_cjk]]
        sentence_of_unit = np.cumsum(sentence_start[:-1])[unit_start] - 1
        lengths = np.bincount(sentence_of_unit, weights=unit_tokens, minlength=len(sentences)).astype(np.int64)
        return ids, lengths, flags
