"""The run config: strict YAML loading, overrides, validation messages, example configs."""

from __future__ import annotations

import dataclasses
import pickle
import re
import typing
import warnings
from pathlib import Path

import pytest
import yaml

from bert_ds.config import (
    MODEL_PRESETS,
    ConfigError,
    ConfigWarning,
    DataConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_run_config,
    run_config_from_dict,
    save_resolved,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIGS = sorted((REPO_ROOT / "launch" / "configs").glob("*.yaml"))

MINIMAL_YAML = """\
run_dir: runs/test
data:
  train_prefix: shards/train
train:
  max_steps: 10
"""


def minimal(**sections) -> dict:
    """The smallest valid raw config, with some sections replaced or added."""
    raw = {"run_dir": "runs/test", "data": {"train_prefix": "shards/train"}, "train": {"max_steps": 10}}
    raw.update(sections)
    return raw


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- loading


def test_a_minimal_file_loads_with_every_default_filled_in(tmp_path):
    cfg = load_run_config(write(tmp_path, MINIMAL_YAML))
    assert cfg.run_dir == "runs/test"
    assert cfg.data.train_prefix == ["shards/train"]
    assert cfg.train == TrainConfig(max_steps=10)
    assert cfg.model.preset == "tiny" and cfg.optimizer.name == "lamb" and cfg.optimizer.betas == [0.9, 0.999]
    assert cfg.checkpoint.resume == "auto" and cfg.eval.mask_prob == 0.15 and cfg.logging.tensorboard is True


def test_a_misspelled_key_names_the_dotted_key_the_file_and_the_closest_key(tmp_path):
    path = write(tmp_path, MINIMAL_YAML.replace("  max_steps: 10", "  max_steps: 10\n  micro_bach_size: 4"))
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    assert str(e.value) == f"unknown key 'train.micro_bach_size' in {path} (did you mean 'train.micro_batch_size'?)"


def test_a_key_in_the_wrong_section_suggests_the_section_that_has_it():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lr' .*did you mean 'optimizer\.lr'"):
        run_config_from_dict(minimal(train={"max_steps": 10, "lr": 1e-3}))


def test_an_exact_key_name_in_another_section_beats_a_fuzzy_match_in_this_one():
    with pytest.raises(ConfigError, match=r"unknown key 'eval\.max_steps' .*did you mean 'train\.max_steps'"):
        run_config_from_dict(minimal(eval={"max_steps": 5}))


def test_an_unknown_key_without_a_close_match_lists_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'logging\.wandb_project' .*valid keys in 'logging': tensorboard, "):
        run_config_from_dict(minimal(logging={"wandb_project": "x"}))


def test_an_unknown_top_level_section_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown key 'optimiser' .*did you mean 'optimizer'"):
        run_config_from_dict(minimal(optimiser={"lr": 1e-3}))


@pytest.mark.parametrize(
    "section, value, expected",
    [
        ("train", {"max_steps": 10, "micro_batch_size": "8x"}, r"'train\.micro_batch_size': expected int, got '8x' \(str\)"),
        ("train", {"max_steps": 10, "micro_batch_size": True}, r"'train\.micro_batch_size': expected int, got True \(bool\)"),
        ("train", {"max_steps": 1.0e3}, r"'train\.max_steps': expected int, got 1000\.0 \(float\); write it as a plain integer"),
        ("optimizer", {"lr": "fast"}, r"'optimizer\.lr': expected float .*got 'fast' \(str\)"),
        ("optimizer", {"lr": False}, r"'optimizer\.lr': expected float .*got False \(bool\)"),
        ("optimizer", {"betas": 0.9}, r"'optimizer\.betas': expected a list of float"),
        ("optimizer", {"betas": [0.9, "x"]}, r"'optimizer\.betas\[1\]': expected float"),
        ("model", {"preset": ["base"]}, r"'model\.preset': expected str, got \['base'\] \(list\)"),
        ("model", {"overrides": [1]}, r"'model\.overrides': expected a mapping"),
        ("checkpoint", {"resume": False}, r"'checkpoint\.resume': expected str, got False \(bool\); YAML reads unquoted yes/no"),
        ("data", {"train_prefix": None}, r"'data\.train_prefix': expected a list of str, got None \(null\)"),
        ("train", 5, r"'train' in <dict> must be a mapping, got 5"),
    ],
)
def test_a_wrong_type_names_the_key_the_expected_type_and_the_value(section, value, expected):
    with pytest.raises(ConfigError, match=expected):
        run_config_from_dict(minimal(**{section: value}))


def test_an_int_is_accepted_and_stored_as_a_float_where_a_float_is_expected():
    cfg = run_config_from_dict(minimal(optimizer={"lr": 1, "weight_decay": 0}))
    assert cfg.optimizer.lr == 1.0 and type(cfg.optimizer.lr) is float and type(cfg.optimizer.weight_decay) is float


def test_exponent_numbers_that_yaml_reads_as_strings_are_accepted_as_floats(tmp_path):
    text = MINIMAL_YAML + "optimizer:\n  lr: 1e-4\n  eps: 1E-8\n  betas: [0.9, 98e-2]\n"
    assert yaml.safe_load(text)["optimizer"]["lr"] == "1e-4"  # the YAML 1.1 quirk this works around
    cfg = load_run_config(write(tmp_path, text))
    assert (cfg.optimizer.lr, cfg.optimizer.eps, cfg.optimizer.betas) == (1e-4, 1e-8, [0.9, 0.98])


@pytest.mark.parametrize("text", ["nan", "inf", ".inf"])
def test_non_finite_numbers_are_refused(text, tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        load_run_config(write(tmp_path, MINIMAL_YAML + f"optimizer:\n  lr: {text}\n"))


def test_a_single_train_prefix_string_becomes_a_one_element_list():
    assert run_config_from_dict(minimal()).data.train_prefix == ["shards/train"]
    assert DataConfig(train_prefix="a").train_prefix == ["a"]
    assert run_config_from_dict(minimal(data={"train_prefix": ["a", "b"]})).data.train_prefix == ["a", "b"]


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"data": {"train_prefix": "x"}, "train": {"max_steps": 1}}, "run_dir"),
        ({"run_dir": "r", "train": {"max_steps": 1}}, "data.train_prefix"),
        ({"run_dir": "r", "data": {"train_prefix": "x"}}, "train.max_steps"),
        ({"run_dir": "r", "data": {"train_prefix": "x"}, "train": None}, "train.max_steps"),
    ],
)
def test_a_missing_required_key_is_named(raw, key):
    with pytest.raises(ConfigError, match=rf"missing required key '{re.escape(key)}' in <dict>"):
        run_config_from_dict(raw)


