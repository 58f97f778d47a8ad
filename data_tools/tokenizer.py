"""Fast batch encoding of sentences with a WordPiece tokenizer (loading and hashing live in ``bert_ds.data.vocab``)."""

from __future__ import annotations

import itertools
import re
from array import array
from collections.abc import Iterator

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

# the word cache is bounded so a worker's memory does not grow with the corpus;
# 200k entries (~40 MB) keep the hit rate above 99% on English text
_WORD_CACHE_LIMIT = 200_000


class AsciiWordPiece:
    """BERT's normalizer, pre-tokenizer and WordPiece for words of printable ASCII, in Python.

    Why our own: through the Python binding, ``tokenizers`` spends ~20 us on a single word (measured:
    7 us normalizing, 14 us pre-tokenizing), and every word the encoder's cache has not seen goes
    through it: 2 s of every 10 MB of English. For printable ASCII the three steps are small and
    exact: lower-casing (when the vocabulary is uncased), a split into runs of letters and digits and
    single punctuation characters (every other printable ASCII character is punctuation to BERT), and
    greedy longest-match-first WordPiece. Words holding an added token's text ("[MASK]") and all other
    words stay with the library. ``tests/test_tokenizer.py`` checks the two agree.
    """

    _PIECES = re.compile(r"[A-Za-z0-9]+|[^A-Za-z0-9]")

    def __init__(self, vocab: dict[str, int], unk_token: str, prefix: str, max_chars: int, lowercase: bool, added: list[str]):
        self.vocab, self.unk_id, self.prefix, self.max_chars, self.lowercase = vocab, vocab[unk_token], prefix, max_chars, lowercase
        self._added = re.compile("|".join(map(re.escape, added)), re.IGNORECASE) if added else None
        self._piece_ids: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(cls, tok: Tokenizer) -> AsciiWordPiece | None:
        """The fast path for ``tok`` (a BERT normalizer or none, BERT's pre-tokenizer), or None for other models."""
        model = tok.model
        if not isinstance(model, models.WordPiece):
            return None
        lowercase = bool(tok.normalizer.lowercase) if tok.normalizer is not None else False
        added = [t.content for t in tok.get_added_tokens_decoder().values()]
        return cls(tok.get_vocab(with_added_tokens=False), model.unk_token, model.continuing_subword_prefix,
                   model.max_input_chars_per_word, lowercase, added)

    def handles(self, word: str) -> bool:
        return word.isascii() and word.isprintable() and (self._added is None or not self._added.search(word))

    def encode(self, word: str) -> list[int]:
        if self.lowercase:
            word = word.lower()
        # pieces repeat across words far more than words do ("os", ".", "path" in "os.path.join(")
        pieces = self._piece_ids
        if len(pieces) > _WORD_CACHE_LIMIT:
            pieces.clear()
        ids: list[int] = []
        for piece in self._PIECES.findall(word):
            piece_ids = pieces.get(piece)
            if piece_ids is None:
                piece_ids = pieces[piece] = self._wordpiece(piece)
            ids += piece_ids
        return ids

    def _wordpiece(self, piece: str) -> list[int]:
        if len(piece) > self.max_chars:
            return [self.unk_id]
        vocab, ids, start = self.vocab, [], 0
        while start < len(piece):
            end = len(piece)
            while end > start:
                sub = piece[start:end] if start == 0 else self.prefix + piece[start:end]
                if sub in vocab:
                    ids.append(vocab[sub])
                    break
                end -= 1
            else:  # no prefix of the rest is in the vocabulary: the whole piece is unknown
                return [self.unk_id]
            start = end
        return ids


class SentenceEncoder:
    """Encodes sentences to token ids without special tokens: one flat id array and the length of each sentence.

    Why not just ``Tokenizer.encode_batch``: on these machines it runs ~1 MB/s per core, the
    bottleneck of preprocessing. For BERT's normalizer + pre-tokenizer every whitespace-separated
    word is tokenized independently of its neighbours (the normalizer is character-local and the
    pre-tokenizer splits on whitespace first), so a word -> ids cache gives the identical ids;
    only words not seen before go through the tokenizer. The cache is a table of pieces (every
    cached word's ids, end to end, with its start and length), so a batch of sentences becomes
    its ids with a handful of numpy gathers instead of a Python loop over words. Any other
    tokenizer type falls back to ``encode_batch_fast``. ``tests/test_tokenizer.py`` checks the
    two paths agree, including on adversarial Unicode.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.cacheable = isinstance(tok.normalizer, normalizers.BertNormalizer | type(None)) and isinstance(
            tok.pre_tokenizer, pre_tokenizers.BertPreTokenizer
        )
        self._ascii = AsciiWordPiece.for_tokenizer(tok) if self.cacheable else None
        self._clear_cache()

    def _clear_cache(self) -> None:
        self._row: dict[str, int] = {"": 0}  # word -> its row in the piece table; "" (from double spaces) has no ids
        self._starts, self._lengths, self._pieces = array("q", [0]), array("q", [0]), array("q")

    def _encode_new_words(self, words: list[str]) -> Iterator[tuple[str, list[int]]]:
        """(word, ids) for words the cache lacks: printable ASCII in Python, everything else by the library."""
        by_python, by_library = [], []
        for w in words:
            (by_python if self._ascii is not None and self._ascii.handles(w) else by_library).append(w)
        yield from ((w, self._ascii.encode(w)) for w in by_python)
        yield from zip(by_library, (e.ids for e in self.tok.encode_batch_fast(by_library, add_special_tokens=False)), strict=True)

    def encode(self, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all sentences end to end, number of ids of each sentence), both int64.

        Sentences must come from ``text.normalize_document`` (only ' ' separates words).
        """
        if not sentences:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if not self.cacheable:
            encodings = self.tok.encode_batch_fast(sentences, add_special_tokens=False)
            lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
            return np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int64, int(lengths.sum())), lengths
        if len(self._row) > _WORD_CACHE_LIMIT:
            self._clear_cache()
        row = self._row
        words = " ".join(sentences).split(" ")  # sentence i contributes its count(" ") + 1 words
        rows = np.fromiter(map(row.get, words, itertools.repeat(-1)), np.int64, len(words))
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            for word, ids in self._encode_new_words(list(dict.fromkeys(words[i] for i in missing.tolist()))):
                row[word] = len(self._lengths)
                self._starts.append(len(self._pieces))
                self._lengths.append(len(ids))
                self._pieces.extend(ids)
            rows[missing] = [row[words[i]] for i in missing.tolist()]
        starts, lengths, pieces = (np.frombuffer(a, np.int64) for a in (self._starts, self._lengths, self._pieces))
        word_lengths = lengths[rows]
        # output position p of word k reads pieces[starts[k] + (p - first output position of k)]
        first_out = np.cumsum(word_lengths) - word_lengths
        ids = pieces[np.repeat(starts[rows] - first_out, word_lengths) + np.arange(int(word_lengths.sum()))]
        words_per_sentence = np.fromiter((s.count(" ") + 1 for s in sentences), np.int64, len(sentences))
        first_word = np.cumsum(words_per_sentence) - words_per_sentence
        return ids, np.add.reduceat(word_lengths, first_word)  # every sentence has >= 1 word: no empty segment
