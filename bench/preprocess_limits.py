"""Preprocessing hostile inputs at 1 GB: one single line, no blank line at all, one giant JSONL record.

    python bench/preprocess_limits.py [--size-mb 1000] [--workers 2]

Each input is made in a temporary directory (nothing is kept) as a 16 MB and a ``--size-mb`` version, and run
through ``data_tools.preprocess`` with the default ``--max-document-bytes`` (8 MiB): the document is skipped and
counted, so what is measured is how fast and in how little memory the input is got through. Reported: wall time of
the whole command, MB/s, peak RSS of the process tree (sampled every 20 ms, as ``bench/preprocess.py``), and each
run's time per MB relative to the 16 MB run's in the same run (1.0 = linear; below 1: start-up amortised). One more
row is a plain-text document just under the cap (8,000,000 bytes without a blank line), which is processed: the most
memory one document can take.

Measured 2026-12-02 on a 2-core AMD EPYC VM (24 GiB, shared with two other jobs, page cache warm: each file was
just written), 2 workers (`python bench/preprocess_limits.py`):

| input | size | seconds | MB/s | peak RSS | time per MB vs 16 MB |
|---|---|---|---|---|---|
| single line | 16 MB | 0.3 | 63.0 | 43 MB | 1.00 |
| single line | 1,000 MB | 0.7 | 1,484.3 | 104 MB | 0.04 |
| no blank line | 16 MB | 0.3 | 49.4 | 118 MB | 1.00 |
| no blank line | 1,000 MB | 2.5 | 407.5 | 118 MB | 0.12 |
| JSONL, one record | 16 MB | 0.2 | 70.4 | 43 MB | 1.00 |
| JSONL, one record | 1,000 MB | 0.5 | 2,096.1 | 104 MB | 0.03 |
| one document just under the cap | 8 MB | 1.4 | 5.9 | 342 MB | (processed) |

The 16 MB runs are mostly start-up (and end before the 20 ms sampler sees the workers: their peak RSS is low).
Before the fix, reading alone (``tests/test_preprocess_limits.py`` on main at ba56d61) took 51x longer for a 64 MB line
than for an 8 MB one, and the document was held whole; a 1 GB line would have needed ~1,000 passes over the file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess import REPO, run_measured  # noqa: E402  (bench/preprocess.py: the same measurement)

SENTENCE = b"The quick brown fox jumps over the lazy dog near the river bank. "
MB = 1_000_000


def write_repeated(path: Path, unit: bytes, size: int, head: bytes = b"", tail: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(head)
        block = unit * max(1, (1 << 22) // len(unit))
        left = size - len(head) - len(tail)
        while left > 0:
            f.write(block[:left])
            left -= min(left, len(block))
        f.write(tail)
    return path


INPUTS = {
    "single line": lambda p, n: write_repeated(p.with_suffix(".txt"), SENTENCE, n),
    "no blank line": lambda p, n: write_repeated(p.with_suffix(".txt"), SENTENCE.rstrip() + b"\n", n),
    "JSONL, one record": lambda p, n: write_repeated(p.with_suffix(".jsonl"), SENTENCE, n, b'{"text": "', b'"}\n'),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=1000, help="size of the big version of each input")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_limits_") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        subprocess.run([py, "-m", "data_tools.sample_corpus", "synthetic", "--output", corpus, "--num-docs", "500"], cwd=REPO, check=True, capture_output=True)
        subprocess.run([py, "-m", "data_tools.train_tokenizer", "--input", corpus, "--output", tmp / "vocab", "--vocab-size", "2000"],
                       cwd=REPO, check=True, capture_output=True)
        rows = []

        def run(name: str, path: Path) -> dict:
            cmd = [py, "-m", "data_tools.preprocess", "--input", str(path), "--tokenizer", str(tmp / "vocab"),
                   "--output-prefix", str(tmp / "out"), "--workers", str(args.workers), "--progress", "off"]
            r = run_measured(cmd)
            summary = json.loads(r["stdout"].strip().splitlines()[-1])
            size = path.stat().st_size / MB
            row = {"input": name, "mb": size, "seconds": r["seconds"], "mb_per_s": size / r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                   "docs_skipped": summary["docs_skipped"], "docs_written": summary["docs_written"]}
            rows.append(row)
            path.unlink()
            return row

        print(f"data_tools.preprocess, {args.workers} workers, default --max-document-bytes")
        print("| input | size | seconds | MB/s | peak RSS | time per MB vs 16 MB |\n|---|---|---|---|---|---|")
        for name, make in INPUTS.items():
            small = run(name, make(tmp / "small", 16 * MB))
            big = run(name, make(tmp / "big", args.size_mb * MB))
            for row in (small, big):
                rel = (row["seconds"] / row["mb"]) / (small["seconds"] / small["mb"])
                print(f"| {name} | {row['mb']:,.0f} MB | {row['seconds']:.1f} | {row['mb_per_s']:,.1f} | {row['peak_rss_mb']:.0f} MB | {rel:.2f} |",
                      flush=True)
            assert small["docs_skipped"]["too_long"] == big["docs_skipped"]["too_long"] == 1, (small, big)
        at_cap = run("one document just under the cap", INPUTS["no blank line"](tmp / "cap", 8 * MB))
        assert at_cap["docs_written"] == 1, at_cap
        print(f"| one document just under the cap | 8 MB | {at_cap['seconds']:.1f} | {at_cap['mb_per_s']:.1f} | {at_cap['peak_rss_mb']:.0f} MB | (processed) |")
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