def test_an_empty_file_says_what_a_config_needs(tmp_path):
    with pytest.raises(ConfigError, match=r"is empty: a run config needs at least run_dir, data\.train_prefix and train\.max_steps"):
        load_run_config(write(tmp_path, "# nothing yet\n"))


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "nope.yaml")


def test_a_duplicate_key_is_an_error_instead_of_last_one_wins(tmp_path):
    path = write(tmp_path, MINIMAL_YAML.replace("  max_steps: 10", "  max_steps: 10\n  max_steps: 20"))
    with pytest.raises(ConfigError, match=r"duplicate key 'max_steps' at line 6 \(first set at line 5\)"):
        load_run_config(path)


# --------------------------------------------------------------------------- overrides


def test_overrides_are_parsed_as_yaml_and_applied_to_dotted_keys(tmp_path):
    cfg = load_run_config(
        write(tmp_path, MINIMAL_YAML + "model:\n  init_from: some/dir\n"),
        [
            "train.micro_batch_size=16",
            "optimizer.lr=5e-4",
            "data.train_prefix=[a, b]",
            "model.overrides.hidden_dropout_prob=0.0",
            "model.init_from=",  # an empty value is the empty string
            "train.offload_optimizer=true",
            "train.zero_stage=2",
            "run_dir=runs/other",
        ],
    )
    assert cfg.train.micro_batch_size == 16 and cfg.optimizer.lr == 5e-4 and cfg.data.train_prefix == ["a", "b"]
    assert cfg.model.overrides == {"hidden_dropout_prob": 0.0} and cfg.model.init_from == ""
    assert cfg.train.offload_optimizer is True and cfg.train.zero_stage == 2 and cfg.run_dir == "runs/other"


