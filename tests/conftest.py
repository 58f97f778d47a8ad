"""Shared fixtures: a generated corpus and a vocabulary trained on it, made once per session."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Threads per process: the machine's cores, shared out when pytest-xdist runs several workers (more
# OpenMP threads than cores run several times slower). Set before torch is imported, so this process
# and every one it starts inherit it; multi-rank launches set one thread per rank (dist_env).
THREADS = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ.setdefault("OMP_NUM_THREADS", THREADS)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no model hub at test time: everything loads from local directories
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_module(module: str, *args: str, check: bool = True, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m module args` (or `python script.py args`) the way a user does; returns the completed process."""
    proc = subprocess.run(
        [sys.executable, *([module] if module.endswith(".py") else ["-m", module]), *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    from data_tools.sample_corpus import synthetic_documents, write_corpus

    d = tmp_path_factory.mktemp("corpus")
    docs = synthetic_documents(600, seed=1)
    # two files, the second with an extra real-text flavour: abbreviations, decimals, CJK
    write_corpus(docs[:400], d / "a.txt")
    extra = [
        "Dr. Smith arrived at 3.30 p.m. with Mr. Jones. They read e.g. the U.S. report on version 3.11 of Python. It was long!",
        "机器学习很有趣。我们今天训练模型！你准备好了吗？是的。",
        "Visit https://example.com/a.b?c=d for more. Then go home. Ellipses... Work too.",
    ]
    write_corpus(docs[400:] + extra, d / "b.txt")
    return d


@pytest.fixture(scope="session")
def vocab_dir(corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vocab")
    run_module("data_tools.train_tokenizer", "--input", corpus_dir, "--output", out, "--vocab-size", "400")
    return out


def dist_env() -> dict:
    """Environment for multi-rank tests: loopback only, one thread per rank, the project's op cache."""
    return {
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
        "TOKENIZERS_PARALLELISM": "false",
    }


def deepspeed_launch(module: str, *args: str, num_ranks: int = 2, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --module ...` on 127.0.0.1, real ranks; a ``module`` ending in .py is launched as a script."""
    from bert_ds.cluster.dist import free_port  # imported here: torch loads after the thread settings above

    launcher = Path(sys.executable).with_name("deepspeed")
    target = [module] if module.endswith(".py") else ["--module", module]
    cmd = [str(launcher), "--num_gpus", str(num_ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target, *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **dist_env()})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc


TRAIN_RUNS = REPO / "tests" / "dist_scripts" / "train_runs.py"


@dataclass
class Launch:
    """What a ``train_runs`` launch gave: each run's ``TrainResult`` (as a dict, in order) and the launch's stderr."""

    results: list[dict]
    stderr: str


def train_runs(*runs: tuple, num_ranks: int = 1, timeout: float = 900, record_rng: Path | None = None, record_optimizer: bool = False,
               record_state: Path | None = None) -> Launch:
    """Train several runs, each ``(config, *overrides)``, one after another in one launch (tests/dist_scripts/train_runs.py).

    One process for ``num_ranks=1`` (``THREADS`` threads), else ``deepspeed --num_gpus N`` on 127.0.0.1.
    ``record_rng``: every rank saves its RNG states at each run's first step there (``run{i}_rank{r}.pt``).
    ``record_optimizer``: each result gets ``optimizer_steps``, the param-group settings of every optimizer step (rank 0).
    ``record_state``: each run's final fp32 weights, optimizer moments and step counts, gathered whole, go there (``run{i}.pt``).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        results = Path(d) / "results.json"
        args = [a for run in runs for a in ("--run", *map(str, run))] + ["--results", str(results)]
        args += ["--record-rng", str(record_rng)] if record_rng else []
        args += ["--record-optimizer"] if record_optimizer else []
        args += ["--record-state", str(record_state)] if record_state else []
        if num_ranks > 1:
            proc = deepspeed_launch(str(TRAIN_RUNS), *args, num_ranks=num_ranks, timeout=timeout)
        else:
            proc = run_module(str(TRAIN_RUNS), *args, timeout=timeout)
        return Launch(json.loads(results.read_text()), proc.stderr)


def content_tokens(prefix: Path, num_special: int = 5):
    """A shard's token ids without the special tokens (ids below ``num_special``), as a numpy array."""
    import numpy as np

    from bert_ds.data.indexed_dataset import IndexedDataset

    tokens = np.asarray(IndexedDataset(prefix).tokens)
    return tokens[tokens >= num_special]


def best_unigram_accuracy(prefix: Path) -> float:
    """Accuracy of always predicting the most frequent token: the bar a model must clear."""
    tokens = content_tokens(prefix)
    counts = collections.Counter(tokens.tolist())
    return max(counts.values()) / sum(counts.values())


def unigram_cross_entropy(train_prefix: Path, eval_prefix: Path) -> float:
    """Mean loss of always predicting the training tokens' frequencies, on the held-out tokens: the loss of a model
    that has learned which tokens are common and nothing about context."""
    import numpy as np

    train, held_out = content_tokens(train_prefix), content_tokens(eval_prefix)
    frequency = np.bincount(train, minlength=int(held_out.max()) + 1) / train.size
    return float(-np.mean(np.log(np.maximum(frequency[held_out], 1e-9))))


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="session")
def pretraining_shards(tmp_path_factory) -> dict:
    """A synthetic corpus with learnable structure -> vocab -> train and held-out shards."""
    from data_tools.sample_corpus import synthetic_documents, write_corpus

    d = tmp_path_factory.mktemp("pretraining")
    write_corpus(synthetic_documents(1500, seed=7), d / "corpus.txt")
    run_module("data_tools.train_tokenizer", "--input", d / "corpus.txt", "--output", d / "vocab", "--vocab-size", "400")
    run_module("data_tools.preprocess", "--input", d / "corpus.txt", "--tokenizer", d / "vocab", "--output-prefix", d / "train",
               "--valid-fraction", "0.05", "--workers", "1")
    return {"dir": d, "vocab": d / "vocab", "train": d / "train", "valid": d / "train_valid"}


def write_run_config(path: Path, shards: dict, run_dir: Path, **sections) -> Path:
    """A small, fast run config; `sections` update its sections (e.g. train={"zero_stage": 2})."""
    import yaml

    cfg = {
        "run_dir": str(run_dir),
        "seed": 1234,
        "model": {"preset": "tiny", "overrides": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2}},
        "data": {"train_prefix": str(shards["train"]), "valid_prefix": str(shards["valid"]), "max_seq_length": 64, "num_workers": 1},
        "train": {"max_steps": 20, "micro_batch_size": 8, "precision": "fp32", "zero_stage": 0, "log_interval": 1},
        "optimizer": {"name": "lamb", "lr": 5e-3},
        "scheduler": {"name": "linear", "warmup_steps": 2},
        "checkpoint": {"interval_steps": 0, "keep_last": 2},
        "eval": {"interval_steps": 0, "num_samples": 64},
        # logging: the shipped defaults (the MFU peak is measured at start-up, as users get it)
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg[section] = {**cfg.get(section, {}), **values}
        else:
            cfg[section] = values
    path.write_text(yaml.safe_dump(cfg))
    return path
