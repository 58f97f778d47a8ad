"""A rank's memory: what ZeRO's accounting says it should hold, what it holds, and freed memory given back.

Theory (:func:`theory_bytes`), after the ZeRO paper's accounting for mixed precision with an Adam-type optimizer:
``Psi`` parameters cost 2 bytes each in half precision plus 2 for their gradients, and the optimizer holds 12
(an fp32 master copy and two fp32 moments; LAMB and Adam alike). ZeRO-1 partitions the 12 over the N data-parallel
ranks, ZeRO-2 also the gradients, ZeRO-3 also the parameters:

    stage 0: 16 Psi          stage 1: 4 Psi + 12 Psi / N          stage 2: 2 Psi + 14 Psi / N          stage 3: 16 Psi / N

fp32 training keeps no half copy: parameters 4, gradients 4, moments 8 bytes (16 in all, the same split). A process
also holds what importing torch, DeepSpeed and transformers costs (measured at start-up: ``baseline``), activations
for its micro-batch, and communication buffers; :func:`theory_bytes` counts the model states only.

Allocator: glibc raises its mmap threshold after each large free, so later tensors of up to 32 MB land in the heap,
whose freed pages it keeps. Building a model module by module under ZeRO-3 then left a rank holding more than the
whole fp32 model (measured: a 617 MB model built partitioned peaked at +846 MB on rank 0, against its 308 MB
partition). :func:`return_freed_memory` pins the threshold, so every tensor of 1 MiB or more is its own mapping,
returned to the system when freed (the same build then peaked at +328 MB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_GIB = 2**30


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes and more from their own mappings (see the module docstring).

    Returns False where the C library is not glibc (nothing changes there).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak RSS since the last :func:`reset_peak` (VmHWM), else since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def theory_bytes(num_params: int, zero_stage: int, world_size: int, precision: str) -> int:
    """Model-state bytes one rank should hold (module docstring): parameters, gradients and optimizer state."""
    half = precision in ("bf16", "fp16")
    params, grads, optimizer = (2, 2, 12) if half else (4, 4, 8)
    n = world_size
    per_param = {
        0: params + grads + optimizer,
        1: params + grads + optimizer / n,
        2: params + (grads + optimizer) / n,
        3: (params + grads + optimizer) / n,
    }[zero_stage]
    return int(num_params * per_param)


def memory_metrics(device: torch.device, theory: int, baseline: int) -> dict[str, float]:
    """``train/memory_*`` for the log: now, peak since the last call (which starts a new window), and the theory.

    ``train/memory_theory_gb`` is the model states' theory plus this process's import ``baseline``, so it compares
    with ``train/memory_rss_gb`` (activations and buffers come on top).
    """
    if device.type == "cuda":
        out = {"train/memory_allocated_gb": torch.cuda.memory_allocated(device) / _GIB,
               "train/memory_peak_gb": torch.cuda.max_memory_allocated(device) / _GIB,
               "train/memory_theory_gb": theory / _GIB}  # fmt: skip
        torch.cuda.reset_peak_memory_stats(device)
        return out
    out = {"train/memory_rss_gb": rss_bytes() / _GIB, "train/memory_peak_gb": peak_rss_bytes() / _GIB,
           "train/memory_theory_gb": (theory + baseline) / _GIB}  # fmt: skip
    reset_peak()
    return out


def pss_bytes(pid: int | None = None) -> int:
    """Proportional set size of a process (shared pages divided among their users): sums over a process tree."""
    path = Path(f"/proc/{pid or os.getpid()}/smaps_rollup")
    for line in path.read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0
