"""The JSON metadata file beside each shard (PREFIX.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path


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
    return meta
