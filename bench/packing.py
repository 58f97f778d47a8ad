"""Packed pretraining rows (``data.packing``) against unpacked pairs: speed, and learning per token.

    python bench/packing.py [--part speed|learning|all] [--steps 25] [--seeds 3] [--learning-steps 600]

Needs ../shared/corpora/zh-fortunes.txt (5,263 short documents) and python-docs.txt (524 long ones), or
``--zh`` / ``--en`` files. Each corpus gets its own WordPiece vocabulary (8,000 tokens) and shards.

1. **Speed**: for zh-fortunes at 128 and 512 tokens and python-docs at 128, the ``mini`` preset (4 layers,
   hidden 256) trains unpacked and packed in the same launch (``deepspeed --num_gpus 2``, 127.0.0.1, one thread
   per rank; ``tests/dist_scripts/train_runs.py`` runs both, one after the other, each exactly as
   ``python -m bert_ds.train``), the same micro batch of ``--micro-batch`` rows, fp32, ZeRO 0, AdamW. Reported:
   non-padding tokens/s (``train/tokens_per_sec``, the mean of the logged windows after the first), pairs/s,
   padding fraction and pairs per row, and the packed/unpacked tokens/s ratio.
   ``--part model``: the same comparison for the model's forward and backward alone, in one process (1 thread),
   packed and unpacked batches alternating so the load of a shared machine falls on both alike.
2. **Learning per token**: zh-fortunes at 128, the ``tiny`` preset, ``--seeds`` seeds per arm on 2 ranks, AdamW,
   linear schedule. A packed row holds ~1.9 pairs here, so the packed arm takes ``--learning-micro-batch`` rows (8)
   and the unpacked arm ``--learning-unpacked-micro-batch`` pairs (15): the same steps and schedule see about the same
   non-padding tokens. Every run keeps a checkpoint each ``--learning-checkpoint-every`` steps; each is scored with
   ``bert_ds.evaluate`` on one fixed evaluation set (seed 0, ``--eval-samples`` unpacked pairs of the held-out shard,
   15% masked), and each run's eval loss is read at the same token budget (interpolated over ``tokens_seen``: the
   smallest final count of all runs). Reported: per-arm mean, range and stdev of that loss, and whether the packed
   mean lies within the unpacked runs' range. In the same launch, an MLM-only run (``data.nsp_mode: none``, packed
   rows' micro batch and steps) is scored on MLM-only rows of the held-out shard against the unigram guess (always
   the commonest token), with its largest logged padding fraction and any NSP tag it logged (there must be none).

The last stdout line is a JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared" / "corpora"
TRAIN_RUNS = REPO / "tests" / "dist_scripts" / "train_runs.py"


def shards(py: str, corpus: Path, out: Path) -> dict:
    """Vocabulary (8,000 WordPieces trained on the corpus) and train / held-out shards."""
    if not (out / "train.idx").exists():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([py, "-m", "data_tools.train_tokenizer", "--input", str(corpus), "--output", str(out / "vocab"), "--vocab-size", "8000"],
                       cwd=REPO, check=True, capture_output=True)  # fmt: skip
        subprocess.run([py, "-m", "data_tools.preprocess", "--input", str(corpus), "--tokenizer", str(out / "vocab"), "--output-prefix",
                        str(out / "train"), "--valid-fraction", "0.02", "--workers", "1", "--progress", "off"],
                       cwd=REPO, check=True, capture_output=True)  # fmt: skip
    return {"train": out / "train", "valid": out / "train_valid", "vocab": out / "vocab"}


def run_config(path: Path, shard: dict, run_dir: Path, **sections) -> Path:
    import yaml

    cfg = {
        "run_dir": str(run_dir),
        "seed": 1234,
        "model": {"preset": "mini"},
        "data": {"train_prefix": str(shard["train"]), "valid_prefix": str(shard["valid"]), "max_seq_length": 128, "num_workers": 1},
        "train": {"max_steps": 25, "micro_batch_size": 8, "precision": "fp32", "zero_stage": 0, "log_interval": 5},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "scheduler": {"name": "constant"},
        "checkpoint": {"interval_steps": 0, "save_final": False, "resume": "none", "overwrite": True},
        "eval": {"interval_steps": 0, "num_samples": 32},
        "logging": {"tensorboard": True},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(runs: list[Path], ranks: int = 2) -> None:
    from bert_ds.cluster.dist import free_port
    from tests.conftest import dist_env

    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(TRAIN_RUNS)]
    for run in runs:
        cmd += ["--run", str(run)]
    import os

    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **dist_env(), "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def scalars(run_dir: Path) -> dict[str, list[float]]:
    from tests.conftest import tensorboard_scalars

    return {tag: [v for _, v in values] for tag, values in tensorboard_scalars(run_dir / "tensorboard").items()}


def speed(py: str, tmp: Path, args) -> list[dict]:
    cases = [("zh-fortunes", args.zh, 128), ("zh-fortunes", args.zh, 512), ("python-docs", args.en, 128)]
    rows = []
    for name, corpus, seq in cases:
        data = shards(py, corpus, tmp / name)
        configs = []
        for packing in (False, True):
            label = f"{name}_{seq}_{'packed' if packing else 'unpacked'}"
            configs.append(run_config(tmp / f"{label}.yaml", data, tmp / label, data={"max_seq_length": seq, "packing": packing},
                                      train={"max_steps": args.steps, "micro_batch_size": args.micro_batch, "log_interval": args.log_interval}))
        launch(configs)
        result = {"corpus": name, "seq": seq, "micro_batch_rows": args.micro_batch, "steps": args.steps}
        for config in configs:
            s = scalars(tmp / config.stem)
            kind = config.stem.rsplit("_", 1)[1]
            timed = slice(1, None)  # the first window holds start-up (workers, first batches)
            result[kind] = {
                "tokens_per_sec": round(statistics.mean(s["train/tokens_per_sec"][timed]), 1),
                "pairs_per_sec": round(statistics.mean(s["train/samples_per_sec"][timed]), 2),
                "padding_fraction": round(statistics.mean(s["train/padding_fraction"]), 4),
                "pairs_per_row": round(statistics.mean(s["train/pairs_per_row"]), 3),
                "mfu": round(statistics.mean(s["train/mfu"][timed]), 4),
            }
        result["tokens_per_sec_ratio"] = round(result["packed"]["tokens_per_sec"] / result["unpacked"]["tokens_per_sec"], 2)
        print(json.dumps(result), flush=True)
        rows.append(result)
    return rows


def learning(py: str, tmp: Path, args) -> dict:
    """Eval MLM loss of packed and unpacked runs after the same number of non-padding training tokens.

    Every run keeps a checkpoint each ``--learning-checkpoint-every`` steps; each is scored on the fixed evaluation
    set, and each run's curve of eval loss over ``tokens_seen`` is interpolated linearly at the budget every run
    reached (the smallest final ``tokens_seen``), so an arm that saw a few percent more tokens gains nothing from it.
    """
    from bert_ds.hf import evaluate

    data = shards(py, args.zh, tmp / "zh-fortunes")

    def learning_run(label: str, seed: int, micro_batch: int, data_section: dict, **sections) -> Path:
        """One run of the comparison: the tiny preset, AdamW 2e-3, linear schedule, seq 128 (plus ``data_section``)."""
        return run_config(tmp / f"{label}.yaml", data, tmp / label, seed=seed, model={"preset": "tiny"},
                          data={"max_seq_length": 128, **data_section},
                          train={"max_steps": args.learning_steps, "micro_batch_size": micro_batch, "log_interval": 10},
                          optimizer={"name": "adamw", "lr": 2e-3}, scheduler={"name": "linear", "warmup_steps": args.learning_steps // 10},
                          **sections)  # fmt: skip

    configs = []
    for seed in range(1, args.seeds + 1):
        for packing in (False, True):
            configs.append(learning_run(
                f"learn_{'packed' if packing else 'unpacked'}_seed{seed}", seed,
                args.learning_micro_batch if packing else args.learning_unpacked_micro_batch, {"packing": packing},
                checkpoint={"interval_steps": args.learning_checkpoint_every, "keep_last": 0, "save_final": True},
            ))  # fmt: skip
    # MLM-only rows (data.nsp_mode: none) on the same corpus, steps and rows per step as the packed arm
    mlm_only = learning_run("learn_mlm_only", 1, args.learning_micro_batch, {"nsp_mode": "none"},
                            checkpoint={"save_final": True}, eval={"interval_steps": 0, "num_samples": args.eval_samples})
    launch([*configs, mlm_only])
    curves: dict[str, list[tuple[int, list[tuple[int, float, float]]]]] = {"unpacked": [], "packed": []}
    for config in configs:
        run_dir = tmp / config.stem
        points = []
        for tag in sorted((run_dir / "checkpoints").glob("step*")):
            marker = json.loads((tag / "bert_ds_complete.json").read_text())
            result = evaluate.run(tag, str(data["valid"]), seed=0, num_samples=args.eval_samples)
            points.append((marker["state"]["tokens_seen"], result["mlm_loss"], result["mlm_acc"]))
        arm = "packed" if "_packed_" in config.stem else "unpacked"
        curves[arm].append((int(config.stem.rsplit("seed", 1)[1]), points))
    budget = min(points[-1][0] for runs in curves.values() for _, points in runs)

    def at_budget(points: list[tuple[int, float, float]], column: int) -> float:
        tokens = [p[0] for p in points]
        return float(np.interp(budget, tokens, [p[column] for p in points]))

    summary: dict = {"steps": args.learning_steps, "token_budget": budget, "runs": {}}
    for arm, runs in curves.items():
        summary["runs"][arm] = [{"seed": seed, "final_tokens_seen": points[-1][0], "eval_mlm_loss": round(at_budget(points, 1), 4),
                                 "eval_mlm_acc": round(at_budget(points, 2), 4),
                                 "curve": [(t, round(loss, 4)) for t, loss, _ in points]} for seed, points in runs]
        losses = [r["eval_mlm_loss"] for r in summary["runs"][arm]]
        summary[arm] = {"mean_eval_mlm_loss": round(statistics.mean(losses), 4), "min": min(losses), "max": max(losses),
                        "stdev": round(statistics.stdev(losses), 4) if len(losses) > 1 else 0.0}
    unpacked = [r["eval_mlm_loss"] for r in summary["runs"]["unpacked"]]
    # the must-show: the packed mean lies within the unpacked runs' seed-to-seed range
    summary["packed_within_unpacked_spread"] = min(unpacked) <= summary["packed"]["mean_eval_mlm_loss"] <= max(unpacked)
    summary["packed_not_worse"] = summary["packed"]["mean_eval_mlm_loss"] <= max(unpacked)
    # evaluated on MLM-only rows of the held-out shard (its own run config), against always guessing the commonest token
    from tests.conftest import best_unigram_accuracy, tensorboard_scalars

    result = evaluate.run(tmp / "learn_mlm_only", str(data["valid"]), seed=0, num_samples=args.eval_samples)
    tags = tensorboard_scalars(tmp / "learn_mlm_only" / "tensorboard")
    summary["mlm_only"] = {"eval_mlm_acc": round(result["mlm_acc"], 4), "eval_mlm_loss": round(result["mlm_loss"], 4),
                           "unigram_acc": round(best_unigram_accuracy(data["valid"]), 4),
                           "padding_fraction_max": round(max(v for _, v in tags["train/padding_fraction"]), 4),
                           "nsp_tags": sorted(tag for tag in tags if "nsp" in tag)}
    print(json.dumps(summary), flush=True)
    return summary


def model_only(py: str, tmp: Path, args) -> list[dict]:
    """Forward + backward of the ``mini`` model alone (one process), packed and unpacked batches alternating, so a
    shared machine's load falls on both alike: non-padding tokens per second of model time."""
    import time

    from bert_ds.config import load_run_config
    from bert_ds.data.loader import collate
    from bert_ds.data.run_datasets import train_dataset
    from bert_ds.data.vocab import resolve_vocab
    from bert_ds.model import build_model

    cases = [("zh-fortunes", args.zh, 128), ("zh-fortunes", args.zh, 512), ("python-docs", args.en, 128)]
    rows = []
    for name, corpus, seq in cases:
        data = shards(py, corpus, tmp / name)
        config = run_config(tmp / f"model_{name}_{seq}.yaml", data, tmp / "unused", data={"max_seq_length": seq})
        batches, model = {}, None
        for packing in (False, True):
            cfg = load_run_config(config, [f"data.packing={str(packing).lower()}"])
            vocab = resolve_vocab(cfg)
            ds = train_dataset(cfg, vocab)
            batches[packing] = [collate([ds[b * args.micro_batch + i] for i in range(args.micro_batch)]) for b in range(args.model_batches)]
            model = model or build_model(cfg.model, vocab.size, seed=0)
        seconds, tokens = {False: 0.0, True: 0.0}, {False: 0, True: 0}
        for b in range(args.model_batches):
            for packing in (False, True):
                batch = batches[packing][b]
                t0 = time.perf_counter()
                out = model(**batch)
                (out.mlm_loss_sum + out.nsp_loss_sum).backward()
                model.zero_grad(set_to_none=True)
                if b:  # the first batch of each kind warms up
                    seconds[packing] += time.perf_counter() - t0
                    tokens[packing] += int(batch["attention_mask"].sum())
        rate = {k: tokens[k] / seconds[k] for k in seconds}
        result = {"corpus": name, "seq": seq, "unpacked_tokens_per_sec": round(rate[False], 1), "packed_tokens_per_sec": round(rate[True], 1),
                  "ratio": round(rate[True] / rate[False], 2)}
        print(json.dumps(result), flush=True)
        rows.append(result)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("speed", "model", "learning", "all"), default="all")
    p.add_argument("--zh", type=Path, default=SHARED / "zh-fortunes.txt")
    p.add_argument("--en", type=Path, default=SHARED / "python-docs.txt")
    p.add_argument("--steps", type=int, default=25, help="speed: steps per run")
    p.add_argument("--log-interval", type=int, default=5, help="speed: steps per throughput window")
    p.add_argument("--micro-batch", type=int, default=8, help="speed: rows per rank per step, both arms")
    p.add_argument("--model-batches", type=int, default=6, help="model: batches of each kind (the first warms up)")
    p.add_argument("--seeds", type=int, default=3, help="learning: seeds per arm")
    p.add_argument("--learning-steps", type=int, default=600)
    p.add_argument("--learning-checkpoint-every", type=int, default=100, help="learning: steps between scored checkpoints")
    p.add_argument("--learning-micro-batch", type=int, default=8, help="learning: packed rows per rank")
    p.add_argument("--learning-unpacked-micro-batch", type=int, default=15,
                   help="learning: unpacked pairs per rank (zh-fortunes packs ~1.9 pairs per row at 128: 8 rows ~ 15 pairs)")
    p.add_argument("--eval-samples", type=int, default=512, help="learning: pairs in the fixed evaluation set")
    p.add_argument("--work-dir", type=Path, help="keep shards and runs here (default: a temporary directory)")
    args = p.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        tmp = args.work_dir or Path(d)
        out = {}
        if args.part in ("speed", "all"):
            out["speed"] = speed(py, tmp, args)
        if args.part in ("model", "all"):
            out["model"] = model_only(py, tmp, args)
        if args.part in ("learning", "all"):
            out["learning"] = learning(py, tmp, args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
