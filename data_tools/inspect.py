"""Summarize, sample and verify an indexed shard.

    python -m data_tools.inspect data/train            # counts, length histogram, 2 decoded documents
    python -m data_tools.inspect data/train --verify   # also check the whole file pair
    python -m data_tools.inspect data/train --json     # the counts as one JSON object
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from bert_ds.data import word_boundaries
from bert_ds.data.indexed_dataset import IndexedDataset, IndexedDatasetError, bin_path, idx_path
from bert_ds.data.metadata import MetadataError, read_metadata
from bert_ds.data.vocab import TokenizerError, load_tokenizer, vocab_sha256, vocab_tokens

# sentence-length histogram bucket edges, in tokens
_EDGES = [0, 8, 16, 32, 64, 128, 256, 512]


def summarize(ds: IndexedDataset) -> dict:
    lengths = np.asarray(ds.sequence_lengths)
    sentences_per_doc = np.diff(ds.document_indices)
    hist_counts, _ = np.histogram(lengths, bins=_EDGES + [max(int(lengths.max(initial=0)) + 1, 513)])
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(_EDGES, _EDGES[1:], strict=False)] + [f"{_EDGES[-1]}+"]
    return {
        "prefix": ds.prefix,
        "dtype": ds.dtype.name,
        "documents": ds.num_documents,
        "sentences": ds.num_sequences,
        "tokens": ds.num_tokens,
        "bytes": bin_path(ds.prefix).stat().st_size + idx_path(ds.prefix).stat().st_size,
        "sentence_tokens": _stats(lengths),
        "sentences_per_document": _stats(sentences_per_doc),
        "documents_with_one_sentence": int((sentences_per_doc == 1).sum()),
        "sentence_length_histogram": dict(zip(labels, hist_counts.tolist(), strict=True)),
    }


def _stats(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"mean": 0.0, "min": 0, "p50": 0, "p99": 0, "max": 0}
    return {
        "mean": round(float(values.mean()), 2),
        "min": int(values.min()),
        "p50": int(np.percentile(values, 50)),
        "p99": int(np.percentile(values, 99)),
        "max": int(values.max()),
    }


def verify(ds: IndexedDataset, meta: dict) -> list[str]:
    """Whole-file checks; returns what was checked. Raises IndexedDatasetError or WordBoundaryError on a problem."""
    vocab_size = meta.get("tokenizer", {}).get("vocab_size")
    largest = ds.verify(vocab_size=vocab_size)
    checked = ["header", "file sizes", "pointers", "document indices", "no empty sentence or document"]
    checked += ["token ids < vocab size"] if vocab_size else []
    counts = meta.get("counts")
    if counts:
        actual = {"documents": ds.num_documents, "sentences": ds.num_sequences, "tokens": ds.num_tokens}
        for key, value in counts.items():
            if actual.get(key) != value:
                raise IndexedDatasetError(f"{ds.prefix}.json: metadata says {value} {key}, the shard has {actual.get(key)}")
        checked.append("metadata counts")
    if "max_token_id" in meta:
        if meta["max_token_id"] != largest:
            raise IndexedDatasetError(f"{ds.prefix}.json: metadata says the largest token id is {meta['max_token_id']}, the shard's is {largest}")
        checked.append("metadata largest token id")
    seg = meta.get(word_boundaries.METADATA_KEY) or {}
    tokens = _vocab_tokens(meta)
    if isinstance(seg.get("cjk_tokens"), int) and tokens is not None:
        found = word_boundaries.count_cjk_tokens(ds.tokens, word_boundaries.cjk_token_table(tokens))
        if found != seg["cjk_tokens"]:
            raise IndexedDatasetError(f"{ds.prefix}.json: metadata says {seg['cjk_tokens']} Chinese character tokens, the shard has {found}")
        checked.append("CJK token count")
    checked += word_boundaries.verify(ds, meta, tokens)
    return checked


def _vocab_tokens(meta: dict) -> list[str] | None:
    """The vocabulary recorded in the metadata, in id order, when its directory is still there and unchanged."""
    info = meta.get("tokenizer") or {}
    try:
        tok = load_tokenizer(info["path"])
    except (KeyError, TokenizerError):
        return None
    return vocab_tokens(tok) if vocab_sha256(tok) == info.get("vocab_sha256") else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.inspect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="shard prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--verify", action="store_true", help="check the whole file pair, the metadata counts and the word boundaries (PREFIX.words)")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    p.add_argument("--samples", type=int, default=2, help="decoded sample documents to print")
    p.add_argument("--tokenizer", help="tokenizer dir for decoding (default: the one in the metadata)")
    p.add_argument("--seed", type=int, default=0, help="which documents are sampled")
    args = p.parse_args(argv)
    try:
        ds = IndexedDataset(args.prefix)
        meta = read_metadata(args.prefix)
        summary = summarize(ds)
        if args.verify:
            summary["verified"] = verify(ds, meta)
    except (IndexedDatasetError, MetadataError, word_boundaries.WordBoundaryError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{ds.prefix}: {summary['documents']:,} documents, {summary['sentences']:,} sentences, {summary['tokens']:,} tokens ({summary['dtype']})")
    st = summary["sentence_tokens"]
    print(f"tokens per sentence: mean {st['mean']}, median {st['p50']}, p99 {st['p99']}, max {st['max']}")
    sd = summary["sentences_per_document"]
    print(f"sentences per document: mean {sd['mean']}, median {sd['p50']}, max {sd['max']}; {summary['documents_with_one_sentence']:,} with one sentence")
    total = max(summary["sentences"], 1)
    print("sentence length histogram (tokens):")
    for label, count in summary["sentence_length_histogram"].items():
        print(f"  {label:>8} {count:>10,} {'#' * round(40 * count / total)}")
    if args.verify:
        print("verify: OK (" + ", ".join(summary["verified"]) + ")")
    tokenizer_dir = args.tokenizer or meta.get("tokenizer", {}).get("path")
    if args.samples and ds.num_documents:
        try:
            tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        except TokenizerError as e:
            print(f"(cannot decode samples: {e})", file=sys.stderr)
            tok = None
        rng = np.random.default_rng(args.seed)
        for doc in sorted(rng.choice(ds.num_documents, size=min(args.samples, ds.num_documents), replace=False).tolist()):
            print(f"--- document {doc} ({len(ds.document_range(doc))} sentences)")
            for i, sentence in enumerate(ds.document(doc)[:5]):
                text = tok.decode(sentence.tolist()) if tok else " ".join(map(str, sentence.tolist()))
                print(f"  [{i}] {text[:200]}")
            if len(ds.document_range(doc)) > 5:
                print("  ...")


if __name__ == "__main__":
    main()
