"""Raw text -> tokenized, sentence-split, Megatron-compatible indexed shards.

    python -m data_tools.preprocess --input corpus/ --tokenizer vocab/ --output-prefix data/train \
        --workers 2 --valid-fraction 0.01

Writes PREFIX.bin/.idx/.json (and PREFIX_valid.* with --valid-fraction or --valid-input).
The last stdout line is a JSON summary; input documents = written + skipped (by reason).

Chinese whole-word masking: ``--word-segmenter jieba`` (optionally ``--user-dict FILE``) also writes
PREFIX.words, which CJK tokens continue a segmented word (``bert_ds.data.word_boundaries``).

SLURM job arrays: ``--shard-index $SLURM_ARRAY_TASK_ID --num-shards N`` makes each task
take a contiguous, disjoint part of the input; ``python -m data_tools.merge`` joins them
into the same bytes a single run writes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from bert_ds import __version__
from bert_ds.data import word_boundaries
from bert_ds.data.indexed_dataset import IndexedDatasetWriter, token_dtype_for_vocab
from bert_ds.data.vocab import TokenizerError, load_tokenizer, tokenizer_info, vocab_tokens
from data_tools import segmentation, sources
from data_tools.text import document_sentences, normalize_document
from data_tools.tokenizer import SentenceEncoder

# Tokenization runs one thread per worker process: `--workers` is the whole parallelism,
# so 1 vs 2 workers is an honest comparison and processes do not oversubscribe cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Options:
    text_key: str = "text"
    valid_fraction: float = 0.0
    drop_short_docs: bool = False
    seed: int = 1234
    segmenter: segmentation.SegmenterSpec = segmentation.SegmenterSpec()
    max_document_bytes: int = sources.MAX_DOCUMENT_BYTES


@dataclass
class SplitArrays:
    """One unit's output for one split: what IndexedDatasetWriter.add_documents takes."""

    tokens: np.ndarray
    sentence_lengths: np.ndarray
    doc_sentence_counts: np.ndarray
    word_continues: np.ndarray | None = None
    """One flag per token with --word-segmenter: it continues a segmented Chinese word."""


@dataclass
class UnitResult:
    bytes_in: int
    counts: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    splits: dict[str, SplitArrays] = field(default_factory=dict)
    too_long_at: list[str] = field(default_factory=list)


# -- worker side -----------------------------------------------------------------------------

_worker_state: dict = {}


def _init_worker(tokenizer_dir: str, options: Options) -> None:
    tok = load_tokenizer(tokenizer_dir)
    _worker_state["encoder"] = SentenceEncoder(tok)
    _worker_state["dtype"] = token_dtype_for_vocab(tok.get_vocab_size(with_added_tokens=True))
    _worker_state["options"] = options
    _worker_state["is_cjk_token"] = word_boundaries.cjk_token_table(vocab_tokens(tok))
    if options.segmenter.enabled:
        _worker_state["segmented"] = segmentation.SegmentedEncoder(_worker_state["encoder"], options.segmenter.build())


def _in_valid_split(text: str, options: Options) -> bool:
    """By content hash: independent of file order, sharding and workers; duplicates stay together."""
    if options.valid_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=options.seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") / 2**64 < options.valid_fraction


