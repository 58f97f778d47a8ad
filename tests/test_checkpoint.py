"""Which checkpoint resume picks: never a half-written one."""

from __future__ import annotations

import json

import pytest

from bert_ds.checkpoint import COMPLETE_MARKER, CheckpointError, _prune, latest_complete_tag, resolve, tag_for_step


def make_tag(ckpts, step, complete=True):
    d = ckpts / tag_for_step(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
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
    _prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000030", "step00000040", "step00000050"]
