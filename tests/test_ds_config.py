"""Run config + world size -> DeepSpeed dict: one home per setting, batch arithmetic, presets."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest

from bert_ds.config import ConfigError, ConfigWarning, RunConfig, run_config_from_dict
from bert_ds.ds_config import REPO_ROOT, build_ds_config, load_preset, resolve_preset_path, save_ds_config

PRESETS = sorted((REPO_ROOT / "ds_configs").glob("*.json"))
BASE = json.loads((REPO_ROOT / "ds_configs" / "base.json").read_text())


def make_cfg(*overrides: str) -> RunConfig:
    raw = {"run_dir": "runs/test", "data": {"train_prefix": "shards/train"}, "train": {"max_steps": 10}}
    return run_config_from_dict(raw, list(overrides))


def write_preset(tmp_path: Path, preset: dict, name: str = "preset.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(preset))
    return path


def _keys(node, prefix=""):
    """Every dotted key of a nested dict."""
    for key, value in node.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{key}.")


# --------------------------------------------------------------------------- batch arithmetic


def test_batch_sizes_come_from_the_run_config():
    ds = build_ds_config(make_cfg("train.micro_batch_size=4", "train.grad_accum_steps=3"), world_size=1)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 3, 12)


def test_world_size_8_multiplies_into_the_global_batch():
    cfg = make_cfg("train.micro_batch_size=8", "train.grad_accum_steps=4", "train.global_batch_size=256")
    ds = build_ds_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 256 == cfg.train.global_batch(8)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 4)


def test_an_inconsistent_global_batch_names_all_four_numbers_and_the_accumulation_that_fits():
    cfg = make_cfg("train.micro_batch_size=8", "train.grad_accum_steps=2", "train.global_batch_size=256")
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg, world_size=8)
    assert str(e.value) == (
        "train.global_batch_size=256 does not match the global batch train.micro_batch_size (8) x train.grad_accum_steps (2) "
        "x world size (8) = 128; set train.grad_accum_steps=4, or set train.global_batch_size=0 to derive it"
    )


def test_when_no_accumulation_fits_the_message_says_to_change_the_micro_batch():
    cfg = make_cfg("train.micro_batch_size=8", "train.global_batch_size=100")
    with pytest.raises(ConfigError, match=r"= 64; change train\.micro_batch_size / train\.grad_accum_steps"):
        build_ds_config(cfg, world_size=8)


@pytest.mark.parametrize("world_size", [0, -1, 2.0, True])
def test_a_bad_world_size_is_refused(world_size):
    with pytest.raises(ConfigError, match="world size must be a positive integer"):
        build_ds_config(make_cfg(), world_size)


# --------------------------------------------------------------------------- one home per setting


@pytest.mark.parametrize(
    "preset, key, run_key",
    [
        ({"train_batch_size": 32}, "train_batch_size", "train.global_batch_size"),
        ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu", "train.micro_batch_size"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps", "train.grad_accum_steps"),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage", "train.zero_stage"),
        ({"optimizer": {"type": "Lamb"}}, "optimizer", "the optimizer section"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler", "the scheduler section"),
        ({"fp16": {"enabled": True}}, "fp16.enabled", "train.precision"),
        ({"fp16": {"initial_scale_power": 12}}, "fp16.initial_scale_power", "train.fp16_initial_scale_power"),
        ({"bf16": {"enabled": False}}, "bf16.enabled", "train.precision"),
        ({"bfloat16": {}}, "bfloat16", "train.precision"),
        ({"gradient_clipping": 1.0}, "gradient_clipping", "train.grad_clip"),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            "zero_optimization.offload_optimizer.device",
            "train.offload_optimizer",
        ),
    ],
)
def test_a_preset_that_sets_a_run_config_setting_is_refused_naming_the_file_the_key_and_its_home(preset, key, run_key, tmp_path):
    path = write_preset(tmp_path, preset)
    with pytest.raises(ConfigError) as e:
        build_ds_config(make_cfg(f"train.ds_config={path}"), world_size=1)
    message = str(e.value)
    assert str(path) in message and f"'{key}' (set {run_key}" in message and "one home" in message


def test_every_refused_key_of_a_preset_is_listed_in_one_error(tmp_path):
    path = write_preset(tmp_path, {"train_batch_size": 32, "zero_optimization": {"stage": 3}, "gradient_clipping": 0.5})
    with pytest.raises(ConfigError) as e:
        build_ds_config(make_cfg(f"train.ds_config={path}"), world_size=1)
    for key in ("train_batch_size", "zero_optimization.stage", "gradient_clipping"):
        assert f"'{key}'" in str(e.value)


def test_there_is_no_optimizer_or_scheduler_section_because_the_trainer_passes_its_own():
    ds = build_ds_config(make_cfg(), world_size=1)
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["zero_allow_untested_optimizer"] is True  # the client LAMB under ZeRO


def test_the_engine_defaults_keep_deepspeed_quiet_and_a_preset_may_change_them(tmp_path):
    ds = build_ds_config(make_cfg(), world_size=1)
    assert ds["steps_per_print"] >= 10**9 and ds["wall_clock_breakdown"] is False
    path = write_preset(tmp_path, {"wall_clock_breakdown": True})
    assert build_ds_config(make_cfg(f"train.ds_config={path}"), world_size=1)["wall_clock_breakdown"] is True


@pytest.mark.parametrize("grad_clip", [0.0, 1.0, 2.5])
def test_gradient_clipping_comes_from_train_grad_clip(grad_clip):
    assert build_ds_config(make_cfg(f"train.grad_clip={grad_clip}"), world_size=1)["gradient_clipping"] == grad_clip


# --------------------------------------------------------------------------- precision, ZeRO, offload


def test_fp32_disables_both_half_precisions():
    ds = build_ds_config(make_cfg("train.precision=fp32"), world_size=1)
    assert ds["fp16"] == {"enabled": False} and ds["bf16"] == {"enabled": False}


def test_bf16_enables_bf16_only():
    ds = build_ds_config(make_cfg("train.precision=bf16"), world_size=1)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}


def test_fp16_uses_dynamic_loss_scaling_starting_at_the_configured_power():
    ds = build_ds_config(make_cfg("train.precision=fp16", "train.fp16_initial_scale_power=12"), world_size=1)
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,  # 0 = dynamic
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
        "initial_scale_power": 12,
    }
    assert ds["bf16"] == {"enabled": False}


def test_a_preset_may_tune_the_fp16_loss_scaler(tmp_path):
    path = write_preset(tmp_path, {"fp16": {"loss_scale_window": 500}})
    ds = build_ds_config(make_cfg("train.precision=fp16", f"train.ds_config={path}"), world_size=1)
    assert ds["fp16"]["loss_scale_window"] == 500 and ds["fp16"]["enabled"] is True
    with pytest.warns(ConfigWarning, match=r"'fp16' has no effect: train\.precision is bf16"):
        build_ds_config(make_cfg("train.precision=bf16", f"train.ds_config={path}"), world_size=1)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_zero_stage_is_merged_into_the_presets_zero_section(stage):
    ds = build_ds_config(make_cfg(f"train.zero_stage={stage}"), world_size=1)
    expected = {key: value for key, value in BASE["zero_optimization"].items() if not key.startswith("_")}
    assert ds["zero_optimization"] == {"stage": stage, **expected}
    assert "offload_optimizer" not in ds["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in ds


def test_optimizer_offload_goes_to_unpinned_cpu_memory_with_the_client_optimizer_allowed():
    ds = build_ds_config(make_cfg("train.zero_stage=2", "train.offload_optimizer=true"), world_size=1)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert ds["zero_force_ds_cpu_optimizer"] is False


def test_the_offload_preset_tunes_the_offload_it_does_not_switch_it_on():
    ds = build_ds_config(make_cfg("train.zero_stage=2", "train.offload_optimizer=true", "train.ds_config=ds_configs/offload.json"), 1)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    with pytest.warns(ConfigWarning, match=r"'zero_optimization\.offload_optimizer' has no effect: train\.offload_optimizer is false"):
        ds = build_ds_config(make_cfg("train.zero_stage=2", "train.ds_config=ds_configs/offload.json"), 1)
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_stage3_settings_below_stage_3_warn_that_they_do_nothing():
    with pytest.warns(ConfigWarning) as record:
        build_ds_config(make_cfg("train.zero_stage=2", "train.ds_config=ds_configs/zero3.json"), 1)
    assert len(record) == 1  # one warning listing every such key
    message = str(record[0].message)
    assert "'zero_optimization.sub_group_size', 'zero_optimization.stage3_prefetch_bucket_size'" in message
    assert message.endswith("have no effect: train.zero_stage is 2, not 3")


def test_comment_keys_are_dropped_at_every_depth(tmp_path):
    path = write_preset(tmp_path, {"_comment": "top", "zero_optimization": {"_comment": "nested", "reduce_bucket_size": 1000}})
    ds = build_ds_config(make_cfg(f"train.ds_config={path}"), world_size=1)
    assert not [key for key in _keys(ds) if key.rpartition(".")[2].startswith("_")]
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000


def test_building_twice_gives_equal_independent_dicts():
    cfg = make_cfg("train.zero_stage=1")
    first, second = build_ds_config(cfg, 2), build_ds_config(cfg, 2)
    assert first == second
    first["zero_optimization"]["stage"] = 3
    assert second["zero_optimization"]["stage"] == 1


# --------------------------------------------------------------------------- finding and reading presets


def test_a_relative_preset_path_falls_back_to_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_preset_path("ds_configs/base.json") == REPO_ROOT / "ds_configs" / "base.json"
    (tmp_path / "ds_configs").mkdir()
    local = write_preset(tmp_path / "ds_configs", {}, "base.json")
    assert resolve_preset_path("ds_configs/base.json") == local  # the working directory wins


def test_a_missing_preset_names_train_ds_config_and_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.ds_config: preset 'ds_configs/nope\.json' not found \(looked for .*nope\.json"):
        build_ds_config(make_cfg("train.ds_config=ds_configs/nope.json"), world_size=1)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{not json", r"is not valid JSON"),
        ('{"a": 1, "a": 2}', r"is not valid JSON: duplicate key\(s\) 'a'"),
        ("[1, 2]", r"must hold a JSON object, got list"),
        ('{"zero_optimization": true}', r"'zero_optimization' must be a JSON object"),
    ],
)
def test_a_malformed_preset_is_refused_naming_the_file(text, expected, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as e:
        build_ds_config(make_cfg(f"train.ds_config={path}"), world_size=1)
    assert str(path) in str(e.value)


def test_save_ds_config_writes_json_that_reads_back_equal(tmp_path):
    ds = build_ds_config(make_cfg("train.precision=bf16", "train.zero_stage=2"), world_size=2)
    out = save_ds_config(ds, tmp_path / "run" / "ds_config.json")
    assert json.loads(out.read_text()) == ds
    assert [p.name for p in out.parent.iterdir()] == ["ds_config.json"]


# --------------------------------------------------------------------------- the shipped presets


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_shipped_preset_has_a_comment_and_no_run_config_settings(path):
    raw = json.loads(path.read_text())
    assert "_comment" in raw
    preset, resolved = load_preset(path)
    assert resolved == path and "_comment" not in preset


# Each preset with the stages it is written for (the offload preset with offload switched on).
PRESET_STAGES = {"base.json": [0, 1, 2, 3], "zero2_large_buckets.json": [1, 2], "zero3.json": [3], "offload.json": [1, 2, 3]}


def _ds_config_class():
    return pytest.importorskip("deepspeed.runtime.config")


@pytest.mark.parametrize("world_size", [1, 8])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("preset, stage", [(p, s) for p, stages in PRESET_STAGES.items() for s in stages])
def test_deepspeed_accepts_every_built_config(preset, stage, precision, world_size):
    """DeepSpeed's own config parser (pydantic, extra keys forbidden) validates the dict offline.

    DeepSpeedConfig asks torch.distributed for the rank and world size; without a process group
    it falls back to world size 1, so the test supplies the world size instead.
    """
    dsc = _ds_config_class()
    offload = preset == "offload.json"
    cfg = make_cfg(
        "train.micro_batch_size=4",
        "train.grad_accum_steps=2",
        f"train.precision={precision}",
        f"train.zero_stage={stage}",
        f"train.offload_optimizer={str(offload).lower()}",
        f"train.ds_config=ds_configs/{preset}",
    )
    ds = build_ds_config(cfg, world_size)
    with mock.patch.object(dsc.dist, "get_rank", return_value=0), mock.patch.object(dsc.dist, "get_world_size", return_value=world_size):
        parsed = dsc.DeepSpeedConfig(json.loads(json.dumps(ds)))  # through JSON, as the trainer saves it
    assert parsed.world_size == world_size
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (
        8 * world_size,
        4,
        2,
    )
    assert parsed.zero_optimization_stage == stage
    assert parsed.float16_config.enabled == (precision == "fp16")
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.gradient_clipping == 1.0
    assert (parsed.zero_config.offload_optimizer is not None) == offload
    assert parsed.zero_allow_untested_optimizer is True
