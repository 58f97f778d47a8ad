"""The checkpoint directory's rules: which checkpoint resume picks (never a half-written one, never one a `latest` file
points to elsewhere), what pruning may delete, one timeline per run, and no file unpickled before it is checked."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from bert_ds import checkpoint, resume
from bert_ds.checkpoint import COMPLETE_MARKER, CheckpointError, _prune, latest_complete_tag, resolve, tag_for_step
from bert_ds.config import run_config_from_dict


def make_tag(ckpts, step, complete=True):
    d = ckpts / tag_for_step(step)
    d.mkdir(parents=True)
    torch.save({"module": {}}, d / "mp_rank_00_model_states.pt")
    if complete:
        (d / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    return d.name


def test_latest_points_to_a_complete_checkpoint(tmp_path):
    make_tag(tmp_path, 10)
    tag = make_tag(tmp_path, 20)
    (tmp_path / "latest").write_text(tag)
    assert latest_complete_tag(tmp_path) == "step00000020"


def test_a_checkpoint_interrupted_while_saving_is_never_picked(tmp_path):
    make_tag(tmp_path, 10)
    make_tag(tmp_path, 20)
    make_tag(tmp_path, 30, complete=False)  # the run died while writing step 30
    (tmp_path / "latest").write_text("step00000030")  # even if a pointer says so
    assert latest_complete_tag(tmp_path) == "step00000020"
    (tmp_path / "latest").unlink()
    assert latest_complete_tag(tmp_path) == "step00000020"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve(tmp_path / "step00000030")


def test_resolve_accepts_run_dir_checkpoints_dir_and_tag_dir(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    make_tag(ckpts, 5)
    (ckpts / "latest").write_text("step00000005")
    expected = (ckpts, "step00000005")
    assert resolve(tmp_path / "run") == expected
    assert resolve(ckpts) == expected
    assert resolve(ckpts / "step00000005") == expected
    with pytest.raises(CheckpointError, match="no complete bert-ds checkpoint"):
        resolve(tmp_path)
    with pytest.raises(CheckpointError, match="no such"):
        resolve(tmp_path / "missing")


def test_keep_last_prunes_old_and_stale_incomplete_tags_only(tmp_path):
    for step in (10, 20, 30, 40):
        make_tag(tmp_path, step)
    make_tag(tmp_path, 25, complete=False)  # stale leftover of a crash
    make_tag(tmp_path, 50, complete=False)  # newer than the newest complete: may be being written now
    _prune(tmp_path, keep_last=2, written="step00000040")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000030", "step00000040", "step00000050"]


def test_pruning_never_deletes_the_checkpoint_just_written_nor_newer_ones_nor_other_names(tmp_path):
    """With 200 and 300 on disk, writing 100 with keep_last 1 deleted 100 itself; step00000002.bak was pruned too."""
    for step in (2, 100, 200, 300):
        make_tag(tmp_path, step)
    (tmp_path / "step00000002.bak").mkdir()
    (tmp_path / "steps_notes").mkdir()
    _prune(tmp_path, keep_last=1, written="step00000100")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000002.bak", "step00000100", "step00000200", "step00000300", "steps_notes"]


def test_resume_takes_the_newest_complete_checkpoint_even_when_latest_is_stale(tmp_path):
    make_tag(tmp_path, 10)
    make_tag(tmp_path, 20)  # complete, but the crash came before `latest` was rewritten
    (tmp_path / "latest").write_text("step00000010")
    assert latest_complete_tag(tmp_path) == "step00000020"


@pytest.mark.parametrize("pointer", ["../../elsewhere/evil", "/tmp/evil", "step00000020/../../evil", "step1"])
def test_a_latest_file_pointing_anywhere_else_is_never_followed(tmp_path, pointer):
    ckpts = tmp_path / "run" / "checkpoints"
    make_tag(ckpts, 10)
    evil = tmp_path / "elsewhere" / "evil"
    evil.mkdir(parents=True)
    (evil / COMPLETE_MARKER).write_text(json.dumps({"step": 999}))
    make_tag(tmp_path, 999)  # a complete-looking tag outside the run's checkpoints dir
    (ckpts / "latest").write_text(pointer)
    assert latest_complete_tag(ckpts) == "step00000010"
    assert resolve(tmp_path / "run") == (ckpts, "step00000010")


class _FakeEngine:
    """Records what save() saw: whether the tag still claimed to be complete when DeepSpeed started writing it."""

    def __init__(self):
        self.marker_present_at_save = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        self.marker_present_at_save.append((d / COMPLETE_MARKER).exists())
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {}}, d / "mp_rank_00_model_states.pt")


def test_re_saving_a_tag_removes_its_old_completion_marker_first(tmp_path):
    engine = _FakeEngine()
    state = checkpoint.TrainState(step=7)
    checkpoint.save(engine, tmp_path, state, keep_last=2, rank=0, world_size=1)
    checkpoint.save(engine, tmp_path, state, keep_last=2, rank=0, world_size=1)  # e.g. a rerun writing step 7 again
    assert engine.marker_present_at_save == [False, False]
    assert (tmp_path / "step00000007" / COMPLETE_MARKER).exists() and (tmp_path / "latest").read_text() == "step00000007"
    rng = checkpoint.read_rng_state(tmp_path / "step00000007" / "rng_rank0.pt")  # tensors only: loads with weights_only
    assert torch.equal(rng["torch"], torch.get_rng_state()) and rng["python"][0] == 3 and rng["numpy"][0] == "MT19937"


def _cfg(tmp_path, **checkpoint_section):
    return run_config_from_dict({"run_dir": str(tmp_path / "run"), "data": {"train_prefix": "p"}, "train": {"max_steps": 1},
                                 "checkpoint": checkpoint_section})  # fmt: skip


def test_a_run_never_starts_behind_newer_checkpoints_of_its_own(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (100, 200, 300):
        make_tag(ckpts, step)
    for section in ({"resume": "none"}, {"resume": str(ckpts / "step00000100")}):
        with pytest.raises(CheckpointError, match=r"newer than where this run starts .*step00000200, step00000300.*checkpoint\.overwrite"):
            resume.restore(engine=None, cfg=_cfg(tmp_path, **section), rank=0, world_size=1)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step00000100", "step00000200", "step00000300"]  # nothing touched
    restored = resume.restore(engine=None, cfg=_cfg(tmp_path, resume="none", overwrite=True), rank=0, world_size=1)
    assert restored.state.step == 0 and not any(ckpts.iterdir())


def crafted_pickle(path: Path, marker: Path, protocol: int = 2) -> None:
    """A file that runs `touch MARKER` when anything unpickles it (torch.load's zip format, as DeepSpeed's files)."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"module": Payload()}, path, pickle_protocol=protocol)


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "rng_rank0.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_a_crafted_file_is_refused_by_name_before_anything_unpickles_it(tmp_path, name):
    tag = tmp_path / make_tag(tmp_path, 5)
    crafted_pickle(tag / name, tmp_path / "RAN")
    with pytest.raises(CheckpointError, match=rf"{name}: refused: it would unpickle posix\.system"):
        checkpoint.check_files(tag)
    assert not (tmp_path / "RAN").exists()
    crafted_pickle(tag / name, tmp_path / "RAN", protocol=pickle.HIGHEST_PROTOCOL)  # opcodes the scan cannot read: refused too
    with pytest.raises(CheckpointError, match=rf"{name}: not a readable torch checkpoint file"):
        checkpoint.check_files(tag)
    assert not (tmp_path / "RAN").exists()
    (tag / name).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=rf"{name}: not a readable torch checkpoint file"):
        checkpoint.check_files(tag)
