"""Resuming on another number of ranks (issue 14): the checks made before any engine exists, the global batch and the
data position kept, and, with real ranks, the state and the losses after a 2 -> 1 -> 2 rank resume.

Launches (each costs ~25 s of imports on 2 cores, more than the steps): one 2-rank launch trains every run that writes
a checkpoint, one 1-process launch resumes them all, one 2-rank launch resumes the 1-rank checkpoints again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bert_ds import checkpoint
from bert_ds.checkpoint import COMPLETE_MARKER, UNIVERSAL_DIR, CheckpointError, tag_for_step
from bert_ds.config import ConfigError, run_config_from_dict
from bert_ds.data.loader import RankBatchSampler
from bert_ds.resume import plan_resume
from tests.conftest import tensorboard_scalars, train_runs, write_run_config

# -- before any engine: the plan ------------------------------------------------------------------------------------


def _config(run_dir: Path, **train) -> object:
    return run_config_from_dict({
        "run_dir": str(run_dir), "model": {"preset": "tiny"}, "data": {"train_prefix": "unused"},
        "train": {"max_steps": 10, "micro_batch_size": 8, "zero_stage": 2, **train},
    })  # fmt: skip


def _saved(run_dir: Path, step: int = 4, world_size: int = 2, zero_stage: int = 2, global_batch: int = 16, vocab: str = "abc") -> Path:
    tag = run_dir / "checkpoints" / tag_for_step(step)
    tag.mkdir(parents=True)
    state = {"step": step, "consumed_samples": step * global_batch, "tokens_seen": 0, "skipped_steps": 0}
    marker = {"step": step, "world_size": world_size, "state": state, "zero_stage": zero_stage, "vocab_sha256": vocab,
              "tokenizer": "vocab/", "global_batch_size": global_batch}  # fmt: skip
    (tag / COMPLETE_MARKER).write_text(json.dumps(marker))
    return tag


def test_another_world_size_keeps_the_checkpoints_global_batch_by_deriving_accumulation(tmp_path):
    _saved(tmp_path, world_size=2, global_batch=16)  # 8 micro x 1 accumulation x 2 ranks
    cfg, plan = plan_resume(_config(tmp_path), world_size=1, vocab_sha256="abc")
    assert cfg.train.grad_accum_steps == 2 and cfg.train.global_batch(1) == 16
    assert plan.universal and plan.saved_world_size == 2 and plan.global_batch == 16
    _saved(tmp_path / "b", world_size=1, global_batch=32)  # 8 x 4 x 1, resumed on 4 ranks: 8 x 1 x 4
    cfg, plan = plan_resume(_config(tmp_path / "b", grad_accum_steps=4), world_size=4, vocab_sha256="abc")
    assert cfg.train.grad_accum_steps == 1 and plan.universal
    # the same world size changes nothing and converts nothing
    cfg, plan = plan_resume(_config(tmp_path, grad_accum_steps=3), world_size=2, vocab_sha256="abc")
    assert cfg.train.grad_accum_steps == 3 and not plan.universal
    # ZeRO 0 state is whole on every rank: loaded directly
    _saved(tmp_path / "z0", zero_stage=0)
    _, plan = plan_resume(_config(tmp_path / "z0", zero_stage=0), world_size=1, vocab_sha256="abc")
    assert not plan.universal
    # train.global_batch_size, when set, is the run's choice
    cfg, _ = plan_resume(_config(tmp_path, global_batch_size=32), world_size=1, vocab_sha256="abc")
    assert cfg.train.grad_accum_steps == 4


def test_a_global_batch_that_cannot_be_kept_stops_naming_the_numbers_and_the_keys(tmp_path):
    _saved(tmp_path, world_size=2, global_batch=16)
    with pytest.raises(ConfigError) as e:
        plan_resume(_config(tmp_path), world_size=3, vocab_sha256="abc")
    message = str(e.value)
    assert "global batch 16 cannot be kept on 3 ranks" in message and "train.micro_batch_size (8) x 3 ranks = 24" in message
    assert "train.global_batch_size" in message
    with pytest.raises(ConfigError, match=r"Set train.micro_batch_size=4 to keep it"):
        plan_resume(_config(tmp_path), world_size=4, vocab_sha256="abc")  # 16 = 4 x 1 x 4


def test_another_vocabulary_or_an_unsupported_stage_change_stops_before_any_engine(tmp_path):
    _saved(tmp_path, zero_stage=2, vocab="abc")
    with pytest.raises(CheckpointError, match="vocabulary"):
        plan_resume(_config(tmp_path), world_size=1, vocab_sha256="def")
    with pytest.raises(CheckpointError, match=r"a ZeRO-2 checkpoint cannot be resumed with train.zero_stage=3.*set train.zero_stage=2"):
        plan_resume(_config(tmp_path, zero_stage=3), world_size=1, vocab_sha256="abc")
    _, plan = plan_resume(_config(tmp_path, zero_stage=1), world_size=2, vocab_sha256="abc")  # 1 and 2 share a format
    assert plan.universal


def test_a_steps_samples_are_the_same_whatever_the_split_of_its_global_batch():
    """Step k of global batch G trains samples [k G, (k + 1) G) however G = micro x accumulation x ranks, also after a
    resume at ``consumed_samples`` on another split: with the loss normalised by the global batch's counts (trainer),
    the step's objective is the same."""
    global_batch, consumed = 16, 48
    for world_size, micro in ((1, 16), (1, 8), (2, 8), (2, 4), (4, 2), (8, 2), (16, 1)):
        accum = global_batch // (micro * world_size)
        step = []
        for rank in range(world_size):
            batches = iter(RankBatchSampler(micro, rank, world_size, consumed))
            step += [i for _ in range(accum) for i in next(batches)]
        assert sorted(step) == list(range(consumed, consumed + global_batch)), (world_size, micro)


