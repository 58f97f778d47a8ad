"""Run config + world size + engine preset -> the DeepSpeed config dict (a pure function).

Every setting has one home. The run config (``bert_ds.config``) owns what a run *is*: batch
sizes, precision, ZeRO stage and optimizer offload, gradient clipping, optimizer and schedule.
The JSON preset named by ``train.ds_config`` (``ds_configs/*.json``) owns how the engine
*communicates*: ZeRO bucket sizes, overlap, stage-3 prefetching, offload tuning. A preset that
sets anything the run config owns is refused, with the run-config key to use instead, so
a value can never be set in two places that disagree.

There are no ``optimizer``/``scheduler`` sections: the trainer hands DeepSpeed its own
optimizer (LAMB or AdamW) and schedule, hence ``zero_allow_untested_optimizer``.

Presets may carry comments: keys that start with ``_`` (at any depth) are dropped before the
dict reaches DeepSpeed, whose nested sections reject unknown keys.

Worked example (``train.micro_batch_size: 8``, ``grad_accum_steps: 4``, world size 2)::

    train_micro_batch_size_per_gpu = 8
    gradient_accumulation_steps    = 4
    train_batch_size               = 8 x 4 x 2 = 64   (must equal train.global_batch_size if set)
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

from bert_ds.config import ConfigError, ConfigWarning, RunConfig
from bert_ds.files import atomic_write

__all__ = ["REPO_ROOT", "build_ds_config", "load_preset", "resolve_preset_path", "save_ds_config"]

# The repository root: relative preset paths fall back to it, so `ds_configs/base.json` works
# from any working directory.
REPO_ROOT = Path(__file__).resolve().parent.parent

# DeepSpeed logs every `steps_per_print` steps on its own; the trainer has its own metric sinks.
_STEPS_PER_PRINT = 1_000_000_000

# Preset keys that belong to the run config: JSON path -> the run-config key to use instead.
_OWNED_BY_RUN_CONFIG: dict[tuple[str, ...], str] = {
    ("train_batch_size",): "train.global_batch_size (or train.micro_batch_size / train.grad_accum_steps)",
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum_steps",
    ("optimizer",): "the optimizer section (optimizer.name, optimizer.lr, ...)",
    ("scheduler",): "the scheduler section (scheduler.name, scheduler.warmup_steps, ...)",
    ("gradient_clipping",): "train.grad_clip",
    ("fp16", "enabled"): "train.precision",
    ("fp16", "initial_scale_power"): "train.fp16_initial_scale_power",
    ("bf16", "enabled"): "train.precision",
    ("bfloat16",): "train.precision (and a 'bf16' section for bf16 tuning)",
    ("torch_autocast", "enabled"): "train.precision",
    ("zero_optimization", "stage"): "train.zero_stage",
    ("zero_optimization", "offload_optimizer", "device"): "train.offload_optimizer",
    ("zero_optimization", "cpu_offload"): "train.offload_optimizer",
}

# zero_optimization keys that only ZeRO stage 3 reads (DeepSpeed also accepts them with a
# `stage3_` prefix, which is checked separately).
_STAGE3_ONLY = {
    "offload_param",
    "sub_group_size",
    "prefetch_bucket_size",
    "param_persistence_threshold",
    "model_persistence_threshold",
    "max_live_parameters",
    "max_reuse_distance",
    "gather_16bit_weights_on_model_save",
    "module_granularity_threshold",
    "use_all_reduce_for_fetch_params",
    "allgather_sequential",
}

# Dynamic loss scaling for fp16: start at 2**initial_scale_power, halve on overflow (after
# `hysteresis` overflows), double after `loss_scale_window` clean steps.
_FP16_DEFAULTS = {"loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
# pinned host memory needs a GPU; on a CPU-only host there is nothing to pin
_OFFLOAD_DEFAULTS = {"device": "cpu", "pin_memory": False}


def resolve_preset_path(path: str | os.PathLike) -> Path:
    """Find a preset: absolute as given; relative from the working directory, then the repo root."""
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, REPO_ROOT / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"train.ds_config: preset {str(path)!r} not found (looked for {', '.join(map(str, candidates))})")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, duplicates))}")
    return dict(pairs)


def _strip_comments(node: Any) -> Any:
    """Drop ``_``-prefixed keys (our JSON comments) at every depth."""
    if isinstance(node, dict):
        return {k: _strip_comments(v) for k, v in node.items() if not k.startswith("_")}
    if isinstance(node, list):
        return [_strip_comments(v) for v in node]
    return node


def load_preset(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """Read an engine preset: returns (its dict without comment keys, the resolved path)."""
    resolved = resolve_preset_path(path)
    try:
        data = json.loads(resolved.read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicates)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"DeepSpeed preset {resolved} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed preset {resolved} must hold a JSON object, got {type(data).__name__}")
    return _strip_comments(data), resolved


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _check_ownership(preset: dict[str, Any], source: str) -> None:
    """Refuse a preset that sets what the run config owns, listing every such key."""
    problems = []
    for path, run_key in _OWNED_BY_RUN_CONFIG.items():
        present, _ = _get(preset, path)
        if present:
            problems.append(f"'{'.'.join(path)}' (set {run_key} in the run config instead)")
    if problems:
        raise ConfigError(
            f"DeepSpeed preset {source} sets {'; '.join(problems)}. Presets hold engine/communication settings "
            "only, so that each setting has one home; remove these keys from the preset"
        )


def _ignored(source: str, keys: list[str], reason: str) -> None:
    names = ", ".join(f"'{key}'" for key in keys)
    verb = "has" if len(keys) == 1 else "have"
    warnings.warn(f"DeepSpeed preset {source}: {names} {verb} no effect: {reason}", ConfigWarning, stacklevel=3)


def build_ds_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` data-parallel ranks.

    Pure: reads the preset file and nothing else (no environment, no torch.distributed), so it
    can be checked for any world size on a laptop.

    Raises:
        ConfigError: the preset is missing, malformed or sets a run-config-owned key, or
            ``train.global_batch_size`` disagrees with micro x accum x world size.

    ``load_universal``: the run resumes a checkpoint through DeepSpeed's universal format (another world size;
    ``bert_ds.checkpoint``), which DeepSpeed reads only with ``checkpoint.load_universal`` in the engine config.
    """
    train = cfg.train
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
    if train.precision == "auto":
        raise ConfigError("train.precision auto is resolved for a device first (bert_ds.precision.resolve_precision; the start-up does it)")
    preset, resolved = load_preset(train.ds_config)
    source = str(resolved)
    _check_ownership(preset, source)

    global_batch = train.global_batch(world_size)
    if train.global_batch_size and train.global_batch_size != global_batch:
        per_step = train.micro_batch_size * world_size
        fix = (
            f"set train.grad_accum_steps={train.global_batch_size // per_step}"
            if train.global_batch_size % per_step == 0
            else "change train.micro_batch_size / train.grad_accum_steps"
        )
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} does not match the global batch train.micro_batch_size "
            f"({train.micro_batch_size}) x train.grad_accum_steps ({train.grad_accum_steps}) x world size ({world_size}) "
            f"= {global_batch}; {fix}, or set train.global_batch_size=0 to derive it"
        )

    preset = copy.deepcopy(preset)
    for section in ("zero_optimization", "fp16", "bf16"):
        if not isinstance(preset.get(section, {}), dict):
            raise ConfigError(f"DeepSpeed preset {source}: '{section}' must be a JSON object, got {preset[section]!r}")
    zero = {"stage": train.zero_stage, **preset.pop("zero_optimization", {})}
    offload_tuning = zero.pop("offload_optimizer", None)
    fp16_tuning = preset.pop("fp16", {})
    bf16_tuning = preset.pop("bf16", {})

    extra: dict[str, Any] = {}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {**_OFFLOAD_DEFAULTS, **(offload_tuning or {})}
        # the trainer's own optimizer (LAMB/AdamW stepping on CPU tensors), not DeepSpeedCPUAdam
        extra["zero_force_ds_cpu_optimizer"] = False
    elif offload_tuning is not None:
        _ignored(source, ["zero_optimization.offload_optimizer"], "train.offload_optimizer is false")
    stage3_keys = [f"zero_optimization.{key}" for key in zero if key.startswith("stage3_") or key in _STAGE3_ONLY]
    if train.zero_stage < 3 and stage3_keys:
        _ignored(source, stage3_keys, f"train.zero_stage is {train.zero_stage}, not 3")
    if train.precision != "fp16" and fp16_tuning:
        _ignored(source, ["fp16"], f"train.precision is {train.precision}")
    if train.precision != "bf16" and bf16_tuning:
        _ignored(source, ["bf16"], f"train.precision is {train.precision}")

    # Run-config-owned keys first (the preset cannot set them: checked above), then engine
    # defaults that a preset may change (e.g. wall_clock_breakdown for a profiling run),
    # then the rest of the preset.
    ds: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,  # 0.0 = no clipping, as in DeepSpeed
        "fp16": (
            {"enabled": True, **_FP16_DEFAULTS, "initial_scale_power": train.fp16_initial_scale_power, **fp16_tuning}
            if train.precision == "fp16"
            else {"enabled": False}
        ),
        "bf16": {"enabled": True, **bf16_tuning} if train.precision == "bf16" else {"enabled": False},
        "zero_optimization": zero,
        **extra,
        "steps_per_print": _STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # the client LAMB is not on DeepSpeed's ZeRO allow-list
    }
    ds.update(preset)
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


def save_ds_config(ds: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a built DeepSpeed config as JSON, atomically; returns the path."""
    return atomic_write(path, json.dumps(ds, indent=2) + "\n")
