"""The run configuration: one YAML file -> typed, documented, frozen dataclasses.

A run is described by one YAML file (examples in ``launch/configs/``) plus optional
``key=value`` overrides from the command line::

    python -m bert_ds.train launch/configs/tiny_demo.yaml train.max_steps=50 optimizer.lr=5e-4

:func:`load_run_config` reads the file with a safe YAML loader and converts it section by
section into the dataclasses below. Loading is strict, because a misspelled key that is
silently ignored costs a whole run:

* unknown keys are errors that name the full dotted key and suggest the closest valid one
  (``unknown key 'train.micro_bach_size' in run.yaml (did you mean 'train.micro_batch_size'?)``);
* every value is type-checked against its field: an int is accepted where a float is expected,
  a bool is never accepted as a number, and strings such as ``1e-4`` are accepted as floats
  (YAML 1.1, which PyYAML implements, reads ``1e-4`` without a dot as a string);
* duplicate keys in one mapping are errors (plain ``yaml.safe_load`` keeps the last one);
* each section's ``__post_init__`` checks ranges and combinations and names the key and the fix.

Every error is a :class:`ConfigError` (a ``ValueError``). Settings that are accepted but would
not take effect (for example ``optimizer.max_trust_ratio`` with AdamW) emit a
:class:`ConfigWarning` instead.

The dataclasses are frozen: derive a changed copy with :func:`apply_overrides` (dotted keys,
type-checked) or ``dataclasses.replace``. Derived quantities (the global batch, the effective
number of masked positions, ...) are methods, so each piece of arithmetic lives in one place.
DeepSpeed's own JSON is built from this config by :mod:`bert_ds.ds_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from bert_ds.files import atomic_write

__all__ = [
    "MODEL_PRESETS",
    "CheckpointConfig",
    "ConfigError",
    "ConfigWarning",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "SchedulerConfig",
    "TrainConfig",
    "apply_overrides",
    "load_run_config",
    "run_config_from_dict",
    "save_resolved",
    "split_command_line",
]


class ConfigError(ValueError):
    """An invalid run configuration; the message names the offending key and the fix."""


class ConfigWarning(UserWarning):
    """A setting that is valid but will not take effect with the rest of the configuration."""


# Google's BERT miniatures naming (github.com/google-research/bert, "24 smaller BERT models")
# extended with base and large. Values are transformers.BertConfig keyword arguments.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512},
    "mini": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024},
    "small": {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048},
    "medium": {"num_hidden_layers": 8, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048},
    "base": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096},
}
# transformers.BertConfig's default; the position table bounds data.max_seq_length
_BERT_MAX_POSITION_EMBEDDINGS = 512

_PRECISIONS = ("fp32", "bf16", "fp16", "auto")
_DEVICES = ("auto", "cpu", "cuda")
_NSP_MODES = ("nsp", "sop", "none")
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_OPTIMIZERS = ("lamb", "adamw")
_SCHEDULERS = ("linear", "polynomial", "cosine", "cosine_with_restarts", "constant", "constant_with_warmup")

# A decimal number as YAML 1.1 fails to read it as a float: "1e-4", "5E3", "+2e-5".
_FLOAT_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


# --------------------------------------------------------------------------- validation helpers


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _suggest(name: str, candidates: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _one_of(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}{_suggest(value, choices)}")


def _warn_inactive(key: str, value: Any, reason: str) -> None:
    warnings.warn(f"{key}={value!r} has no effect: {reason}", ConfigWarning, stacklevel=4)


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is float:
        return "float (a number such as 0.001 or 1e-3)"
    return getattr(tp, "__name__", str(tp))


def _value_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def _wrong_type(key: str, tp: Any, value: Any) -> ConfigError:
    hint = ""
    if tp is str and isinstance(value, bool):
        hint = "; YAML reads unquoted yes/no/on/off/true/false as booleans, so quote the value"
    elif tp is str and value is None:
        hint = '; an empty YAML value is null, write "" for an empty string'
    elif tp is int and isinstance(value, float) and value.is_integer():
        hint = f"; write it as a plain integer ({int(value)})"
    elif tp is int and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        hint = "; write it as a plain integer without an exponent"
    return ConfigError(f"wrong type for '{key}': expected {_type_name(tp)}, got {value!r} ({_value_type_name(value)}){hint}")


def _normalize(value: Any, tp: Any, key: str) -> Any:
    """Type-check ``value`` against the field type ``tp`` and return the canonical value.

    Canonical means: ints become floats for float fields, numeric strings become floats,
    a single string becomes a one-element list for ``list[str]`` fields, and containers
    are copied so a frozen config never aliases the caller's lists or dicts.
    """
    if tp is Any:
        return copy.deepcopy(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong_type(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong_type(key, tp, value)
    if tp is float:
        if isinstance(value, bool):
            raise _wrong_type(key, tp, value)
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            number = float(value)
        else:
            raise _wrong_type(key, tp, value)
        if not math.isfinite(number):
            raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong_type(key, tp, value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        raise _wrong_type(key, tp, value)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if item_type is str and isinstance(value, str):
            return [value]
        if not isinstance(value, list | tuple):
            raise _wrong_type(key, tp, value)
        return [_normalize(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        _, value_type = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise _wrong_type(key, tp, value)
        for name in value:
            _require(isinstance(name, str), f"keys of '{key}' must be strings, got {name!r}")
        return {name: _normalize(item, value_type, f"{key}.{name}") for name, item in value.items()}
    raise TypeError(f"bert_ds.config: unsupported field type {tp!r} for '{key}'")  # a bug in this module


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a config dataclass (the module uses postponed annotations)."""
    return typing.get_type_hints(cls)