def test_optimizer_state_keys_are_the_ones_deepspeeds_universal_conversion_carries():
    """``ds_to_universal`` carries exactly ``exp_avg``, ``exp_avg_sq`` and ``step`` per parameter (and ``fp32`` from
    ZeRO's own partitions): a state key beyond these would be dropped silently on a universal resume."""
    from bert_ds.config import OptimizerConfig
    from bert_ds.optim import build_optimizer

    for name in ("lamb", "adamw"):
        model = torch.nn.Linear(3, 2)
        optimizer = build_optimizer(model, OptimizerConfig(name=name), "cpu")
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        assert {key for state in optimizer.state.values() for key in state} == {"exp_avg", "exp_avg_sq", "step"}, name


def test_universal_files_are_checked_like_every_checkpoint_file(tmp_path):
    from tests.test_checkpoint import crafted_pickle

    tag = _saved(tmp_path)
    torch.save({"module": {}}, tag / "mp_rank_00_model_states.pt")
    (tag / UNIVERSAL_DIR / "zero" / "bert.embeddings.word_embeddings.weight").mkdir(parents=True)
    crafted_pickle(tag / UNIVERSAL_DIR / "zero" / "bert.embeddings.word_embeddings.weight" / "fp32.pt", tmp_path / "RAN")
    with pytest.raises(CheckpointError, match=r"fp32.pt: refused"):
        checkpoint.check_files(tag)
    assert not (tmp_path / "RAN").exists()


def test_the_universal_load_is_asked_of_deepspeed_in_the_engine_config(tmp_path):
    from bert_ds.ds_config import build_ds_config

    cfg = _config(tmp_path)
    assert build_ds_config(cfg, 2, load_universal=True)["checkpoint"] == {"load_universal": True}
    assert "checkpoint" not in build_ds_config(cfg, 2)


# -- real ranks -----------------------------------------------------------------------------------------------------

NO_DROPOUT = {"preset": "tiny", "overrides": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2,
                                              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}