def process_unit(unit: sources.WorkUnit) -> UnitResult:
    encoder: SentenceEncoder = _worker_state["encoder"]
    options: Options = _worker_state["options"]
    dtype = _worker_state["dtype"]
    read_stats = sources.ReadStats()
    result = UnitResult(bytes_in=unit.size)
    docs: dict[str, list[list[str]]] = {"train": [], "valid": []}
    for raw_text, invalid in sources.read_unit(unit, options.text_key, read_stats, options.max_document_bytes):
        result.counts["docs_in"] += 1
        if invalid:
            result.counts["docs_with_invalid_utf8"] += 1
        text = normalize_document(raw_text)
        sentences = document_sentences(text)
        split = "valid" if unit.split == "valid" or _in_valid_split(text, options) else "train"
        docs[split].append(sentences)
    result.counts["invalid_utf8_sequences"] = read_stats.invalid_utf8
    # over the length cap: read (and counted as input) but never held, so skipped before anything else
    result.counts["docs_in"] += read_stats.too_long
    result.skipped["too_long"] += read_stats.too_long
    result.too_long_at = read_stats.too_long_at

    for split, doc_list in docs.items():
        if not doc_list:
            continue
        sentences = [s for sentences in doc_list for s in sentences]
        if options.segmenter.enabled:
            tokens, lengths, continues = _worker_state["segmented"].encode(sentences)
        else:
            (tokens, lengths), continues = encoder.encode(sentences), None
        num_docs = len(doc_list)
        doc_of_sentence = np.repeat(np.arange(num_docs), np.fromiter(map(len, doc_list), np.int64, num_docs))
        # a sentence of only characters the tokenizer deletes (control characters) has no tokens
        nonempty = lengths > 0
        result.counts["empty_sentences_dropped"] += int(np.count_nonzero(~nonempty))
        sentences_per_doc = np.bincount(doc_of_sentence[nonempty], minlength=num_docs)
        empty_doc, one_sentence = sentences_per_doc == 0, sentences_per_doc == 1
        result.skipped["empty"] += int(np.count_nonzero(empty_doc))
        if options.drop_short_docs:
            result.skipped["one_sentence"] += int(np.count_nonzero(one_sentence))
            keep_doc = sentences_per_doc >= 2
        else:
            result.counts["docs_with_one_sentence"] += int(np.count_nonzero(one_sentence))
            keep_doc = ~empty_doc
        keep_sentence = nonempty & keep_doc[doc_of_sentence]
        keep_token = np.repeat(keep_sentence, lengths)
        tokens = tokens[keep_token]
        result.counts[f"docs_{split}"] += int(np.count_nonzero(keep_doc))
        result.counts["sentences"] += int(np.count_nonzero(keep_sentence))
        result.counts["tokens"] += len(tokens)
        result.counts[f"cjk_tokens_{split}"] += int(np.count_nonzero(_worker_state["is_cjk_token"][tokens]))
        if keep_doc.any():
            result.splits[split] = SplitArrays(
                tokens.astype(dtype), lengths[keep_sentence].astype(np.int32), sentences_per_doc[keep_doc].astype(np.int64),
                None if continues is None else continues[keep_token],
            )
    return result


# -- driver side -----------------------------------------------------------------------------