def _normalize_fields(obj: Any) -> None:
    """Type-check and canonicalise every field of a config dataclass in place (frozen-safe)."""
    types = _field_types(type(obj))
    prefix = f"{obj._section}." if obj._section else ""
    for f in dataclasses.fields(obj):
        value = _normalize(getattr(obj, f.name), types[f.name], prefix + f.name)
        object.__setattr__(obj, f.name, value)


def _bert_config_fields() -> set[str]:
    """Names ``transformers.BertConfig`` accepts (imported lazily: transformers is slow to import)."""
    from transformers import BertConfig

    if dataclasses.is_dataclass(BertConfig):  # transformers >= 5: a strict dataclass
        return {f.name for f in dataclasses.fields(BertConfig) if f.init}
    return set(BertConfig().to_dict()) - {"transformers_version", "model_type", "_name_or_path"}


def _check_bert_override(name: str, value: Any) -> None:
    """Let BertConfig type-check one override, and re-raise its complaint under our key."""
    from transformers import BertConfig

    try:
        BertConfig(**{name: value})
    except Exception as e:  # transformers 5 raises huggingface_hub's StrictDataclassFieldValidationError
        detail = str(e).strip().splitlines()[-1].strip()
        raise ConfigError(f"model.overrides.{name}={value!r} is not valid for transformers.BertConfig: {detail}") from None


# --------------------------------------------------------------------------- the sections