# the two loss configurations: 6 steps of 16 (2 ranks x 8), checkpoints every 2 steps; fp32, no dropout
LOSS_RUNS = {"z2_lamb": (2, "lamb", 5e-3), "z3_adamw": (3, "adamw", 1e-3)}
STATE_RUNS = {f"state_z{stage}_{name}": (stage, name) for stage in (0, 1, 2, 3) for name in ("lamb", "adamw")}
STEPS = 6
# resumed on 1 rank with another ZeRO stage (1 and 2 share DeepSpeed's formats): run -> the stage it resumes with
STAGE_CHANGES = {"state_z2_lamb": 1, "state_z1_adamw": 2}


def _loss_config(d: Path, shards: dict, name: str) -> Path:
    stage, optimizer, lr = LOSS_RUNS[name]
    return write_run_config(
        d / f"{name}.yaml", shards, d / name, model=NO_DROPOUT,
        train={"max_steps": STEPS, "micro_batch_size": 8, "zero_stage": stage, "log_interval": 1},
        optimizer={"name": optimizer, "lr": lr}, scheduler={"name": "linear", "warmup_steps": 2, "total_steps": STEPS},
        checkpoint={"interval_steps": 2, "keep_last": 0}, eval={"num_samples": 16},
    )  # fmt: skip


@pytest.fixture(scope="module")
def elastic(pretraining_shards, tmp_path_factory) -> dict:
    """2 ranks: the loss runs (6 steps) and the state runs (2 steps); 1 rank: all of them resumed from step 2 (the loss
    runs to step 4); 2 ranks: the loss runs resumed from the 1-rank step-4 checkpoints to step 6."""
    d = tmp_path_factory.mktemp("elastic")
    runs = [(_loss_config(d, pretraining_shards, name),) for name in LOSS_RUNS]
    for name, (stage, optimizer) in STATE_RUNS.items():
        runs.append((write_run_config(
            d / f"{name}.yaml", pretraining_shards, d / name, model=NO_DROPOUT,
            train={"max_steps": 2, "micro_batch_size": 8, "zero_stage": stage, "log_interval": 1},
            optimizer={"name": optimizer, "lr": 5e-3}, eval={"num_samples": 16},
        ),))  # fmt: skip
    saved = train_runs(*runs, num_ranks=2, record_state=d / "state2")

    step2, step4 = tag_for_step(2), tag_for_step(4)
    resumes = [(d / f"{name}.yaml", f"run_dir={d / name}_1rank", f"checkpoint.resume={d / name / 'checkpoints' / step2}", "train.max_steps=4")
               for name in LOSS_RUNS]  # fmt: skip
    resumes += [(d / f"{name}.yaml", f"run_dir={d / name}_1rank", f"checkpoint.resume={d / name / 'checkpoints' / step2}")
                for name in STATE_RUNS]  # fmt: skip
    resumes += [(d / f"{name}.yaml", f"run_dir={d / name}_as_z{stage}", f"checkpoint.resume={d / name / 'checkpoints' / step2}",
                 f"train.zero_stage={stage}") for name, stage in STAGE_CHANGES.items()]  # fmt: skip
    one = train_runs(*resumes, num_ranks=1, record_state=d / "state1")

    again = [(d / f"{name}.yaml", f"run_dir={d / name}_2rank", f"checkpoint.resume={d / f'{name}_1rank' / 'checkpoints' / step4}")
             for name in LOSS_RUNS]  # fmt: skip
    two = train_runs(*again, num_ranks=2)
    names = list(LOSS_RUNS) + list(STATE_RUNS)
    resumed_names = names + [f"{name}_as_z{stage}" for name, stage in STAGE_CHANGES.items()]
    return {"dir": d, "saved": dict(zip(names, saved.results, strict=True)), "one": dict(zip(resumed_names, one.results, strict=True)),
            "two": dict(zip(LOSS_RUNS, two.results, strict=True)), "one_stderr": one.stderr}  # fmt: skip


