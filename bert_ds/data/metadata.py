"""The JSON metadata file beside each shard (``PREFIX.json``): tokenizer identity, counts, largest token id, sources, options.

It is the last file of a shard's unit (``bert_ds.data.indexed_dataset.IndexedDatasetWriter``):
it is removed before a new ``.bin``/``.idx`` pair is renamed into place and written after it, so a
``.json`` never vouches for data it does not describe. Shards written by Megatron's own tools have none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bert_ds.files import atomic_write


class MetadataError(ValueError):
    """A shard's metadata file is unreadable or malformed."""


def metadata_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.json")


def read_metadata(prefix: str | os.PathLike, required: bool = False) -> dict:
    """The metadata dict, or {} when the file is absent (shards from Megatron's tools have none)."""
    path = metadata_path(prefix)
    if not path.exists():
        if required:
            raise MetadataError(f"{path}: metadata file not found (written by data_tools.preprocess beside the .bin/.idx)")
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetadataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "tokenizer" not in meta:
        raise MetadataError(f"{path}: not a bert-ds shard metadata file (no 'tokenizer' entry)")
    tokenizer = meta["tokenizer"]
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("vocab_sha256"), str) or not _is_int(tokenizer.get("vocab_size")):
        raise MetadataError(f"{path}: 'tokenizer' must hold 'vocab_sha256' (a string) and 'vocab_size' (an integer)")
    top = meta.get("max_token_id")
    if top is not None and not (_is_int(top) and top >= 0):
        raise MetadataError(f"{path}: 'max_token_id' must be a non-negative integer or null, got {top!r}")
    return meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def metadata_text(meta: dict) -> str:
    """The file's contents (sorted keys: the same metadata always gives the same bytes)."""
    return json.dumps(meta, indent=2, sort_keys=True) + "\n"


def write_metadata(path: str | os.PathLike, meta: dict) -> None:
    """Write a metadata file on its own (atomically); a shard's writer commits it with the shard instead."""
    atomic_write(path, metadata_text(meta))