@dataclass(kw_only=True, frozen=True, slots=True)
class ModelConfig:
    """Which BERT to train: a size preset (or an existing checkpoint) plus BertConfig overrides."""

    _section: ClassVar[str] = "model"

    preset: str = "tiny"
    """Architecture size, one of ``MODEL_PRESETS``: tiny (2 layers, hidden 128), mini (4/256),
    small (4/512), medium (8/512), base (12/768), large (24/1024). Ignored when ``init_from``
    is set: the architecture then comes from that checkpoint's ``config.json``."""

    init_from: str = ""
    """A Hugging Face BERT directory (``config.json`` + weights) to start from, for continued
    pretraining. Empty: random initialisation from ``preset``."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """Any ``transformers.BertConfig`` field, applied on top of the preset (or of the
    ``init_from`` config), e.g. ``{hidden_dropout_prob: 0.0}``. The vocabulary size normally
    comes from the tokenizer."""

    activation_checkpointing: bool = False
    """Recompute each encoder layer's activations in the backward pass: less memory, about
    a third more compute."""

    attn_implementation: str = "sdpa"
    """Attention kernel: ``sdpa`` (torch.nn.functional.scaled_dot_product_attention) or ``eager``."""

    def __post_init__(self) -> None:
        _normalize_fields(self)
        _one_of("model.preset", self.preset, tuple(MODEL_PRESETS))
        _one_of("model.attn_implementation", self.attn_implementation, _ATTN_IMPLEMENTATIONS)
        if self.overrides:
            known = _bert_config_fields()
            for name, value in self.overrides.items():
                if name not in known:
                    raise ConfigError(
                        f"unknown key 'model.overrides.{name}': not a transformers.BertConfig field{_suggest(name, sorted(known))}"
                    )
                _check_bert_override(name, value)
        if not self.init_from:
            arch = self.bert_kwargs()
            hidden, heads = arch["hidden_size"], arch["num_attention_heads"]
            _require(
                heads > 0 and hidden % heads == 0,
                f"model: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}); "
                "fix model.overrides.hidden_size / model.overrides.num_attention_heads",
            )

    def bert_kwargs(self) -> dict[str, Any]:
        """``BertConfig`` keyword arguments: the preset's sizes updated with ``overrides``.

        With ``init_from`` set, model building should load that directory's config and apply
        only ``overrides``; this method then still returns the preset-based dict.
        """
        return {**MODEL_PRESETS[self.preset], **copy.deepcopy(self.overrides)}

    def max_position_embeddings(self) -> int:
        """Length of the position table a freshly initialised model will have."""
        return int(self.overrides.get("max_position_embeddings", _BERT_MAX_POSITION_EMBEDDINGS))


@dataclass(kw_only=True, frozen=True, slots=True)
class DataConfig:
    """Where the pretraining shards are and how sentence pairs are built and masked."""

    _section: ClassVar[str] = "data"

    train_prefix: list[str]
    """Prefixes of tokenized shard pairs (``PREFIX.bin`` + ``PREFIX.idx``, written by
    ``data_tools/preprocess.py``). A single string is accepted as a one-element list."""

    train_weights: list[float] = field(default_factory=list)
    """Blending weights, one per ``train_prefix`` entry (normalised to sum to 1). Empty: each
    dataset is weighted by its size (plain concatenation)."""

    valid_prefix: str = ""
    """Prefix of the held-out shard pair for evaluation. Empty: no evaluation."""

    tokenizer: str = ""
    """Tokenizer directory (``vocab.txt`` / ``tokenizer.json``). Empty: the one recorded in
    the shards' metadata JSON by the preprocessing step."""

    max_seq_length: int = 128
    """Tokens per training sequence, including [CLS] and the two [SEP]s."""

    short_seq_prob: float = 0.1
    """Probability of building a shorter sequence (target length uniform in [2, max_seq_length - 3], the
    tokens left for A and B beside [CLS] and two [SEP]) so the model also sees short inputs, as Google's
    ``create_pretraining_data.py``."""

    mask_prob: float = 0.15
    """Fraction of tokens selected for the masked-LM loss (80% [MASK], 10% random, 10% kept)."""

    whole_word_mask: bool = False
    """Select whole words (a token plus its ``##`` continuations) instead of single tokens; for
    Chinese, the words a segmenter found (``data_tools.preprocess --word-segmenter jieba`` writes
    them beside the shard as ``PREFIX.words``). A shard holding Chinese characters without them is
    refused, naming it, rather than masked character by character."""

    max_predictions_per_seq: int = 0
    """Cap on masked positions per sequence: per pair when pairs are packed (``packing``), per row of MLM-only
    rows. 0: derived, see :meth:`max_predictions`."""

    nsp_mode: str = "nsp"
    """Sentence-pair task: ``nsp`` (next-sentence prediction, random-document negatives), ``sop`` (sentence-order
    prediction, ALBERT: negatives are the two segments swapped) or ``none``: masked LM alone on rows of consecutive
    text (the documents in order, a [SEP] between two; RoBERTa's full-sentences rows, Hugging Face ``run_mlm.py``'s
    objective), packed by construction; no NSP head in the step, no NSP metrics."""

    packing: bool = False
    """Pack several complete sentence pairs into each row of ``max_seq_length`` tokens (each keeps its own [CLS],
    token types and positions; attention never crosses pairs; NSP/SOP predicted at every pair's [CLS]). Removes
    padding on short-document corpora. ``train.micro_batch_size`` then counts rows, not pairs (README: Packing)."""

    num_workers: int = 1
    """DataLoader worker processes per rank (0: load in the training process)."""

    def __post_init__(self) -> None:
        _normalize_fields(self)
        _require(len(self.train_prefix) > 0, "data.train_prefix must name at least one shard prefix")
        for i, prefix in enumerate(self.train_prefix):
            _require(bool(prefix.strip()), f"data.train_prefix[{i}] is empty; give the prefix of a .bin/.idx pair")
        if self.train_weights:
            _require(
                len(self.train_weights) == len(self.train_prefix),
                f"data.train_weights has {len(self.train_weights)} entries but data.train_prefix has "
                f"{len(self.train_prefix)}; give one weight per prefix or leave data.train_weights empty",
            )
            for i, weight in enumerate(self.train_weights):
                _require(weight > 0, f"data.train_weights[{i}] must be > 0, got {weight}; drop the prefix instead")
        _require(self.max_seq_length >= 8, f"data.max_seq_length must be at least 8, got {self.max_seq_length}")
        _require(0.0 <= self.short_seq_prob <= 1.0, f"data.short_seq_prob must be in [0, 1], got {self.short_seq_prob}")
        _require(0.0 < self.mask_prob < 1.0, f"data.mask_prob must be strictly between 0 and 1, got {self.mask_prob}")
        _require(
            0 <= self.max_predictions_per_seq <= self.max_seq_length,
            f"data.max_predictions_per_seq must be in [0, data.max_seq_length={self.max_seq_length}] "
            f"(0 = derived), got {self.max_predictions_per_seq}",
        )
        _one_of("data.nsp_mode", self.nsp_mode, _NSP_MODES)
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")

    def prefixes(self) -> list[str]:
        """Every shard prefix the run reads: the training prefixes, then the held-out one if set."""
        return [*self.train_prefix, *([self.valid_prefix] if self.valid_prefix else [])]

    def max_predictions(self, mask_prob: float | None = None) -> int:
        """Masked positions per sequence: the explicit cap, else ``max(1, round_half_up(L * p))``.

        The masking rule (``bert_ds.data.masking``, after Google's ``create_pretraining_data.py``)
        gives a sequence with ``n`` maskable tokens exactly ``max(1, round_half_up(n * p))``
        targets. Since ``n < L`` (the ``max_seq_length``), the derived value is at least the
        largest count that can occur, so it never truncates: 19 for L=128 and 77 for L=512 at
        15% (Google's scripts use 20 and 80). ``mask_prob`` defaults to ``self.mask_prob``;
        evaluation passes ``eval.mask_prob``.
        """
        if self.max_predictions_per_seq:
            return self.max_predictions_per_seq
        p = self.mask_prob if mask_prob is None else mask_prob
        return max(1, int(self.max_seq_length * p + 0.5))  # half up, as the masking code and Python 2's round


