"""Loading WordPiece tokenizers, hashing vocabularies, and fast batch encoding.

A tokenizer directory is anything ``transformers.BertTokenizerFast.from_pretrained`` loads:
one written by ``data_tools.train_tokenizer`` (``tokenizer.json`` + ``vocab.txt``) or an
existing Hugging Face BERT checkpoint directory (often only ``vocab.txt`` +
``tokenizer_config.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.implementations import BertWordPieceTokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# the word cache is bounded so a worker's memory does not grow with the corpus;
# 200k entries (~40 MB) keep the hit rate above 99% on English text
_WORD_CACHE_LIMIT = 200_000


class TokenizerError(ValueError):
    """A tokenizer directory is missing, unreadable or not a BERT WordPiece vocabulary."""


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load the fast tokenizer of a directory (ours or a Hugging Face BERT checkpoint)."""
    path = Path(path)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if not path.is_dir():
        raise TokenizerError(f"{path}: tokenizer directory not found")
    tokenizer_json, vocab_txt = path / "tokenizer.json", path / "vocab.txt"
    if tokenizer_json.exists():
        try:
            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the Rust loader raises a bare Exception
            raise TokenizerError(f"{tokenizer_json}: cannot load ({e})") from None
    elif vocab_txt.exists():
        tokens = set(vocab_txt.read_text(encoding="utf-8").splitlines())
        missing = [t for t in SPECIAL_TOKENS if t not in tokens]
        if missing:
            raise TokenizerError(f"{vocab_txt}: vocabulary lacks the BERT special tokens {missing}")
        cfg = _read_json(path / "tokenizer_config.json")
        lowercase = bool(cfg.get("do_lower_case", True))
        tok = BertWordPieceTokenizer(
            str(vocab_txt),
            lowercase=lowercase,
            strip_accents=cfg.get("strip_accents"),
            handle_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
        )._tokenizer
    else:
        raise TokenizerError(f"{path}: neither tokenizer.json nor vocab.txt found; not a tokenizer directory")
    # checkpoints often ship tokenizer.json with padding/truncation on (MiniLM pads to 128):
    # shards hold whole sentences, so both are switched off
    tok.no_padding()
    tok.no_truncation()
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise TokenizerError(f"{path}: vocabulary lacks the BERT special tokens {missing}")
    return tok


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def vocab_tokens(tok: Tokenizer) -> list[str]:
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    return tokens


def vocab_sha256(tok: Tokenizer) -> str:
    """Identity of a vocabulary: the tokens in id order. Shards record it; the trainer checks it."""
    return hashlib.sha256("\n".join(vocab_tokens(tok)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenizerInfo:
    path: str
    vocab_size: int
    vocab_sha256: str
    normalizer: str
    special_token_ids: dict[str, int]

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "vocab_size": self.vocab_size,
            "vocab_sha256": self.vocab_sha256,
            "normalizer": self.normalizer,
            "special_token_ids": self.special_token_ids,
        }


def tokenizer_info(path: str | os.PathLike) -> TokenizerInfo:
    tok = load_tokenizer(path)
    return TokenizerInfo(
        path=str(Path(path).resolve()),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        vocab_sha256=vocab_sha256(tok),
        normalizer=repr(tok.normalizer),
        special_token_ids={t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
    )


class SentenceEncoder:
    """Encodes sentences to token ids without special tokens.

    Why not just ``Tokenizer.encode_batch``: on these machines it runs ~2 MB/s per core,
    the bottleneck of preprocessing. For BERT's normalizer + pre-tokenizer every
    whitespace-separated word is tokenized independently of its neighbours (the
    normalizer is character-local and the pre-tokenizer splits on whitespace first), so
    a word -> ids cache gives the identical ids at ~6 MB/s. Any other tokenizer type
    falls back to ``encode_batch_fast``. ``tests/test_tokenizer.py`` checks the two paths
    agree, including on adversarial Unicode.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.cacheable = isinstance(tok.normalizer, normalizers.BertNormalizer | type(None)) and isinstance(
            tok.pre_tokenizer, pre_tokenizers.BertPreTokenizer
        )
        self._cache: dict[str, list[int]] = {}

    def encode(self, sentences: list[str]) -> list[list[int]]:
        """Sentences must come from ``text.normalize_whitespace`` (only ' ' separates words)."""
        if not self.cacheable:
            return [e.ids for e in self.tok.encode_batch_fast(sentences, add_special_tokens=False)]
        cache = self._cache
        if len(cache) > _WORD_CACHE_LIMIT:
            cache.clear()
        word_lists = [s.split(" ") for s in sentences]
        misses = {w for words in word_lists for w in words if w not in cache}
        misses.discard("")
        if misses:
            miss_list = list(misses)
            for word, enc in zip(miss_list, self.tok.encode_batch_fast(miss_list, add_special_tokens=False), strict=True):
                cache[word] = enc.ids
        cache[""] = []
        out = []
        for words in word_lists:
            ids: list[int] = []
            for w in words:
                ids += cache[w]
            out.append(ids)
        return out
