"""Which vocabulary a run uses, and the check that it is the one the shards were tokenized with."""

from __future__ import annotations

from dataclasses import dataclass

from bert_ds.config import ConfigError, RunConfig
from data_tools.metadata import MetadataError, read_metadata
from data_tools.tokenizer import TokenizerError, load_tokenizer, vocab_sha256, vocab_tokens


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
    prefixes = list(cfg.data.train_prefix) + ([cfg.data.valid_prefix] if cfg.data.valid_prefix else [])
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
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")}
    return Vocab(str(path), tok.get_vocab_size(with_added_tokens=True), sha, vocab_tokens(tok),
                 ids["[CLS]"], ids["[SEP]"], ids["[PAD]"], ids["[MASK]"], ids["[UNK]"])