def test_overrides_can_supply_required_keys():
    cfg = run_config_from_dict({}, ["run_dir=r", "data.train_prefix=x", "train.max_steps=3"])
    assert cfg.train.max_steps == 3


def test_a_misspelled_override_key_gets_the_same_suggestion():
    with pytest.raises(ConfigError) as e:
        run_config_from_dict(minimal(), ["train.micro_bach_size=4"])
    assert (
        str(e.value) == "unknown key 'train.micro_bach_size' in override 'train.micro_bach_size=4' (did you mean 'train.micro_batch_size'?)"
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.micro_batch_size=abc", r"override 'train\.micro_batch_size=abc': wrong type for 'train\.micro_batch_size': expected int"),
        ("train.zero_stage=2.0", r"'train\.zero_stage': expected int, got 2\.0"),
        ("checkpoint.resume=no", r"'checkpoint\.resume': expected str, got False \(bool\); YAML reads unquoted"),
        ("optimizer.betas=0.9", r"'optimizer\.betas': expected a list of float"),
        ("train.max_steps.x=1", r"'train\.max_steps' is a single value \(int\), it has no key 'x'"),
        ("train.micro_batch_size", r"must look like key=value"),
        ("=3", r"must look like key=value"),
        ("data.train_prefix=[a, b", r"not valid YAML"),
    ],
)
def test_a_bad_override_is_refused_with_a_message_naming_it(override, expected):
    with pytest.raises(ConfigError, match=expected):
        run_config_from_dict(minimal(), [override])


def test_an_override_that_breaks_validation_is_refused_and_named():
    with pytest.raises(ConfigError, match=r"with overrides data\.mask_prob=1\.5\): data\.mask_prob must be strictly between 0 and 1"):
        run_config_from_dict(minimal(), ["data.mask_prob=1.5"])


def test_apply_overrides_returns_a_checked_copy_and_leaves_the_original_alone():
    cfg = run_config_from_dict(minimal())
    changed = apply_overrides(cfg, ["train.max_steps=99", "optimizer.name=adamw"])
    assert (changed.train.max_steps, changed.optimizer.name) == (99, "adamw")
    assert (cfg.train.max_steps, cfg.optimizer.name) == (10, "lamb")
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        apply_overrides(cfg, ["train.max_step=1"])


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.offload_optimizer=true"], r"train\.offload_optimizer needs ZeRO: set train\.zero_stage to 1, 2 or 3"),
        (["data.train_prefix=[a, b]", "data.train_weights=[1.0]"], r"data\.train_weights has 1 entries but data\.train_prefix has 2"),
        (["data.train_weights=[0]"], r"data\.train_weights\[0\] must be > 0"),
        (["eval.interval_steps=5"], r"eval\.interval_steps=5 but data\.valid_prefix is empty; set data\.valid_prefix"),
        (["data.max_seq_length=1024"], r"raise model\.overrides\.max_position_embeddings"),
        (
            ["model.preset=bsae"],
            r"model\.preset must be one of tiny, mini, small, medium, base, large; got 'bsae' \(did you mean 'base'\?\)",
        ),
        (["train.precision=bf61"], r"train\.precision must be one of fp32, bf16, fp16, auto; got 'bf61' \(did you mean 'bf16'\?\)"),
        (["train.zero_stage=4"], r"train\.zero_stage must be 0, 1, 2 or 3"),
        (["train.max_steps=0"], r"train\.max_steps must be > 0"),
        (["optimizer.betas=[0.9]"], r"optimizer\.betas must have two entries"),
        (["optimizer.betas=[0.9, 1.0]"], r"optimizer\.betas\[1\] must be in \[0, 1\)"),
        (["data.nsp_mode=mlm"], r"data\.nsp_mode must be one of nsp, sop"),
        (["data.max_predictions_per_seq=200"], r"data\.max_predictions_per_seq must be in \[0, data\.max_seq_length=128\]"),
        (["run_dir="], r"run_dir is empty"),
        (["checkpoint.resume="], r"checkpoint\.resume is empty; use auto, none or a checkpoint directory"),
        (["seed=-1"], r"seed must be in \[0, 2\*\*32\)"),
    ],
)
def test_an_invalid_value_is_refused_with_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        run_config_from_dict(minimal(), overrides)


