"""Shared fixtures: a generated corpus and a vocabulary trained on it, made once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# one thread per test process: CI has 2 cores and multi-rank tests start several processes
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_module(module: str, *args: str, check: bool = True, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m module args` the way a user does; returns the completed process."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
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
