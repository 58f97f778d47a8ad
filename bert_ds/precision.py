"""Training precision: which one a run gets on this device (``train.precision: auto``), and its torch dtype.

The run config names the precision (``train.precision``), :mod:`bert_ds.ds_config` renders it into
DeepSpeed's ``fp16``/``bf16`` sections, and everything else reads the resolved value from the run's
context (:mod:`bert_ds.startup`); the decision itself is made here, once per process.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The compute dtype of each concrete precision."""


def has_fast_bf16(device_type: str, index: int | None = None) -> bool:
    """Whether bf16 matmuls run at speed: CUDA compute capability 8.0+ (Ampere), or a CPU that oneDNN has
    bf16 kernels for (AVX-512 and newer; in hardware with AVX512-BF16/AMX). Elsewhere (AVX2-only CPUs)
    torch falls back to scalar bf16 loops: measured 0.3-8 GFLOP/s against 50 for fp32 on the same core."""
    if device_type == "cuda":
        # not torch.cuda.is_bf16_supported(): it also answers True for emulated bf16 on V100
        return torch.cuda.get_device_capability(index)[0] >= 8
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def select_precision(requested: str, device_type: str, fast_bf16: bool) -> tuple[str, str]:
    """(precision, why) for ``train.precision``; ``auto`` picks by hardware. Pure, so it is testable without a GPU.

    auto: bf16 where it runs at speed (no loss scaling needed); fp16 with dynamic loss scaling on
    older GPUs (NVIDIA's BERT recipe on V100); fp32 on a CPU without bf16 kernels.
    """
    if requested != "auto":
        return requested, "train.precision"
    if fast_bf16:
        return "bf16", f"train.precision auto: this {device_type} runs bf16 at speed"
    if device_type == "cuda":
        return "fp16", "train.precision auto: this GPU has no bf16 hardware (compute capability < 8.0): fp16 with dynamic loss scaling"
    return "fp32", "train.precision auto: this CPU has no bf16 kernels (AVX-512/AMX): bf16 would run 20-200x slower than fp32"


def resolve_precision(requested: str, device_type: str, index: int | None = None) -> tuple[str, str]:
    """``select_precision`` for this machine's device; warns when bf16 is asked for where it is emulated."""
    fast = has_fast_bf16(device_type, index)
    precision, why = select_precision(requested, device_type, fast)
    if precision == "bf16" and not fast:
        log.warning("train.precision is bf16 but this %s has no bf16 kernels: torch emulates it, 20-200x slower than fp32 "
                    "(train.precision=auto picks fp32 here)", device_type)
    return precision, why