def test_a_long_sequence_is_allowed_when_the_position_table_is_raised_or_comes_from_a_checkpoint():
    run_config_from_dict(minimal(), ["data.max_seq_length=1024", "model.overrides.max_position_embeddings=1024"])
    run_config_from_dict(minimal(), ["data.max_seq_length=1024", "model.init_from=some/hf_dir"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["optimizer.name=adamw", "optimizer.max_trust_ratio=5"],
            r"optimizer\.max_trust_ratio=5\.0 has no effect: it only applies to LAMB",
        ),
        (["scheduler.power=0.5"], r"scheduler\.power=0\.5 has no effect: scheduler\.name is 'linear'"),
        (["scheduler.num_cycles=3"], r"scheduler\.num_cycles=3 has no effect"),
        (
            ["checkpoint.load_optimizer_state=true"],
            r"checkpoint\.load_optimizer_state=True has no effect: checkpoint\.init_from is not set",
        ),
        (
            ["scheduler.warmup_steps=11"],
            r"scheduler\.warmup_steps \(11\) is longer than the schedule \(10 steps\): the learning rate never",
        ),
        (["train.fp16_initial_scale_power=12"], r"train\.fp16_initial_scale_power=12 has no effect: train\.precision is not fp16"),
    ],
)
def test_a_setting_that_would_silently_not_take_effect_warns(overrides, expected):
    with pytest.warns(ConfigWarning, match=expected):
        run_config_from_dict(minimal(), overrides)


def test_the_defaults_raise_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_config_from_dict(minimal())


# --------------------------------------------------------------------------- model


def test_an_unknown_model_override_field_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError) as e:
        run_config_from_dict(minimal(model={"overrides": {"hidden_dropot_prob": 0.0}}))
    assert "unknown key 'model.overrides.hidden_dropot_prob': not a transformers.BertConfig field" in str(e.value)
    assert str(e.value).endswith("(did you mean 'hidden_dropout_prob'?)")


def test_model_override_values_are_type_checked_by_bert_config():
    with pytest.raises(ConfigError, match=r"model\.overrides\.num_hidden_layers=2\.5 is not valid for transformers\.BertConfig"):
        run_config_from_dict(minimal(), ["model.overrides.num_hidden_layers=2.5"])


def test_model_overrides_must_keep_hidden_size_a_multiple_of_the_head_count():
    with pytest.raises(ConfigError, match=r"hidden_size \(100\) must be a multiple of num_attention_heads \(3\)"):
        run_config_from_dict(minimal(), ["model.overrides.hidden_size=100", "model.overrides.num_attention_heads=3"])


def test_bert_kwargs_are_the_preset_updated_with_the_overrides():
    cfg = run_config_from_dict(minimal(), ["model.preset=mini", "model.overrides={num_hidden_layers: 6, hidden_dropout_prob: 0.0}"])
    assert cfg.model.bert_kwargs() == {
        "num_hidden_layers": 6,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
        "hidden_dropout_prob": 0.0,
    }
    cfg.model.bert_kwargs()["hidden_size"] = 1  # a copy: the preset table is not changed
    assert MODEL_PRESETS["mini"]["hidden_size"] == 256