def _per_step(run_dir: Path, tag: str) -> dict[int, float]:
    return dict(tensorboard_scalars(run_dir / "tensorboard")[tag])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOSS_RUNS))
def test_losses_after_resuming_on_one_rank_then_two_equal_the_uninterrupted_runs(name, elastic):
    d = elastic["dir"]
    one, two = elastic["one"][name], elastic["two"][name]
    assert Path(one["resumed_from"]) == d / name / "checkpoints" / tag_for_step(2)
    assert one["state"]["step"] == 4 and one["state"]["consumed_samples"] == 4 * 16
    assert two["state"]["step"] == STEPS and two["state"]["consumed_samples"] == STEPS * 16
    # the global batch was kept: 8 micro x 2 accumulation on 1 rank, 8 x 1 x 2 again
    assert json.loads((d / f"{name}_1rank" / "ds_config.json").read_text())["gradient_accumulation_steps"] == 2
    assert json.loads((d / f"{name}_2rank" / "ds_config.json").read_text())["gradient_accumulation_steps"] == 1
    for tag in ("train/loss", "train/mlm_loss", "train/nsp_loss", "train/grad_norm", "train/lr"):
        straight = _per_step(d / name, tag)
        resumed = {**_per_step(d / f"{name}_1rank", tag), **_per_step(d / f"{name}_2rank", tag)}
        assert sorted(resumed) == list(range(3, STEPS + 1)) and sorted(straight) == list(range(1, STEPS + 1)), tag
        for step in resumed:
            assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-12), (tag, step)
    # the universal copies: made once, inside the tag they came from, and only for ZeRO 1-3
    for source in (d / name / "checkpoints" / tag_for_step(2), d / f"{name}_1rank" / "checkpoints" / tag_for_step(4)):
        assert (source / UNIVERSAL_DIR / checkpoint.UNIVERSAL_MARKER).is_file(), source
        assert not (source.parent / "latest_universal").exists() and not (source / "latest_universal").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STATE_RUNS))
def test_a_one_rank_resume_of_a_two_rank_checkpoint_holds_exactly_the_saved_weights_and_optimizer_state(name, elastic):
    """fp32 weights, both moments of every parameter and the step counts, gathered whole on 2 ranks at the save and on
    1 rank after the resume (ZeRO 1-3 through the universal checkpoint, ZeRO 0 directly): bit for bit."""
    d = elastic["dir"]
    index = len(LOSS_RUNS) + list(STATE_RUNS).index(name)
    saved = torch.load(d / "state2" / f"run{index}.pt", weights_only=True)
    resumed = torch.load(d / "state1" / f"run{index}.pt", weights_only=True)
    assert elastic["one"][name]["state"]["step"] == 2 and elastic["one"][name]["resumed_from"]
    assert saved["steps"] and set(saved["steps"]) == {2.0} and resumed["steps"] == [2.0] * len(resumed["steps"])
    assert sorted(saved["params"]) == sorted(resumed["params"]) and len(saved["params"]) > 30
    for param, states in saved["params"].items():
        assert set(states) == {"fp32", "exp_avg", "exp_avg_sq"}
        for key, tensor in states.items():
            assert torch.equal(resumed["params"][param][key], tensor), (param, key)
    stage = STATE_RUNS[name][0]
    assert (d / name / "checkpoints" / tag_for_step(2) / UNIVERSAL_DIR).is_dir() == (stage > 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGE_CHANGES))
def test_a_zero_1_or_2_checkpoint_resumes_on_one_rank_with_the_other_stage_holding_the_saved_state(name, elastic):
    d = elastic["dir"]
    saved = torch.load(d / "state2" / f"run{len(LOSS_RUNS) + list(STATE_RUNS).index(name)}.pt", weights_only=True)
    resumed = torch.load(d / "state1" / f"run{len(LOSS_RUNS) + len(STATE_RUNS) + list(STAGE_CHANGES).index(name)}.pt", weights_only=True)
    stage = STAGE_CHANGES[name]
    assert json.loads((d / f"{name}_as_z{stage}" / "ds_config.json").read_text())["zero_optimization"]["stage"] == stage
    assert resumed["steps"] == saved["steps"] == [2.0, 2.0]
    for param, states in saved["params"].items():
        for key, tensor in states.items():
            assert torch.equal(resumed["params"][param][key], tensor), (param, key)


