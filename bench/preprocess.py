"""Preprocessing throughput and peak memory, against a baseline measured in the same run.

    python bench/preprocess.py [--corpus FILE] [--scale 10] [--workers 1 2]

Measures, on one corpus (default: ../shared/corpora/python-docs.txt when present, else the
standard-library docstrings corpus):
  * bert-ds ``data_tools.preprocess`` (sentence splitting on) with 1 and 2 workers;
  * the same on a corpus ``--scale`` times larger, to show peak RSS does not grow with size;
  * baseline: Hugging Face ``datasets.map`` batched tokenization with ``BertTokenizerFast``
    (the ``run_mlm.py`` recipe, no sentence splitting) with 2 processes.
MB/s counts raw input bytes over the wall time of the whole command (start-up included).
Peak RSS is the largest sum over the process tree (main + workers), sampled every 20 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "corpora" / "python-docs.txt"


def run_measured(cmd: list[str]) -> dict:
    """Run a command; return wall seconds and the peak RSS summed over its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        # RSS every 20 ms; the process tree every 10th sample: listing children scans all of /proc (~2 ms),
        # CPU the measured command's workers would otherwise lose on a 2-core machine
        nonlocal peak
        root = psutil.Process(proc.pid)
        procs, n = [root], 0
        while not done.is_set():
            try:
                if n % 10 == 0:
                    procs = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            n += 1
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{err}")
    return {"seconds": seconds, "peak_rss_mb": peak / 2**20, "stdout": out}


BASELINE = textwrap.dedent(
    """
    import os, sys
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import datasets
    from transformers import BertTokenizerFast
    corpus, vocab, cache, procs = sys.argv[1:5]
    tok = BertTokenizerFast.from_pretrained(vocab)
    ds = datasets.load_dataset("text", data_files=corpus, split="train", cache_dir=cache)
    ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True, num_proc=int(procs))
    ds = ds.map(lambda b: tok(b["text"], add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False),
                batched=True, num_proc=int(procs), remove_columns=["text"])
    print(sum(len(x) for x in ds["input_ids"]))
    """
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=SHARED_CORPUS if SHARED_CORPUS.exists() else None)
    p.add_argument("--scale", type=int, default=10, help="size of the large corpus relative to the first (0 skips it)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-baseline", action="store_true")
    args = p.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        corpus = args.corpus
        if corpus is None:
            corpus = tmp / "stdlib.txt"
            subprocess.run([py, "-m", "data_tools.sample_corpus", "stdlib", "--output", corpus, "--num-docs", "0"], cwd=REPO, check=True, capture_output=True)
        size = corpus.stat().st_size
        print(f"corpus: {corpus} ({size / 1e6:.1f} MB)", flush=True)
        subprocess.run([py, "-m", "data_tools.train_tokenizer", "--input", corpus, "--output", tmp / "vocab"], cwd=REPO, check=True, capture_output=True)

        rows = []

        def bert_ds(name: str, path: Path, workers: int) -> dict:
            cmd = [py, "-m", "data_tools.preprocess", "--input", str(path), "--tokenizer", str(tmp / "vocab"),
                   "--output-prefix", str(tmp / name), "--workers", str(workers), "--progress", "off"]
            r = run_measured(cmd)
            summary = json.loads(r["stdout"].strip().splitlines()[-1])
            row = {"name": name, "mb": path.stat().st_size / 1e6, "workers": workers, "seconds": r["seconds"],
                   "mb_per_s": path.stat().st_size / 1e6 / r["seconds"], "peak_rss_mb": r["peak_rss_mb"], "tokens": summary["tokens"]}
            rows.append(row)
            print(f"  {name:<28} {row['mb']:7.1f} MB  {workers} workers  {row['seconds']:6.1f} s  "
                  f"{row['mb_per_s']:6.2f} MB/s  peak RSS {row['peak_rss_mb']:6.0f} MB", flush=True)
            return row

        print("bert-ds data_tools.preprocess (sentence splitting on):")
        results = {w: bert_ds(f"bert_ds_{w}w", corpus, w) for w in args.workers}
        large = None
        if args.scale > 1:
            big = tmp / "big.txt"
            with open(big, "wb") as out:
                data = corpus.read_bytes().rstrip(b"\n") + b"\n\n"
                for _ in range(args.scale):
                    out.write(data)
            large = bert_ds(f"bert_ds_{max(args.workers)}w_x{args.scale}", big, max(args.workers))
            big.unlink()
        base = None
        if not args.no_baseline:
            script = tmp / "baseline.py"
            script.write_text(BASELINE)
            r = run_measured([py, str(script), str(corpus), str(tmp / "vocab"), str(tmp / "hf_cache"), "2"])
            base = {"name": "hf_datasets_map_2proc", "mb": size / 1e6, "seconds": r["seconds"],
                    "mb_per_s": size / 1e6 / r["seconds"], "peak_rss_mb": r["peak_rss_mb"]}
            rows.append(base)
            print(f"baseline: HF datasets.map + BertTokenizerFast, 2 processes, no sentence splitting: "
                  f"{base['mb_per_s']:.2f} MB/s, peak RSS {base['peak_rss_mb']:.0f} MB")
        best = results[max(args.workers)]
        print("\nresults:")
        if base:
            print(f"  bert-ds {max(args.workers)} workers / HF datasets.map 2 proc: {best['mb_per_s'] / base['mb_per_s']:.1f}x MB/s")
        if len(results) > 1:
            print(f"  bert-ds {max(args.workers)} workers / 1 worker: {best['mb_per_s'] / results[min(args.workers)]['mb_per_s']:.2f}x MB/s")
        print(f"  target: >= 4 MB/s with 2 workers -> {best['mb_per_s']:.2f} MB/s ({'MET' if best['mb_per_s'] >= 4 else 'NOT MET'})")
        if large:
            ratio = large["peak_rss_mb"] / best["peak_rss_mb"]
            print(f"  peak RSS on the {args.scale}x corpus / 1x corpus: {ratio:.2f} ({large['peak_rss_mb']:.0f} MB vs {best['peak_rss_mb']:.0f} MB; "
                  f"target < 1024 MB: {'MET' if large['peak_rss_mb'] < 1024 else 'NOT MET'})")
        print(json.dumps({"corpus_mb": size / 1e6, "rows": rows}))


if __name__ == "__main__":
    main()