def test_the_presets_are_google_miniature_sizes_plus_base_and_large():
    sizes = {name: (p["num_hidden_layers"], p["hidden_size"], p["num_attention_heads"]) for name, p in MODEL_PRESETS.items()}
    assert sizes == {
        "tiny": (2, 128, 2),
        "mini": (4, 256, 4),
        "small": (4, 512, 8),
        "medium": (8, 512, 8),
        "base": (12, 768, 12),
        "large": (24, 1024, 16),
    }
    for preset in MODEL_PRESETS.values():
        assert preset["intermediate_size"] == 4 * preset["hidden_size"]
        assert preset["hidden_size"] // preset["num_attention_heads"] == 64  # Google's head size


# --------------------------------------------------------------------------- derived quantities


def test_max_predictions_is_the_largest_count_the_masking_rule_can_produce():
    assert run_config_from_dict(minimal()).data.max_predictions() == 19  # round(128 * 0.15)
    assert run_config_from_dict(minimal(), ["data.max_seq_length=512"]).data.max_predictions() == 77
    assert run_config_from_dict(minimal(), ["data.mask_prob=0.3"]).data.max_predictions(mask_prob=0.15) == 19
    assert run_config_from_dict(minimal(), ["data.max_predictions_per_seq=20"]).data.max_predictions() == 20


def test_the_global_batch_is_micro_times_accumulation_times_world_size():
    train = TrainConfig(max_steps=1, micro_batch_size=8, grad_accum_steps=4)
    assert train.global_batch(1) == 32
    assert train.global_batch(8) == 256
    with pytest.raises(ConfigError, match="world size must be >= 1"):
        train.global_batch(0)


def test_zero_means_derived_for_schedule_length_eval_batch_and_console_interval():
    cfg = run_config_from_dict(minimal(train={"max_steps": 50, "micro_batch_size": 4, "log_interval": 5}))
    assert cfg.scheduler.resolve_total_steps(cfg.train.max_steps) == 50
    assert cfg.eval.resolve_micro_batch_size(cfg.train.micro_batch_size) == 4
    assert cfg.logging.resolve_console_interval(cfg.train.log_interval) == 5
    cfg = apply_overrides(cfg, ["scheduler.total_steps=80", "eval.micro_batch_size=16", "logging.console_interval=25"])
    assert cfg.scheduler.resolve_total_steps(cfg.train.max_steps) == 80
    assert cfg.eval.resolve_micro_batch_size(cfg.train.micro_batch_size) == 16
    assert cfg.logging.resolve_console_interval(cfg.train.log_interval) == 25


# --------------------------------------------------------------------------- immutability and round trips