@pytest.mark.slow
def test_a_run_resumed_on_another_world_size_exports_and_evaluates(elastic, tmp_path):
    """The ZeRO-2 run, trained on 2 ranks, resumed on 1 and then on 2 again: its final checkpoint exports, and the export,
    the checkpoint and the trainer's own last evaluation score the same."""
    from bert_ds.hf import evaluate, export

    run_dir = elastic["dir"] / "z2_lamb_2rank"
    export.export(run_dir, tmp_path / "hf")
    from_checkpoint, from_export = evaluate.run(run_dir), evaluate.run(tmp_path / "hf")
    trained = elastic["two"]["z2_lamb"]["eval_metrics"]
    for metric in evaluate.METRICS:
        assert from_export[metric] == pytest.approx(from_checkpoint[metric], rel=1e-6, abs=1e-7), metric
        assert from_checkpoint[metric] == pytest.approx(trained[f"eval/{metric}"], rel=1e-5, abs=1e-6), metric
    assert np.isfinite(from_export["mlm_loss"])
    # the 2-rank tag that also holds a universal copy exports too, and the same as the 1-rank resume that loaded it
    first = elastic["dir"] / "z2_lamb" / "checkpoints" / tag_for_step(2)
    export.export(first, tmp_path / "hf2")
    assert evaluate.run(tmp_path / "hf2")["mlm_loss"] == pytest.approx(evaluate.run(first)["mlm_loss"], rel=1e-6)


@pytest.mark.slow
def test_the_log_says_what_the_resume_did(elastic):
    stderr = elastic["one_stderr"]
    assert "resuming a 2-rank ZeRO-2 checkpoint on 1 rank: global batch 16 = 8 micro x 2 accumulation x 1" in stderr
    assert "resuming a 2-rank ZeRO-3 checkpoint on 1 rank: universal conversion" in stderr and "cached at" in stderr


@pytest.mark.slow
def test_the_preflight_command_names_a_checkpoint_this_launch_cannot_resume(pretraining_shards, tmp_path):
    """``python -m bert_ds.preflight CONFIG`` reads the checkpoint the run would resume (its marker only) and stops on
    another vocabulary or a global batch this many ranks cannot keep, before any engine or unpickling."""
    from tests.conftest import run_module

    config = write_run_config(tmp_path / "run.yaml", pretraining_shards, tmp_path / "run", train={"max_steps": 4, "micro_batch_size": 8})
    _saved(tmp_path / "run", world_size=2, zero_stage=0, global_batch=12, vocab="0" * 64)
    proc = run_module("bert_ds.preflight", config, check=False)
    assert proc.returncode != 0 and "preflight failed" in proc.stderr and "vocabulary" in proc.stderr, proc.stderr[-2000:]
    from bert_ds.data.vocab import resolve_vocab

    marker = tmp_path / "run" / "checkpoints" / tag_for_step(4) / COMPLETE_MARKER
    saved = json.loads(marker.read_text())
    marker.write_text(json.dumps({**saved, "vocab_sha256": resolve_vocab(run_config_from_dict(
        {"run_dir": str(tmp_path / "run"), "model": {"preset": "tiny"}, "data": {"train_prefix": str(pretraining_shards["train"])},
         "train": {"max_steps": 4}})).sha256}))  # fmt: skip
    proc = run_module("bert_ds.preflight", config, check=False)
    assert proc.returncode != 0 and "the global batch 12 cannot be kept on 1 ranks" in proc.stderr, proc.stderr[-2000:]