def _ordered_map(units: list[sources.WorkUnit], workers: int, tokenizer_dir: str, options: Options) -> Iterator[UnitResult]:
    """Results in unit order, with at most 2 units per worker in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(tokenizer_dir, options)
        for unit in units:
            yield process_unit(unit)
        return
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir, options)) as pool:
        todo = iter(units)
        pending = deque(pool.apply_async(process_unit, (u,)) for u in itertools.islice(todo, 2 * workers))
        while pending:
            result = pending.popleft().get()
            unit = next(todo, None)
            if unit is not None:  # keep the window full: one unit in for each result out
                pending.append(pool.apply_async(process_unit, (unit,)))
            yield result


def valid_prefix(prefix: str) -> str:
    return f"{prefix}_valid"


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    try:
        info = tokenizer_info(args.tokenizer)
    except TokenizerError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        segmenter = segmentation.SegmenterSpec(args.word_segmenter, tuple(map(segmentation.read_user_dictionary, args.user_dict or [])))
        if segmenter.enabled:
            segmentation.check_tokenizer(SentenceEncoder(load_tokenizer(args.tokenizer)))
    except segmentation.SegmentationError as e:
        raise SystemExit(f"error: {e}") from None
    options = Options(text_key=args.text_key, valid_fraction=args.valid_fraction, drop_short_docs=args.drop_short_docs, seed=args.seed,
                      segmenter=segmenter, max_document_bytes=args.max_document_bytes)
    if args.max_document_bytes < 1:
        raise SystemExit(f"error: --max-document-bytes must be >= 1, got {args.max_document_bytes}")
    if not 0 <= args.valid_fraction < 1:
        raise SystemExit(f"error: --valid-fraction must be in [0, 1), got {args.valid_fraction}")
    if not 0 <= args.shard_index < args.num_shards:
        raise SystemExit(f"error: --shard-index {args.shard_index} is not in [0, --num-shards {args.num_shards})")

    files_skipped: list[dict] = []
    units: list[sources.WorkUnit] = []
    source_files: list[dict] = []
    for inputs, split in ((args.input, "auto"), (args.valid_input or [], "valid")):
        for path in sources.expand_inputs(inputs):
            kind = sources.input_kind(path, args.one_doc_per_line)
            try:
                sources.check_readable(path, kind)
            except sources.InputError as e:
                if not args.skip_bad_files:
                    raise SystemExit(f"error: {e} (pass --skip-bad-files to skip and count it)") from None
                files_skipped.append({"path": str(path), "reason": str(e)})
                continue
            file_units = sources.plan_units([path], args.one_doc_per_line, split)
            units.extend(file_units)
            source_files.append({"path": str(path), "kind": kind, "bytes": sum(u.size for u in file_units), "split": split})
    units = sources.shard_of_units(units, args.shard_index, args.num_shards)
    total_bytes = sum(u.size for u in units)

    prefixes = {"train": args.output_prefix, "valid": valid_prefix(args.output_prefix)}
    want_valid = args.valid_fraction > 0 or bool(args.valid_input)
    dtype = token_dtype_for_vocab(info.vocab_size)
    splits = ["train", "valid"] if want_valid else ["train"]
    sidecars = {s: [word_boundaries.words_path(prefixes[s])] if segmenter.enabled else [] for s in splits}
    writers = {s: IndexedDatasetWriter(prefixes[s], dtype, sidecars=sidecars[s]) for s in splits}
    # the .words files are members of their shard's unit: written under the writer's temporary name
    word_writers = {s: word_boundaries.WordFlagsWriter(writers[s].temp_path(p)) for s in splits for p in sidecars[s]}
    counts: Counter = Counter()
    skipped: Counter = Counter()
    too_long_at: list[str] = []
    progress = _progress(total_bytes, args.progress)
    try:
        for result in _ordered_map(units, args.workers, args.tokenizer, options):
            for split, arrays in result.splits.items():
                writers[split].add_documents(arrays.tokens, arrays.sentence_lengths, arrays.doc_sentence_counts)
                if arrays.word_continues is not None:
                    word_writers[split].add(arrays.word_continues)
            counts.update(result.counts)
            skipped.update(result.skipped)
            too_long_at.extend(result.too_long_at[: 5 - len(too_long_at)])
            if progress is not None:
                progress.update(result.bytes_in)
                elapsed = max(progress.format_dict["elapsed"], 1e-9)
                progress.set_postfix(docs_per_s=f"{counts['docs_in'] / elapsed:,.0f}", refresh=False)
    except (sources.InputError, segmentation.SegmentationError) as e:
        _abort(writers, word_writers)
        raise SystemExit(f"error: {e}") from None
    except BaseException:
        _abort(writers, word_writers)
        raise
    finally:
        if progress is not None:
            progress.close()

    for split, writer in writers.items():
        seg_meta = {**segmenter.metadata(), "cjk_tokens": counts[f"cjk_tokens_{split}"]}
        if split in word_writers:
            word_writers[split].close()
            seg_meta["continuations"] = word_writers[split].num_continuations
        # .bin, .idx (.words) and this metadata appear together (the .json last): a crash never leaves a stale .json
        writer.finalize({
            "format": "megatron-indexed-dataset",
            "format_version": 1,
            "tool": "bert-ds data_tools.preprocess",
            "tool_version": __version__,
            "split": split,
            "dtype": dtype.name,
            "tokenizer": info.to_json(),
            "sources": source_files,
            "shard": {"index": args.shard_index, "num_shards": args.num_shards},
            "options": {
                "text_key": args.text_key,
                "one_doc_per_line": args.one_doc_per_line,
                "valid_fraction": args.valid_fraction,
                "drop_short_docs": args.drop_short_docs,
                "seed": args.seed,
                "max_document_bytes": args.max_document_bytes,
                "sentence_splitter": "data_tools.text v2",
            },
            word_boundaries.METADATA_KEY: seg_meta,
        })
        if not segmenter.enabled:
            # a .words of an earlier run under this prefix would describe other data (it is never read: the new
            # .json records no segmentation; removed so no one is misled)
            word_boundaries.words_path(prefixes[split]).unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    docs_written = counts["docs_train"] + counts["docs_valid"]
    summary = {
        "docs_in": counts["docs_in"],
        "docs_written": docs_written,
        "docs_written_train": counts["docs_train"],
        "docs_written_valid": counts["docs_valid"],
        "docs_skipped": {"empty": skipped["empty"], "one_sentence": skipped["one_sentence"], "too_long": skipped["too_long"]},
        "too_long_examples": too_long_at,
        "max_document_bytes": args.max_document_bytes,
        "docs_with_one_sentence_kept": counts["docs_with_one_sentence"],
        "docs_with_invalid_utf8": counts["docs_with_invalid_utf8"],
        "invalid_utf8_sequences_replaced": counts["invalid_utf8_sequences"],
        "empty_sentences_dropped": counts["empty_sentences_dropped"],
        "files_skipped": files_skipped,
        "sentences": counts["sentences"],
        "tokens": counts["tokens"],
        "word_segmenter": segmenter.name,
        "word_continuations": sum(w.num_continuations for w in word_writers.values()),
        "bytes_in": total_bytes,
        "seconds": round(seconds, 3),
        "mb_per_s": round(total_bytes / 1e6 / max(seconds, 1e-9), 3),
        "workers": args.workers,
        "shard": {"index": args.shard_index, "num_shards": args.num_shards},
        "outputs": [prefixes[s] for s in writers],
    }
    # the bookkeeping identity the summary promises: nothing vanishes silently
    assert summary["docs_in"] == docs_written + sum(summary["docs_skipped"].values()), summary
    return summary


def _abort(writers: dict[str, IndexedDatasetWriter], word_writers: dict[str, word_boundaries.WordFlagsWriter]) -> None:
    """Remove everything written so far (a .words file is closed first: its shard's writer removes it)."""
    for w in word_writers.values():
        w.close()
    for w in writers.values():
        w.abort()


def _progress(total_bytes: int, mode: str):
    from tqdm import tqdm

    disable = {"auto": None, "on": False, "off": True}[mode]  # tqdm: None = only on a terminal
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1_000_000, desc="preprocess", disable=disable, mininterval=1.0, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.preprocess", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text/JSONL(.gz)/parquet files, directories, globs, or a datasets save_to_disk dir")
    p.add_argument("--tokenizer", required=True, help="tokenizer dir (from data_tools.train_tokenizer or a Hugging Face BERT checkpoint)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    p.add_argument("--valid-fraction", type=float, default=0.0, help="share of documents (by content hash) held out as PREFIX_valid")
    p.add_argument("--valid-input", nargs="+", help="files whose documents all go to PREFIX_valid")
    p.add_argument("--shard-index", type=int, default=0, help="this task's part of the input (SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-shards", type=int, default=1, help="number of parts the input is cut into")
    p.add_argument("--text-key", default="text", help="JSON key / column holding the text (JSONL, parquet, datasets)")
    p.add_argument("--one-doc-per-line", action="store_true", help="plain text: each line is a document (default: blank lines separate documents)")
    p.add_argument("--drop-short-docs", action="store_true", help="drop documents with one sentence (default: keep and count them)")
    p.add_argument("--max-document-bytes", type=int, default=sources.MAX_DOCUMENT_BYTES,
                   help="skip (and count) documents longer than this many bytes; with --one-doc-per-line and JSONL, lines "
                        f"(default: {sources.MAX_DOCUMENT_BYTES:,})")
    p.add_argument("--skip-bad-files", action="store_true", help="skip unreadable or binary files, listing them in the summary (default: stop)")
    p.add_argument("--seed", type=int, default=1234, help="key of the held-out split's document hash")
    p.add_argument("--word-segmenter", choices=segmentation.SEGMENTERS, default=segmentation.NO_SEGMENTER,
                   help="jieba: also write PREFIX.words (which Chinese characters continue a word) for Chinese whole-word masking")
    p.add_argument("--user-dict", action="append", metavar="FILE",
                   help="jieba user dictionary ('word [freq] [tag]' per line, UTF-8) for domain terms; repeatable; needs --word-segmenter jieba")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto", help="progress bar on stderr (auto: only on a terminal)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except sources.InputError as e:
        raise SystemExit(f"error: {e}") from None
    skipped = sum(summary["docs_skipped"].values())
    print(
        f"{summary['docs_in']:,} documents in, {summary['docs_written']:,} written "
        f"({summary['docs_written_valid']:,} held out), {skipped:,} skipped {summary['docs_skipped']}; "
        f"{summary['sentences']:,} sentences, {summary['tokens']:,} tokens; "
        f"{summary['bytes_in'] / 1e6:.1f} MB in {summary['seconds']:.1f} s ({summary['mb_per_s']:.2f} MB/s)",
        file=sys.stderr,
    )
    if summary["docs_skipped"]["too_long"]:
        print(f"skipped {summary['docs_skipped']['too_long']:,} document(s) longer than --max-document-bytes "
              f"{summary['max_document_bytes']:,} (first at: {'; '.join(summary['too_long_examples'])}); a plain-text file "
              "without blank lines is one document: if each line is a document, pass --one-doc-per-line", file=sys.stderr)
    if summary["files_skipped"]:
        print(f"skipped {len(summary['files_skipped'])} unreadable file(s): " + "; ".join(f["reason"] for f in summary["files_skipped"]), file=sys.stderr)
    if summary["invalid_utf8_sequences_replaced"]:
        replaced, docs = summary["invalid_utf8_sequences_replaced"], summary["docs_with_invalid_utf8"]
        print(f"replaced {replaced:,} invalid UTF-8 sequence(s) in {docs:,} document(s)", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
