"""The vocabulary: loading a WordPiece tokenizer directory, its identity (hash), and which one a run uses.

A tokenizer directory is anything ``transformers.BertTokenizerFast.from_pretrained`` loads:
one written by ``data_tools.train_tokenizer`` (``tokenizer.json`` + ``vocab.txt``) or an
existing Hugging Face BERT checkpoint directory (often only ``vocab.txt`` +
``tokenizer_config.json``). A vocabulary's identity is the SHA-256 of its tokens in id order:
shards record it in their metadata, checkpoints in their completion marker, and a run checks it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from bert_ds.config import ConfigError, RunConfig
from bert_ds.data.metadata import MetadataError, read_metadata

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


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



@dataclass(frozen=True)
class Vocab:
    path: str
    size: int
    sha256: str
    tokens: list[str]
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    unk_id: int


def resolve_vocab(cfg: RunConfig) -> Vocab:
    """data.tokenizer, else model.init_from, else the tokenizer recorded in the shards' metadata.

    Every shard that has metadata must have been tokenized with exactly this vocabulary
    (same tokens in the same order); otherwise the run stops before training.
    """
    prefixes = cfg.data.prefixes()
    try:
        metas = {p: read_metadata(p) for p in prefixes}
    except MetadataError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.tokenizer:
        path, key = cfg.data.tokenizer, "data.tokenizer"
    elif cfg.model.init_from:
        path, key = cfg.model.init_from, "model.init_from"
    else:
        recorded = next((m["tokenizer"]["path"] for m in metas.values() if m), None)
        if recorded is None:
            raise ConfigError("data.tokenizer is not set and the shards have no metadata naming their tokenizer; set data.tokenizer")
        path, key = recorded, f"the tokenizer recorded in {prefixes[0]}.json"
    try:
        tok = load_tokenizer(path)
    except TokenizerError as e:
        raise ConfigError(f"{key}: {e}") from None
    sha = vocab_sha256(tok)
    for prefix, meta in metas.items():
        if meta and meta["tokenizer"]["vocab_sha256"] != sha:
            raise ConfigError(
                f"vocabulary mismatch: {prefix} was tokenized with {meta['tokenizer']['path']} "
                f"(vocab sha256 {meta['tokenizer']['vocab_sha256'][:12]}, size {meta['tokenizer']['vocab_size']}), "
                f"but {key} is {path} (sha256 {sha[:12]}, size {tok.get_vocab_size()}); "
                f"re-run data_tools.preprocess --tokenizer {path}, or point {key} at the shards' tokenizer"
            )
    size = tok.get_vocab_size(with_added_tokens=True)
    for prefix, meta in metas.items():
        # recorded when the shard was written; the dataset also checks every sample's ids as it reads them
        top = meta.get("max_token_id") if meta else None
        if top is not None and top >= size:
            raise ConfigError(
                f"{prefix}.json: the largest token id in the shard is {top}, outside the vocabulary of {key} {path} (size {size}); "
                f"the shard does not match its metadata or this vocabulary (check it: python -m data_tools.inspect {prefix} --verify)"
            )
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")}
    return Vocab(str(path), tok.get_vocab_size(with_added_tokens=True), sha, vocab_tokens(tok),
                 ids["[CLS]"], ids["[SEP]"], ids["[PAD]"], ids["[MASK]"], ids["[UNK]"])
