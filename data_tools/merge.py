"""Concatenate indexed shards, in the order given, into one dataset.

    python -m data_tools.merge --inputs data/part0 data/part1 --output-prefix data/train

Shards written by ``preprocess --shard-index i --num-shards n`` and merged in order give
the bytes of a single run. Held-out companions (``PREFIX_valid``) are merged too when
every input has one. Metadata counts are summed and the inputs recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bert_ds import __version__
from bert_ds.data.indexed_dataset import IndexedDatasetError, merge_datasets
from bert_ds.data.metadata import read_metadata
from data_tools.preprocess import valid_prefix


def merge(inputs: list[str], output_prefix: str) -> dict:
    metas = [read_metadata(p) for p in inputs]
    hashes = {m["tokenizer"]["vocab_sha256"] for m in metas if m}
    if len(hashes) > 1:
        raise IndexedDatasetError("cannot merge shards tokenized with different vocabularies: " + ", ".join(
            f"{p}: {m['tokenizer']['vocab_sha256'][:12]}" for p, m in zip(inputs, metas, strict=True) if m))
    base = next((m for m in metas if m), {})
    metadata = {
        **{k: v for k, v in base.items() if k not in ("counts", "sources", "shard")},
        "tool": "bert-ds data_tools.merge",
        "tool_version": __version__,
        "sources": [s for m in metas for s in m.get("sources", [])],
        "merged_from": [str(p) for p in inputs],
    }
    ds = merge_datasets(inputs, output_prefix, metadata if base else None)
    return {"output_prefix": output_prefix, "documents": ds.num_documents, "sentences": ds.num_sequences, "tokens": ds.num_tokens}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="shard prefixes, merged in this order")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    try:
        results = [merge(args.inputs, args.output_prefix)]
        valid_inputs = [valid_prefix(i) for i in args.inputs]
        if all(Path(f"{v}.idx").exists() for v in valid_inputs):
            results.append(merge(valid_inputs, valid_prefix(args.output_prefix)))
    except (IndexedDatasetError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for r in results:
        print(f"{r['output_prefix']}: {r['documents']:,} documents, {r['sentences']:,} sentences, {r['tokens']:,} tokens", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
