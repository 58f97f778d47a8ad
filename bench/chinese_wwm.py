"""Chinese whole-word masking: preprocessing cost of word segmentation, and the masking it gives on real text.

    python bench/chinese_wwm.py [--repeat 4] [--scale 10] [--workers 2] [--samples 4000]

Needs ../shared/corpora/zh-fortunes.txt and zh-debian-reference.txt (or --corpora FILES).

1. Throughput and peak memory (RSS summed over the process tree, as bench/preprocess.py) of
   ``data_tools.preprocess`` on the Chinese corpora (concatenated ``--repeat`` times) with
   ``--word-segmenter none`` and ``jieba``, ``--workers`` workers; then ``jieba`` on a corpus ``--scale``
   times larger, to show memory stays flat. MB/s counts input bytes over the whole command's wall time.
2. Masking statistics of ``data.whole_word_mask: true`` on each corpus, over ``--samples`` training samples
   (seq 128, the trainer's own dataset code): masked share of maskable tokens, segmented words partly
   masked (must be 0), how long the masked Chinese words are, and English ``##`` words masked whole.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from preprocess import run_measured  # noqa: E402  (bench/preprocess.py: wall time + peak RSS of a process tree)

SHARED = REPO.parent / "shared" / "corpora"
CORPORA = [SHARED / "zh-fortunes.txt", SHARED / "zh-debian-reference.txt"]


def preprocess(py: str, corpus: Path, vocab: Path, out: Path, workers: int, segmenter: str) -> dict:
    cmd = [py, "-m", "data_tools.preprocess", "--input", str(corpus), "--tokenizer", str(vocab), "--output-prefix", str(out),
           "--workers", str(workers), "--progress", "off", "--word-segmenter", segmenter]
    r = run_measured(cmd)
    mb = corpus.stat().st_size / 1e6
    return {"corpus_mb": round(mb, 2), "segmenter": segmenter, "workers": workers, "seconds": round(r["seconds"], 2),
            "mb_per_s": round(mb / r["seconds"], 2), "peak_rss_mb": round(r["peak_rss_mb"]), **{
                k: v for k, v in json.loads(r["stdout"].strip().splitlines()[-1]).items() if k in ("tokens", "word_continuations")}}


def masking_stats(prefix: Path, vocab_dir: Path, num_samples: int) -> dict:
    """Samples of the trainer's dataset with whole-word masking; word groups from the flags it handed to masking."""
    import bert_ds.data.pretraining as pretraining
    from bert_ds.data import word_boundaries
    from bert_ds.data.masking import IGNORE_INDEX, continuation_table
    from bert_ds.data.vocab import load_tokenizer, vocab_tokens

    tokens = vocab_tokens(load_tokenizer(vocab_dir))
    ids = {t: tokens.index(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")}
    seen = []
    original = pretraining.mask_tokens

    def recording(input_ids, *args, word_continues=None, **kwargs):
        out = original(input_ids, *args, word_continues=word_continues, **kwargs)
        seen.append((input_ids, word_continues, out[1]))
        return out

    pretraining.mask_tokens = recording
    try:
        ds = pretraining.PretrainingDataset(
            str(prefix), vocab_size=len(tokens), cls_id=ids["[CLS]"], sep_id=ids["[SEP]"], pad_id=ids["[PAD]"], mask_id=ids["[MASK]"],
            unk_id=ids["[UNK]"], max_seq_length=128, max_predictions_per_seq=20, seed=1234, whole_word_mask=True,
            is_continuation=continuation_table(tokens), is_cjk_token=word_boundaries.cjk_token_table(tokens))
        for i in range(min(num_samples, 10 * len(ds))):
            ds[i]
    finally:
        pretraining.mask_tokens = original
    is_cont = continuation_table(tokens)
    is_cjk = word_boundaries.cjk_token_table(tokens)
    special = {ids[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]")}
    structural = {ids[t] for t in ("[CLS]", "[SEP]", "[PAD]")}
    masked = candidates = partial = 0
    chinese_words_masked, chinese_lengths, english_whole = 0, [], 0
    for input_ids, cont, labels in seen:
        chosen = labels != IGNORE_INDEX
        masked += int(chosen.sum())
        candidates += sum(t not in special for t in input_ids.tolist())
        # words, by the plain rule: a flagged token joins its left neighbour's word, a ## piece a maskable one
        words, current = [], None
        for i, t in enumerate(input_ids.tolist()):
            if t in structural:
                current = None
                continue
            joins = current is not None and (bool(cont[i]) or (is_cont[t] and input_ids[i - 1] not in special and t not in special))
            if not joins:
                current = []
                words.append(current)
            if t not in special:
                current.append(i)
        for w in words:
            if not w:
                continue
            flags = chosen[w]
            partial += int(flags.any() and not flags.all())
            if flags.all() and is_cjk[input_ids[w[0]]]:
                chinese_words_masked += 1
                chinese_lengths.append(len(w))
            english_whole += int(flags.all() and len(w) > 1 and is_cont[input_ids[w[1]]])
    lengths = np.asarray(chinese_lengths)
    return {"samples": len(seen), "masked_share": round(masked / candidates, 4), "partially_masked_words": partial,
            "chinese_words_masked": chinese_words_masked, "mean_masked_chinese_word_chars": round(float(lengths.mean()), 2),
            "masked_chinese_words_of_2plus_chars": round(float((lengths >= 2).mean()), 3), "english_multi_piece_words_masked_whole": english_whole}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", type=Path, nargs="+", default=CORPORA)
    p.add_argument("--repeat", type=int, default=4, help="the throughput corpus is the corpora concatenated this many times")
    p.add_argument("--scale", type=int, default=10, help="the memory check's corpus is this many times the throughput corpus (0: skip)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples", type=int, default=4000)
    args = p.parse_args()
    missing = [str(c) for c in args.corpora if not c.exists()]
    if missing:
        raise SystemExit(f"corpus not found: {', '.join(missing)}")
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_zh_") as tmp:
        tmp = Path(tmp)
        joined = b"".join(c.read_bytes().rstrip(b"\n") + b"\n\n" for c in args.corpora)
        corpus = tmp / "zh.txt"
        corpus.write_bytes(joined * args.repeat)
        print(f"corpus: {', '.join(c.name for c in args.corpora)} x {args.repeat} = {corpus.stat().st_size / 1e6:.1f} MB", flush=True)
        # a Chinese BERT-sized vocabulary (bert-base-chinese has 21,128 entries) from the corpora themselves
        subprocess.run([py, "-m", "data_tools.train_tokenizer", "--input", *map(str, args.corpora), "--output", str(tmp / "vocab"),
                        "--vocab-size", "21128"], cwd=REPO, check=True, capture_output=True)
        for segmenter in ("none", "jieba"):
            rows.append(preprocess(py, corpus, tmp / "vocab", tmp / f"out_{segmenter}", args.workers, segmenter))
            print(f"  {segmenter:<6} {args.workers} workers: {rows[-1]}", flush=True)
        if args.scale > 1:
            big = tmp / "big.txt"
            with open(big, "wb") as out:
                for _ in range(args.scale):
                    out.write(corpus.read_bytes())
            rows.append(preprocess(py, big, tmp / "vocab", tmp / "out_big", args.workers, "jieba"))
            print(f"  jieba  {args.workers} workers, {args.scale}x corpus: {rows[-1]}", flush=True)
            big.unlink()
        base, seg = rows[0], rows[1]
        print(f"segmentation costs {seg['seconds'] / base['seconds']:.2f}x the time; target >= 2 MB/s with 2 workers: "
              f"{seg['mb_per_s']} MB/s ({'MET' if seg['mb_per_s'] >= 2 else 'NOT MET'})")
        if args.scale > 1:
            print(f"peak RSS, {args.scale}x corpus / 1x: {rows[2]['peak_rss_mb'] / seg['peak_rss_mb']:.2f}")
        stats = {}
        for c in args.corpora:
            prefix = tmp / c.stem
            subprocess.run([py, "-m", "data_tools.preprocess", "--input", str(c), "--tokenizer", str(tmp / "vocab"), "--output-prefix",
                            str(prefix), "--workers", str(args.workers), "--progress", "off", "--word-segmenter", "jieba"],
                           cwd=REPO, check=True, capture_output=True)
            stats[c.name] = masking_stats(prefix, tmp / "vocab", args.samples)
            print(f"masking, {c.name}: {stats[c.name]}", flush=True)
        print(json.dumps({"preprocess": rows, "masking": stats}))


if __name__ == "__main__":
    main()