def test_the_config_is_frozen_and_does_not_alias_the_callers_data():
    raw = minimal(data={"train_prefix": ["a"]})
    cfg = run_config_from_dict(raw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 5  # type: ignore[misc]
    raw["data"]["train_prefix"].append("b")
    assert cfg.data.train_prefix == ["a"]


def test_the_config_survives_pickling_for_dataloader_workers():
    cfg = run_config_from_dict(minimal(), ["model.overrides.hidden_dropout_prob=0.0"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_dataclasses_replace_revalidates():
    cfg = run_config_from_dict(minimal())
    assert dataclasses.replace(cfg.train, max_steps=5).max_steps == 5
    with pytest.raises(ConfigError, match="train.max_steps must be > 0"):
        dataclasses.replace(cfg.train, max_steps=0)


def test_to_dict_is_plain_data_that_builds_an_equal_config():
    cfg = run_config_from_dict(minimal(), ["model.overrides.hidden_dropout_prob=0.0"])
    as_dict = cfg.to_dict()
    assert as_dict["train"]["max_steps"] == 10 and as_dict["model"]["overrides"] == {"hidden_dropout_prob": 0.0}
    assert run_config_from_dict(as_dict) == cfg
    as_dict["model"]["overrides"]["hidden_dropout_prob"] = 0.5
    assert cfg.model.overrides == {"hidden_dropout_prob": 0.0}


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_save_resolved_writes_yaml_that_loads_back_to_an_equal_config(path, tmp_path):
    cfg = load_run_config(path, ["seed=7", "train.log_interval=3"])
    out = save_resolved(cfg, tmp_path / "nested" / "run_config.yaml")
    assert out.read_text().startswith("# Resolved run config")
    assert load_run_config(out) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["run_config.yaml"]  # no temporary file left behind


# --------------------------------------------------------------------------- the example configs


def test_there_are_example_configs():
    assert {p.name for p in EXAMPLE_CONFIGS} >= {
        "tiny_demo.yaml",
        "bert_base_phase1.yaml",
        "bert_base_phase2.yaml",
        "bert_large_phase1.yaml",
        "continued_pretraining.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_every_example_config_loads_without_warnings(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)


def test_the_demo_config_is_small_and_writes_under_demo_out():
    cfg = load_run_config(REPO_ROOT / "launch" / "configs" / "tiny_demo.yaml")
    assert cfg.run_dir.startswith("demo_out/") and all(p.startswith("demo_out/") for p in cfg.data.train_prefix)
    assert cfg.model.preset in ("mini", "small") and cfg.data.max_seq_length == 128
    assert (cfg.train.zero_stage, cfg.train.precision) == (2, "auto") and 100 <= cfg.train.max_steps <= 500


def test_the_phase2_config_starts_from_the_phase1_run():
    phase1 = load_run_config(REPO_ROOT / "launch" / "configs" / "bert_base_phase1.yaml")
    phase2 = load_run_config(REPO_ROOT / "launch" / "configs" / "bert_base_phase2.yaml")
    assert phase2.checkpoint.init_from == phase1.run_dir
    assert (phase1.data.max_seq_length, phase2.data.max_seq_length) == (128, 512)
    assert phase2.model == phase1.model and phase2.optimizer.name == phase1.optimizer.name


def _type_label(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list[{typing.get_args(tp)[0].__name__}]"
    if origin is dict:
        return "dict"
    return tp.__name__


def _documented_keys(path: Path):
    """(dotted key, the comment line above it) for every scalar/list key in an example YAML."""
    lines = path.read_text().splitlines()
    section = None
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z_]\w*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = m.groups()
        if not indent and not rest.strip():  # a section header such as "train:"
            section = key
            continue
        yield (f"{section}.{key}" if indent else key), lines[i - 1].strip()


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_every_key_in_the_example_configs_is_documented_with_its_true_type_and_default(path):
    for dotted, comment in _documented_keys(path):
        m = re.fullmatch(r"# (\S.*\S) \(type: ([^,]+), (required|default: (.*))\)", comment)
        assert m, f"{path.name}: '{dotted}' needs a comment line above it: '# what it does (type: T, default: V)', got {comment!r}"
        section, _, name = dotted.rpartition(".")
        cls = typing.get_type_hints(RunConfig)[section] if section else RunConfig
        field = {f.name: f for f in dataclasses.fields(cls)}[name]
        label = _type_label(typing.get_type_hints(cls)[name])
        assert m.group(2) == label, f"{path.name}: '{dotted}' is documented as {m.group(2)}, it is {label}"
        if m.group(3) == "required":
            assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, dotted
        else:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            documented = yaml.safe_load(m.group(4))
            assert documented == default, f"{path.name}: '{dotted}' documents default {documented!r}, the real default is {default!r}"


def test_the_demo_config_shows_every_key():
    documented = {key for key, _ in _documented_keys(REPO_ROOT / "launch" / "configs" / "tiny_demo.yaml")}
    expected = set()
    for f in dataclasses.fields(RunConfig):
        tp = typing.get_type_hints(RunConfig)[f.name]
        if dataclasses.is_dataclass(tp):
            expected |= {f"{f.name}.{g.name}" for g in dataclasses.fields(tp)}
        else:
            expected.add(f.name)
    assert documented == expected
