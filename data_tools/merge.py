"""Concatenate indexed shards, in the order given, into one dataset.

    python -m data_tools.merge --inputs data/part0 data/part1 --output-prefix data/train

Shards written by ``preprocess --shard-index i --num-shards n`` and merged in order give
the bytes of a single run. Held-out companions (``PREFIX_valid``) are merged too when
every input has one. Metadata counts are summed and the inputs recorded. Word boundaries
(``PREFIX.words``, from ``preprocess --word-segmenter``) are concatenated too: the inputs must all
have them, made by the same segmenter, version and user dictionaries, or all lack them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bert_ds import __version__
from bert_ds.data import word_boundaries
from bert_ds.data.indexed_dataset import IndexedDataset, IndexedDatasetError, merge_datasets
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
    sidecars = {}
    segmentation = _merged_segmentation(inputs, metas)
    if segmentation is not None:
        metadata[word_boundaries.METADATA_KEY] = segmentation
        if segmentation.get("segmenter") != word_boundaries.NO_SEGMENTER:
            sizes = [IndexedDataset(p).num_tokens for p in inputs]
            sidecars[word_boundaries.words_path(output_prefix)] = lambda out: word_boundaries.write_concatenation(inputs, sizes, out)
    ds = merge_datasets(inputs, output_prefix, metadata if base else None, sidecars=sidecars)
    if not sidecars:
        word_boundaries.words_path(output_prefix).unlink(missing_ok=True)  # a leftover under this prefix describes other data
    return {"output_prefix": output_prefix, "documents": ds.num_documents, "sentences": ds.num_sequences, "tokens": ds.num_tokens}


def _merged_segmentation(inputs: list[str], metas: list[dict]) -> dict | None:
    """The merged ``word_segmentation`` metadata (counts summed); None when no input records one."""
    segs = [m.get(word_boundaries.METADATA_KEY) for m in metas]
    if all(s is None for s in segs):
        return None
    # a shard without the entry (older bert-ds, Megatron) counts as unsegmented, with an unknown CJK count
    identity = [{k: v for k, v in (s or {"segmenter": word_boundaries.NO_SEGMENTER}).items() if k not in ("cjk_tokens", "continuations")}
                for s in segs]
    if any(i != identity[0] for i in identity):
        raise IndexedDatasetError("cannot merge shards with different word segmentations: " + "; ".join(
            f"{p}: {i}" for p, i in zip(inputs, identity, strict=True)))
    merged = dict(identity[0])
    for key in ("cjk_tokens", "continuations"):
        values = [(s or {}).get(key) for s in segs]
        if all(isinstance(v, int) for v in values):
            merged[key] = sum(values)
    return merged


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="shard prefixes, merged in this order")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    valid_inputs = [valid_prefix(i) for i in args.inputs]
    have_valid = [Path(f"{v}.idx").exists() for v in valid_inputs]
    if any(have_valid) and not all(have_valid):
        lacking = ", ".join(i for i, has in zip(args.inputs, have_valid, strict=True) if not has)
        raise SystemExit(f"error: some inputs have a held-out part (PREFIX_valid) and {lacking} not: merging only some "
                         "would misrepresent the held-out set; merge the _valid parts separately or give inputs that all have one")
    try:
        results = [merge(args.inputs, args.output_prefix)]
        if all(have_valid):
            results.append(merge(valid_inputs, valid_prefix(args.output_prefix)))
        else:  # no input has a held-out part: an old one under the output's name would be taken for this data's
            stale = [p for p in Path(valid_prefix(args.output_prefix)).parent.glob(Path(valid_prefix(args.output_prefix)).name + ".*")
                     if p.suffix in (".bin", ".idx", ".json", ".words")]
            for path in sorted(stale, key=lambda p: p.suffix == ".json", reverse=True):  # the metadata first: it vouches for the rest
                path.unlink()
                print(f"removed {path}: a held-out part from an earlier run, not from these inputs", file=sys.stderr)
    except (IndexedDatasetError, ValueError) as e:  # WordBoundaryError is a ValueError
        raise SystemExit(f"error: {e}") from None
    for r in results:
        print(f"{r['output_prefix']}: {r['documents']:,} documents, {r['sentences']:,} sentences, {r['tokens']:,} tokens", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
