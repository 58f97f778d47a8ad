"""Open what export, evaluation and the fine-tune check start from: a bert-ds checkpoint or a Hugging Face BERT directory.

:func:`open_source` tells the two kinds apart. A :class:`CheckpointSource` is one complete
checkpoint with its run's config, architecture and tokenizer (all checked); its weights come from
``bert_ds.zero.consolidate`` as full fp32 tensors, without torch.distributed, GPUs or the world size
the run had. :func:`load_pretraining_model` gives the MLM + NSP model of either kind.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import BertConfig

from bert_ds import checkpoint
from bert_ds.checkpoint import COMPLETE_MARKER, CheckpointError
from bert_ds.config import ConfigError, RunConfig, load_run_config
from bert_ds.data.vocab import TokenizerError, load_tokenizer, vocab_sha256
from bert_ds.model import BertForPreTrainingSparse, build_bert_config
from bert_ds.optim import build_param_groups
from bert_ds.zero.consolidate import Skeleton, read_fp32_weights

log = logging.getLogger(__name__)

EXPORT_INFO = "bert_ds_export.json"
"""Written into an exported directory: where it came from and the run's evaluation settings."""
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")



def start_command(*quiet: str) -> None:
    """What each hand-off command does first: log at INFO to stderr (its result goes to stdout), and tell DeepSpeed
    it runs on the CPU before it is imported (reading a ZeRO checkpoint imports it): it would probe for an
    accelerator and announce the CPU fallback on stdout. ``quiet`` loggers, and DeepSpeed's, log warnings only."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("DeepSpeed", "deepspeed", *quiet):
        logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- what the model should hold


def skeleton(bert_config: BertConfig) -> Skeleton:
    with torch.device("meta"):
        model = BertForPreTrainingSparse(bert_config)
    names = {id(p): n for n, p in model.named_parameters()}
    params = {n: p.shape for n, p in model.named_parameters()}
    state = model.state_dict(keep_vars=True)
    buffers = {k: v.shape for k, v in state.items() if k not in params and id(v) not in names}
    groups = [[names[id(p)] for p in g["params"]] for g in build_param_groups(model, 0.0)]
    return Skeleton(params, buffers, groups)


# --------------------------------------------------------------------------- sources


@dataclass
class HFSource:
    """A Hugging Face BERT directory (``config.json`` + weights + tokenizer files)."""

    path: Path
    bert_config: BertConfig
    export_info: dict = field(default_factory=dict)
    """``bert_ds_export.json`` when bert-ds wrote the directory, else empty."""

    @property
    def tokenizer_dir(self) -> Path:
        return self.path

    def describe(self) -> str:
        return f"Hugging Face directory {self.path}"


@dataclass
class CheckpointSource:
    """One complete bert-ds checkpoint and the run it belongs to."""

    tag_dir: Path
    run_dir: Path
    marker: dict
    run_config: RunConfig
    bert_config: BertConfig
    tokenizer_dir: Path

    @property
    def step(self) -> int:
        return int(self.marker["step"])

    def describe(self) -> str:
        return f"bert-ds checkpoint {self.tag_dir} (step {self.step})"

    def fp32_weights(self) -> tuple[dict[str, torch.Tensor], str]:
        """Every parameter and persistent buffer as a full fp32 tensor, and where they were read from."""
        return read_fp32_weights(self.tag_dir, skeleton(self.bert_config), self.marker.get("world_size"))


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in HF_WEIGHT_FILES)


def open_source(path: str | Path) -> HFSource | CheckpointSource:
    """A Hugging Face directory, or a run dir / checkpoints dir / tag dir (its newest complete checkpoint)."""
    p = Path(path)
    if p.is_dir() and is_hf_dir(p):
        return open_hf_dir(p)
    try:
        return open_checkpoint(p)
    except CheckpointError as e:
        if p.is_dir() and not (p / COMPLETE_MARKER).exists() and "no complete bert-ds checkpoint" in str(e):
            raise CheckpointError(
                f"{p} is neither a bert-ds checkpoint (a run dir, its checkpoints/ dir or a stepNNNNNNNN dir holding "
                f"{COMPLETE_MARKER}) nor a Hugging Face model directory (config.json + model.safetensors)"
            ) from None
        raise


def open_hf_dir(path: Path) -> HFSource:
    try:
        bert_config = BertConfig.from_pretrained(path)
    except Exception as e:  # transformers raises OSError/ValueError/strict-dataclass errors
        raise CheckpointError(f"{path}/config.json: not a BERT config ({e})") from None
    if bert_config.model_type != "bert":
        raise CheckpointError(f"{path}/config.json: model_type is {bert_config.model_type!r}, bert-ds handles BERT only")
    info_path = path / EXPORT_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return HFSource(path, bert_config, info)


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """The checkpoint at ``path`` with its run config, architecture and tokenizer, all checked."""
    try:
        checkpoint_dir, tag = checkpoint.resolve(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_incomplete_note(Path(path))}") from None
    tag_dir = checkpoint_dir / tag
    marker = json.loads((tag_dir / COMPLETE_MARKER).read_text())
    run_dir = checkpoint_dir.parent
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise CheckpointError(
            f"{config_path} not found: reading {tag_dir} needs the run's resolved config (the model architecture), "
            "which the trainer writes next to checkpoints/; keep a copied checkpoint inside RUN_DIR/checkpoints/"
        )
    try:
        run_config = load_run_config(config_path)
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    tokenizer_dir = Path(marker.get("tokenizer") or "")
    try:
        tok = load_tokenizer(tokenizer_dir)
    except TokenizerError as e:
        raise CheckpointError(f"the checkpoint's tokenizer is unreadable: {e} (recorded in {tag_dir / COMPLETE_MARKER})") from None
    sha = vocab_sha256(tok)
    if marker.get("vocab_sha256") and sha != marker["vocab_sha256"]:
        raise CheckpointError(
            f"the tokenizer at {tokenizer_dir} changed since {tag_dir} was trained (vocab sha256 {sha[:12]}, "
            f"trained with {marker['vocab_sha256'][:12]}); restore that directory"
        )
    try:
        bert_config = build_bert_config(run_config.model, tok.get_vocab_size(with_added_tokens=True))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot rebuild the model config of {run_dir}: {e}") from None
    return CheckpointSource(tag_dir, run_dir, marker, run_config, bert_config, tokenizer_dir)


def _incomplete_note(p: Path) -> str:
    """Name the incomplete tags under a run dir, the usual reason it has no complete checkpoint."""
    tags = sorted(t.name for d in (p, p / "checkpoints") if d.is_dir() for t in d.iterdir()
                  if t.is_dir() and t.name.startswith(checkpoint.TAG_PREFIX) and not (t / COMPLETE_MARKER).exists())  # fmt: skip
    return f"; found only incomplete ones ({', '.join(tags)}: the run stopped while saving them)" if tags else ""


# --------------------------------------------------------------------------- models


def load_pretraining_model(source: HFSource | CheckpointSource, attn_implementation: str = "sdpa", seed: int = 0) -> BertForPreTrainingSparse:
    """The MLM + NSP model of a source, in fp32 on CPU, in eval mode.

    Heads missing from a Hugging Face directory (a bare ``BertModel`` such as MiniLM has neither)
    are initialised from ``seed`` and reported, so two runs give the same numbers.
    """
    torch.manual_seed(seed)
    if isinstance(source, HFSource):
        model, info = BertForPreTrainingSparse.from_pretrained(
            source.path, attn_implementation=attn_implementation, output_loading_info=True, dtype=torch.float32
        )
        missing = sorted(info["missing_keys"])
        if missing:
            log.warning("%s lacks %d tensors, initialised at random (seed %d): %s", source.path, len(missing), seed, ", ".join(missing))
    else:
        weights, where = source.fp32_weights()
        model = BertForPreTrainingSparse._from_config(source.bert_config, attn_implementation=attn_implementation, dtype=torch.float32)
        load_into(model, weights, str(source.tag_dir))
        log.info("loaded %s: %s", source.describe(), where)
    return model.eval()


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str, prefix_filter: str = "") -> None:
    """``load_state_dict`` that accepts only tied keys (and, with ``prefix_filter``, keys outside it) as missing."""
    if prefix_filter:
        weights = {k: v for k, v in weights.items() if k.startswith(prefix_filter)}
    result = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in result.missing_keys if k not in tied and (not prefix_filter or k.startswith(prefix_filter))]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{where}: weights do not fit the model (missing {missing[:4]}, unexpected {result.unexpected_keys[:4]})")