@dataclass(kw_only=True, frozen=True, slots=True)
class TrainConfig:
    """How long and how to step: batch sizes, precision, ZeRO and the DeepSpeed engine preset."""

    _section: ClassVar[str] = "train"

    max_steps: int
    """Optimizer steps to train for (each step is ``grad_accum_steps`` micro-batches per rank)."""

    micro_batch_size: int = 8
    """Sequences per rank per forward/backward pass."""

    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""

    global_batch_size: int = 0
    """Sequences per optimizer step over all ranks. 0: derived as micro_batch_size x
    grad_accum_steps x world size. When set it must equal that product (checked when the
    DeepSpeed config is built, where the world size is known): pin it in recipes whose
    learning rate was tuned for one batch size."""

    precision: str = "fp32"
    """Training precision: ``fp32``, ``bf16``, ``fp16`` (dynamic loss scaling) or ``auto``: bf16 where
    the device runs it at speed (Ampere+ GPUs, AVX-512/AMX CPUs), fp16 on older GPUs, fp32 on other
    CPUs (``bert_ds.precision.select_precision``). The run directory's config.yaml records the choice."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (data parallel), 1 (partition optimizer state), 2 (+ gradients),
    3 (+ parameters)."""

    offload_optimizer: bool = False
    """Keep optimizer state and run the optimizer step on the CPU (ZeRO-Offload); needs
    zero_stage >= 1."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    log_interval: int = 10
    """Log training metrics every this many optimizer steps."""

    ds_config: str = "ds_configs/base.json"
    """DeepSpeed engine preset (JSON): communication and ZeRO tuning only. A relative path is
    looked up from the working directory, then from the repository root."""

    fp16_initial_scale_power: int = 16
    """fp16 only: the dynamic loss scale starts at 2**this."""

    device: str = "auto"
    """``auto`` (cuda when available, else cpu), ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        _normalize_fields(self)
        _require(self.max_steps > 0, f"train.max_steps must be > 0, got {self.max_steps}")
        _require(self.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _require(self.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        _require(self.global_batch_size >= 0, f"train.global_batch_size must be >= 0 (0 = derived), got {self.global_batch_size}")
        _one_of("train.precision", self.precision, _PRECISIONS)
        _require(self.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "train.offload_optimizer needs ZeRO: set train.zero_stage to 1, 2 or 3, or train.offload_optimizer=false",
        )
        _require(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        _require(self.log_interval >= 1, f"train.log_interval must be >= 1, got {self.log_interval}")
        _require(bool(self.ds_config.strip()), "train.ds_config is empty; use ds_configs/base.json for the defaults")
        _require(
            0 <= self.fp16_initial_scale_power <= 32,
            f"train.fp16_initial_scale_power must be in [0, 32], got {self.fp16_initial_scale_power}",
        )
        if self.precision not in ("fp16", "auto") and self.fp16_initial_scale_power != 16:
            _warn_inactive("train.fp16_initial_scale_power", self.fp16_initial_scale_power, "train.precision is not fp16")
        _one_of("train.device", self.device, _DEVICES)

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step: micro_batch_size x grad_accum_steps x world_size."""
        _require(world_size >= 1, f"world size must be >= 1, got {world_size}")
        return self.micro_batch_size * self.grad_accum_steps * world_size

    def grad_accum_for(self, global_batch: int, world_size: int, why: str) -> int:
        """Accumulation steps that keep ``global_batch`` sequences per step on ``world_size`` ranks.

        ``why`` says where the global batch comes from (it opens the error). Raises :class:`ConfigError`, naming the
        numbers and the keys that change them, when ``micro_batch_size x world_size`` does not divide it.
        e.g. global batch 16, micro batch 8: 2 ranks -> 1, 1 rank -> 2, 4 ranks -> error (8 x 4 = 32 > 16).
        """
        _require(world_size >= 1, f"world size must be >= 1, got {world_size}")
        per_step = self.micro_batch_size * world_size
        if global_batch % per_step == 0:
            return global_batch // per_step
        fix = [f"train.micro_batch_size={m}" for m in range(self.micro_batch_size - 1, 0, -1) if global_batch % (m * world_size) == 0][:1]
        raise ConfigError(
            f"{why}: the global batch {global_batch} cannot be kept on {world_size} ranks: it is not a multiple of "
            f"train.micro_batch_size ({self.micro_batch_size}) x {world_size} ranks = {per_step}. "
            + (f"Set {fix[0]} to keep it, or " if fix else "Run on a number of ranks that divides it, or ")
            + f"set train.global_batch_size to a multiple of {per_step} to continue with another global batch"
        )


@dataclass(kw_only=True, frozen=True, slots=True)
class OptimizerConfig:
    """The client optimizer handed to DeepSpeed (never a DeepSpeed JSON ``optimizer`` section)."""

    _section: ClassVar[str] = "optimizer"

    name: str = "lamb"
    """``lamb`` (NVIDIA's BERT recipe, per-parameter trust ratios also under ZeRO partitioning; the same update on
    every device) or ``adamw``."""

    lr: float = 1e-3
    """Peak learning rate (reached at the end of warm-up)."""

    weight_decay: float = 0.01
    """Decoupled weight decay; biases and LayerNorm weights are never decayed."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam moment coefficients (beta1, beta2)."""

    eps: float = 1e-6
    """Added to the denominator for numerical stability."""

    bias_correction: bool = True
    """LAMB only: apply Adam's bias correction to the moments (AdamW always does)."""

    max_trust_ratio: float = 0.0
    """LAMB only: upper bound of the per-parameter trust ratio ||w|| / ||update||; 0 = no bound (NVIDIA's
    BERT recipe, apex FusedLAMB). DeepSpeed's FusedLamb bounds it at 10."""

    def __post_init__(self) -> None:
        _normalize_fields(self)
        _one_of("optimizer.name", self.name, _OPTIMIZERS)
        _require(self.lr > 0, f"optimizer.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2, f"optimizer.betas must have two entries [beta1, beta2], got {self.betas}")
        for i, beta in enumerate(self.betas):
            _require(0.0 <= beta < 1.0, f"optimizer.betas[{i}] must be in [0, 1), got {beta}")
        _require(self.eps > 0, f"optimizer.eps must be > 0, got {self.eps}")
        _require(self.max_trust_ratio >= 0, f"optimizer.max_trust_ratio must be >= 0 (0 = no bound), got {self.max_trust_ratio}")
        if self.name != "lamb":
            if not self.bias_correction:
                _warn_inactive("optimizer.bias_correction", False, "only LAMB can switch off bias correction")
            if self.max_trust_ratio != 0.0:
                _warn_inactive("optimizer.max_trust_ratio", self.max_trust_ratio, "it only applies to LAMB")


@dataclass(kw_only=True, frozen=True, slots=True)
class SchedulerConfig:
    """Learning-rate schedule: linear warm-up to ``optimizer.lr``, then the named decay."""

    _section: ClassVar[str] = "scheduler"

    name: str = "linear"
    """Decay after warm-up: ``linear`` (to 0), ``polynomial`` (to 0 with ``power``), ``cosine``,
    ``cosine_with_restarts``, ``constant`` (no warm-up either) or ``constant_with_warmup``."""

    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``optimizer.lr``."""

    power: float = 1.0
    """``polynomial`` only: decay exponent (1.0 is linear; NVIDIA's BERT recipe uses 0.5)."""

    num_cycles: int = 1
    """``cosine_with_restarts`` only: number of hard restarts."""

    total_steps: int = 0
    """Length of the schedule in optimizer steps. 0: ``train.max_steps``. A longer schedule
    than the run lets a run be stopped early without a decayed learning rate."""

    def __post_init__(self) -> None:
        _normalize_fields(self)
        _one_of("scheduler.name", self.name, _SCHEDULERS)
        _require(self.warmup_steps >= 0, f"scheduler.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.power > 0, f"scheduler.power must be > 0, got {self.power}")
        _require(self.num_cycles >= 1, f"scheduler.num_cycles must be >= 1, got {self.num_cycles}")
        _require(self.total_steps >= 0, f"scheduler.total_steps must be >= 0 (0 = train.max_steps), got {self.total_steps}")
        if self.name != "polynomial" and self.power != 1.0:
            _warn_inactive("scheduler.power", self.power, f"scheduler.name is {self.name!r}, not 'polynomial'")
        if self.name != "cosine_with_restarts" and self.num_cycles != 1:
            _warn_inactive("scheduler.num_cycles", self.num_cycles, f"scheduler.name is {self.name!r}, not 'cosine_with_restarts'")
        if self.name == "constant" and self.warmup_steps:
            _warn_inactive("scheduler.warmup_steps", self.warmup_steps, "use scheduler.name=constant_with_warmup for a warm-up")

    def resolve_total_steps(self, max_steps: int) -> int:
        """Schedule length: ``total_steps``, or ``max_steps`` when that is 0."""
        return self.total_steps or max_steps


@dataclass(kw_only=True, frozen=True, slots=True)
class CheckpointConfig:
    """When DeepSpeed checkpoints are written and what a run starts from."""

    _section: ClassVar[str] = "checkpoint"

    interval_steps: int = 0
    """Save every this many optimizer steps. 0: only at the end (see ``save_final``)."""

    keep_last: int = 3
    """Keep the newest this many checkpoints and delete older ones; 0 keeps all."""

    resume: str = "auto"
    """``auto``: resume from the newest checkpoint in ``run_dir`` if there is one; ``none``:
    always start fresh; otherwise a checkpoint directory to resume from. Resuming restores
    weights, optimizer, scheduler, step and data position."""

    init_from: str = ""
    """Two-phase training: a phase-1 run directory (its newest checkpoint is used) or
    DeepSpeed checkpoint directory to take the weights from when the run is not resuming.
    The step counter, scheduler and data position start fresh."""

    load_optimizer_state: bool = False
    """With ``init_from``: also take the optimizer state (e.g. the LAMB moments, as NVIDIA's
    phase 2 does)."""

    save_final: bool = True
    """Save a checkpoint after the last step."""

    overwrite: bool = False
    """Start a run (``resume: none``, or ``resume`` from an older checkpoint) in a ``run_dir`` that holds newer
    checkpoints of its own: ``false`` refuses (they would be resumed instead of this run's), ``true`` deletes them."""

    def __post_init__(self) -> None:
        _normalize_fields(self)
        _require(self.interval_steps >= 0, f"checkpoint.interval_steps must be >= 0 (0 = only at the end), got {self.interval_steps}")
        _require(self.keep_last >= 0, f"checkpoint.keep_last must be >= 0 (0 = keep all), got {self.keep_last}")
        _require(bool(self.resume.strip()), "checkpoint.resume is empty; use auto, none or a checkpoint directory")
        if self.load_optimizer_state and not self.init_from:
            _warn_inactive("checkpoint.load_optimizer_state", True, "checkpoint.init_from is not set")


@dataclass(kw_only=True, frozen=True, slots=True)
class EvalConfig:
    """Held-out masked-LM / NSP evaluation on a fixed sample set (needs ``data.valid_prefix``)."""

    _section: ClassVar[str] = "eval"

    interval_steps: int = 0
    """Evaluate every this many optimizer steps. 0: only at the end, if ``data.valid_prefix`` is set."""

    num_samples: int = 1000
    """Size of the fixed evaluation set (the same sequences and masks at every evaluation)."""

    micro_batch_size: int = 0
    """Sequences per rank per evaluation batch. 0: ``train.micro_batch_size``."""

    mask_prob: float = 0.15
    """Masking rate for evaluation. Kept at 15% whatever ``data.mask_prob`` is, so losses are
    comparable across runs (as MosaicML's BERT recipes do)."""

    def __post_init__(self) -> None:
        _normalize_fields(self)
        _require(self.interval_steps >= 0, f"eval.interval_steps must be >= 0, got {self.interval_steps}")
        _require(self.num_samples >= 1, f"eval.num_samples must be >= 1, got {self.num_samples}")
        _require(
            self.micro_batch_size >= 0, f"eval.micro_batch_size must be >= 0 (0 = train.micro_batch_size), got {self.micro_batch_size}"
        )
        _require(0.0 < self.mask_prob < 1.0, f"eval.mask_prob must be strictly between 0 and 1, got {self.mask_prob}")

    def resolve_micro_batch_size(self, train_micro_batch_size: int) -> int:
        """Evaluation micro-batch: ``micro_batch_size``, or the training one when that is 0."""
        return self.micro_batch_size or train_micro_batch_size


@dataclass(kw_only=True, frozen=True, slots=True)
class LoggingConfig:
    """Metric sinks (written by the logging rank only)."""

    _section: ClassVar[str] = "logging"

    tensorboard: bool = True
    """Write TensorBoard event files under ``run_dir/tensorboard``."""

    console_interval: int = 0
    """Print a progress line every this many steps. 0: ``train.log_interval``."""

    peak_tflops_per_device: float = 0.0
    """Peak TFLOP/s of one device, the denominator of MFU. 0: the datasheet dense peak of a known accelerator in
    the run's precision (``bert_ds.metrics.DATASHEET_PEAKS``: V100, A100, H100, H200, B200, ...; TF32 when fp32
    matmuls may use it; a MIG slice's share), else (CPUs, unknown GPUs) a matmul measured at start-up. The log
    and TensorBoard (``train/mfu_peak``) say which."""

    def __post_init__(self) -> None:
        _normalize_fields(self)
        _require(self.console_interval >= 0, f"logging.console_interval must be >= 0, got {self.console_interval}")
        _require(self.peak_tflops_per_device >= 0, f"logging.peak_tflops_per_device must be >= 0, got {self.peak_tflops_per_device}")

    def resolve_console_interval(self, log_interval: int) -> int:
        """Console interval: ``console_interval``, or ``train.log_interval`` when that is 0."""
        return self.console_interval or log_interval


@dataclass(kw_only=True, frozen=True, slots=True)
class RunConfig:
    """Everything one training run needs, as read from ``launch/configs/*.yaml``."""

    _section: ClassVar[str] = ""

    run_dir: str
    """Output directory: checkpoints, TensorBoard events, the resolved ``config.yaml`` and
    ``ds_config.json``. Re-using it with ``checkpoint.resume=auto`` continues the run."""

    seed: int = 1234
    """Seed for weight initialisation, data order and masking."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture and initialisation."""

    data: DataConfig
    """Training/validation data and masking."""

    train: TrainConfig
    """Steps, batch sizes, precision and ZeRO."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and its hyper-parameters."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, resuming and two-phase initialisation."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metric sinks."""

    def __post_init__(self) -> None:
        _normalize_fields(self)
        _require(bool(self.run_dir.strip()), "run_dir is empty; give the run's output directory, e.g. runs/my_run")
        _require(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        if not self.model.init_from:
            positions = self.model.max_position_embeddings()
            _require(
                self.data.max_seq_length <= positions,
                f"data.max_seq_length ({self.data.max_seq_length}) exceeds the model's position table ({positions}); "
                "lower data.max_seq_length or raise model.overrides.max_position_embeddings",
            )
        total = self.scheduler.resolve_total_steps(self.train.max_steps)
        if self.scheduler.warmup_steps > total:  # legitimate in a short smoke run of a recipe, so not an error
            warnings.warn(
                f"scheduler.warmup_steps ({self.scheduler.warmup_steps}) is longer than the schedule ({total} steps): "
                "the learning rate never reaches optimizer.lr",
                ConfigWarning,
                stacklevel=3,
            )
        _require(
            not (self.eval.interval_steps and not self.data.valid_prefix),
            f"eval.interval_steps={self.eval.interval_steps} but data.valid_prefix is empty; "
            "set data.valid_prefix or eval.interval_steps=0",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-serialisable) that :func:`run_config_from_dict` reads back."""
        return _to_dict(self)


def _to_dict(obj: Any) -> dict[str, Any]:
    return {
        f.name: _to_dict(getattr(obj, f.name)) if dataclasses.is_dataclass(getattr(obj, f.name)) else copy.deepcopy(getattr(obj, f.name))
        for f in dataclasses.fields(obj)
    }


# --------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if isinstance(key, typing.Hashable) and key in seen:
            raise ConfigError(f"duplicate key {key!r} at line {line} (first set at line {seen[key]})")
        if isinstance(key, typing.Hashable):
            seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _all_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``train.micro_batch_size``."""
    cls = cls or RunConfig
    keys = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str, siblings: Sequence[str], where: str) -> ConfigError:
    """Error for an unknown dotted key, suggesting a sibling or, failing that, any key with that name."""
    parent, _, name = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    elsewhere = [k for k in _all_keys() if k.rpartition(".")[2] == name]  # e.g. train.lr -> optimizer.lr
    close = difflib.get_close_matches(name, list(siblings), n=1, cutoff=0.6)
    if elsewhere:
        hint = f" (did you mean '{elsewhere[0]}'?)"
    elif close:
        hint = f" (did you mean '{prefix}{close[0]}'?)"
    else:
        hint = f" (valid keys{f' in {parent!r}' if parent else ''}: {', '.join(siblings)})"
    return ConfigError(f"unknown key '{key}' in {where}{hint}")


def _build(cls: type, raw: Any, prefix: str, where: str) -> Any:
    """Convert one mapping into the dataclass ``cls``: unknown and missing keys are errors."""
    if raw is None:  # a section header with every key commented out
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{prefix.rstrip('.') or 'the top level'}' in {where} must be a mapping, got {raw!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise _unknown_key(f"{prefix}{key}", names, where)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp) and (f.name in raw or _is_required(f)):
            kwargs[f.name] = _build(tp, raw.get(f.name), f"{prefix}{f.name}.", where)
        elif f.name in raw:
            kwargs[f.name] = raw[f.name]
        elif _is_required(f):
            raise ConfigError(f"missing required key '{prefix}{f.name}' in {where}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _apply_override(raw: dict, text: str) -> None:
    """Apply one ``dotted.key=value`` override to the raw nested dict, checking key and type."""
    where = f"override '{text}'"
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{where} must look like key=value, e.g. train.micro_batch_size=16")
    try:  # an empty value means the empty string (e.g. model.init_from=), not YAML's null
        value = yaml.load(value_text, Loader=_StrictLoader) if value_text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: the value is not valid YAML: {e}") from None
    parts = key.split(".")
    cls, node = RunConfig, raw
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise _unknown_key(dotted, names, where)
        tp = _field_types(cls)[part]
        last = i == len(parts) - 1
        if last:
            try:
                node[part] = value if dataclasses.is_dataclass(tp) else _normalize(value, tp, dotted)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            return
        if dataclasses.is_dataclass(tp):
            child = node.get(part)
            node[part] = child = {} if child is None else child
            if not isinstance(child, dict):
                raise ConfigError(f"{where}: '{dotted}' is not a mapping in the config file")
            cls, node = tp, child
        elif typing.get_origin(tp) is dict:  # model.overrides.hidden_dropout_prob=0.0: a key inside a free-form mapping
            mapping = node.get(part)
            node[part] = mapping = {} if mapping is None else mapping
            if not isinstance(mapping, dict):
                raise ConfigError(f"{where}: '{dotted}' is not a mapping in the config file")
            mapping[".".join(parts[i + 1 :])] = value
            return
        else:
            raise ConfigError(f"{where}: '{dotted}' is a single value ({_type_name(tp)}), it has no key '{parts[i + 1]}'")


def run_config_from_dict(data: Mapping[str, Any] | None, overrides: Sequence[str] = (), source: str = "<dict>") -> RunConfig:
    """Build a :class:`RunConfig` from a nested mapping (as YAML gives), then apply overrides.

    ``source`` names the origin in error messages (the YAML path for :func:`load_run_config`).
    """
    if data is None:
        raise ConfigError(f"{source} is empty: a run config needs at least run_dir, data.train_prefix and train.max_steps")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must be a mapping of sections (model:, data:, train:, ...), got {data!r}")
    raw = copy.deepcopy(dict(data))
    if isinstance(overrides, str):  # a bare string would be applied character by character
        overrides = [overrides]
    for text in overrides:
        _apply_override(raw, text)
    where = f"{source} (with overrides {' '.join(overrides)})" if overrides else source
    return _build(RunConfig, raw, "", where)


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config YAML file, apply ``key=value`` overrides and validate everything.

    Raises:
        ConfigError: the file is missing or not YAML, a key is unknown, duplicated or missing,
            a value has the wrong type or is out of range. The message names the key.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"run config {source} not found") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from None
    return run_config_from_dict(data, overrides, source)


def apply_overrides(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """A copy of ``cfg`` with ``key=value`` overrides applied (checked as on the command line)."""
    return run_config_from_dict(cfg.to_dict(), overrides, source="<config>")


def save_resolved(cfg: RunConfig, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (every key, defaults included); returns the path.

    The file loads back with :func:`load_run_config` to an equal config, and is written atomically.
    """
    header = "# Resolved run config written by bert_ds (defaults filled in, overrides applied).\n"
    return atomic_write(path, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False))


def split_command_line(argv: Sequence[str], usage: str) -> tuple[str, list[str]]:
    """``CONFIG key=value ...`` -> (config path, overrides), dropping the ``--local_rank=N`` the deepspeed launcher appends.

    Exits with ``usage`` when no config is given or help is asked for.
    """
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if re.fullmatch(r"--local[_-]rank=\d+", a):
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        args.append(a)
    if not args or args[0] in ("-h", "--help"):
        raise SystemExit(usage)
    return args[0], args[1:]
