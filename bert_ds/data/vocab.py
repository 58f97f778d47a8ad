"""The vocabulary: loading a WordPiece tokenizer directory, its identity (hash), and which one a run uses.

A tokenizer directory is anything ``transformers.BertTokenizerFast.from_pretrained`` loads:
one written by ``data_tools.train_tokenizer`` (``tokenizer.json`` + ``vocab.txt``) or an
existing Hugging Face BERT checkpoint directory (often only ``vocab.txt`` +
``tokenizer_config.json``). A vocabulary's identity is the SHA-256 of its tokens in id order:
shards record it in their metadata, checkpoints in their completion marker, and a run checks it.

The files are not trusted beyond their size: they are capped (:data:`MAX_VOCAB_FILE_BYTES`, and
:data:`MAX_VOCAB_SIZE` tokens) before ``tokenizers`` reads them, and the ids must be 0..N-1.
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
# Vocabularies are files a run is handed, so they are capped before ``tokenizers`` reads them: a 1M-line vocab.txt
# took ~290 MB to load (~440 MB to resolve), a 10M-line one ran out of memory with no message. The largest BERT
# WordPiece vocabularies in use (LaBSE: 501,153 tokens; multilingual BERT: 119,547) fit under both caps.
MAX_VOCAB_SIZE = 1 << 19  # 524,288 tokens
MAX_VOCAB_FILE_BYTES = 32 << 20  # vocab.txt or tokenizer.json
_MAX_CONFIG_BYTES = 1 << 20  # tokenizer_config.json holds a few flags


class TokenizerError(ValueError):
    """A tokenizer directory is missing, unreadable or not a BERT WordPiece vocabulary."""


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load the fast tokenizer of a directory (ours or a Hugging Face BERT checkpoint).

    The files are checked against :data:`MAX_VOCAB_FILE_BYTES` (and a ``vocab.txt`` against :data:`MAX_VOCAB_SIZE`
    lines, counted a block at a time) before ``tokenizers`` reads them, and the loaded vocabulary against
    :data:`MAX_VOCAB_SIZE`; :class:`TokenizerError` names the file and the cap.
    """
    path = Path(path)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if not path.is_dir():
        raise TokenizerError(f"{path}: tokenizer directory not found")
    tokenizer_json, vocab_txt = path / "tokenizer.json", path / "vocab.txt"
    if tokenizer_json.exists():
        source = tokenizer_json
        _check_file_size(tokenizer_json, MAX_VOCAB_FILE_BYTES)
        try:
            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the Rust loader raises a bare Exception
            raise TokenizerError(f"{tokenizer_json}: cannot load ({e})") from None
    elif vocab_txt.exists():
        source = vocab_txt
        _check_file_size(vocab_txt, MAX_VOCAB_FILE_BYTES)
        _check_line_count(vocab_txt, MAX_VOCAB_SIZE)
        cfg = _read_json(path / "tokenizer_config.json")
        lowercase = bool(cfg.get("do_lower_case", True))
        try:
            tok = BertWordPieceTokenizer(
                str(vocab_txt),
                lowercase=lowercase,
                strip_accents=cfg.get("strip_accents"),
                handle_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
            )._tokenizer
        except Exception as e:  # TypeError for a missing special token; the Rust loader raises a bare Exception
            missing = _missing_special_lines(vocab_txt)
            if missing:
                raise TokenizerError(f"{vocab_txt}: vocabulary lacks the BERT special tokens {missing}") from None
            raise TokenizerError(f"{vocab_txt}: cannot load ({e})") from None
    else:
        raise TokenizerError(f"{path}: neither tokenizer.json nor vocab.txt found; not a tokenizer directory")
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > MAX_VOCAB_SIZE:
        raise TokenizerError(f"{source}: {size:,} tokens, more than the {MAX_VOCAB_SIZE:,} bert-ds accepts (MAX_VOCAB_SIZE in {__name__})")
    # checkpoints often ship tokenizer.json with padding/truncation on (MiniLM pads to 128):
    # shards hold whole sentences, so both are switched off
    tok.no_padding()
    tok.no_truncation()
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise TokenizerError(f"{source}: vocabulary lacks the BERT special tokens {missing}")
    return tok


def _check_file_size(path: Path, cap: int) -> None:
    size = path.stat().st_size
    if size > cap:
        raise TokenizerError(f"{path}: {size:,} bytes, more than the {cap:,} bytes a vocabulary file may have "
                             f"(MAX_VOCAB_FILE_BYTES in {__name__}; vocabularies are capped at {MAX_VOCAB_SIZE:,} tokens)")


def _missing_special_lines(path: Path) -> list[str]:
    """The special tokens that are no line of ``path`` (read a line at a time: the error path only)."""
    found = set()
    with open(path, "rb") as f:
        for line in f:
            token = line.rstrip(b"\r\n").decode("utf-8", "replace")
            if token in SPECIAL_TOKENS:
                found.add(token)
    return [t for t in SPECIAL_TOKENS if t not in found]


def _check_line_count(path: Path, cap: int) -> None:
    """At most ``cap`` lines (one token each), counted a block at a time: nothing but the count is kept."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            lines += block.count(b"\n")
            last = block[-1:]
            if lines > cap:
                break
    lines += last != b"\n"  # a last line without its newline
    if lines > cap:
        raise TokenizerError(f"{path}: more than {cap:,} tokens (one per line), the most bert-ds accepts (MAX_VOCAB_SIZE in {__name__})")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    _check_file_size(path, _MAX_CONFIG_BYTES)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def vocab_tokens(tok: Tokenizer) -> list[str]:
    """The tokens in id order; :class:`TokenizerError` unless the ids are exactly 0..N-1 (a file can say otherwise)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens: list[str | None] = [None] * len(vocab)
    for token, i in vocab.items():
        if not 0 <= i < len(tokens) or tokens[i] is not None:
            raise TokenizerError(f"token ids are not 0..{len(tokens) - 1}: {token!r} has id {i}")
        tokens[i] = token
    return tokens


def vocab_sha256(tok: Tokenizer, tokens: list[str] | None = None) -> str:
    """Identity of a vocabulary: the tokens in id order (``tokens``, when the caller has them). Shards record it; the trainer checks it."""
    return hashlib.sha256("\n".join(vocab_tokens(tok) if tokens is None else tokens).encode("utf-8")).hexdigest()


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
    try:
        sha = vocab_sha256(tok)
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None
    return TokenizerInfo(
        path=str(Path(path).resolve()),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        vocab_sha256=sha,
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
    try:
        tokens = vocab_tokens(tok)  # the one Python copy of the vocabulary: the hash and the masking tables use it
    except TokenizerError as e:
        raise ConfigError(f"{key}: {path}: {e}") from None
    sha = vocab_sha256(tok, tokens)
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
    return Vocab(str(path), size, sha, tokens, ids["[CLS]"], ids["[SEP]"], ids["[PAD]"], ids["[MASK]"], ids["[UNK]"])
