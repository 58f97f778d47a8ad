"""Metric sinks (TensorBoard, console), throughput and MFU. The logging rank is chosen once.

Every rank gets a sink; all but rank 0 get ``NullSink``, so the loop never branches on rank.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from bert_ds.config import LoggingConfig
from bert_ds.model import training_flops

log = logging.getLogger("bert_ds")


class NullSink:
    """Does nothing: what non-logging ranks (and disabled outputs) get."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink(NullSink):
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def build_sink(is_logging_rank: bool, tensorboard_dir: Path | None) -> NullSink:
    if not is_logging_rank or tensorboard_dir is None:
        return NullSink()
    return TensorBoardSink(tensorboard_dir)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 2048, trials: int = 5, seconds: float = 0.25) -> float:
    """Achievable dense matmul TFLOP/s on this device and dtype: the denominator of MFU here.

    On CPUs there is no datasheet number to trust (AMX, AVX-512 and thread count all
    matter), so the machine's own large-matmul rate is the honest peak. The best of several
    short trials, so a neighbour process briefly taking the core does not lower the peak
    (and inflate MFU).
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: kernel selection, AMX tile config
    best = 0.0
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            torch.mm(a, b)
            n += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 * n / (time.perf_counter() - t0) / 1e12)
    return best


class Throughput:
    """Samples, tokens and model FLOPs per second between two ``measure`` calls."""

    def __init__(self, flops_fn, world_size: int, peak_tflops_per_device: float):
        self.flops_fn = flops_fn  # (samples, masked tokens) -> model FLOPs
        self.world_size = world_size
        self.peak = peak_tflops_per_device
        self._t = time.perf_counter()

    @classmethod
    def for_model(cls, cfg: LoggingConfig, bert_config, seq_length: int, world_size: int, device: torch.device, dtype: torch.dtype) -> Throughput:
        """Throughput of training ``bert_config`` on ``seq_length``-token samples; MFU against ``logging.peak_tflops_per_device``
        or, when that is 0, the matmul peak measured here. FLOPs count the masked tokens actually predicted, not the cap."""
        peak = cfg.peak_tflops_per_device or measure_peak_tflops(device, dtype)
        return cls(lambda samples, masked: training_flops(bert_config, seq_length, samples, masked), world_size, peak)

    def reset(self) -> None:
        self._t = time.perf_counter()

    def measure(self, samples: int, tokens: int, masked: float) -> dict[str, float]:
        now = time.perf_counter()
        seconds = max(now - self._t, 1e-9)
        self._t = now
        tflops = self.flops_fn(samples, masked) / seconds / 1e12 / self.world_size
        return {
            "train/samples_per_sec": samples / seconds,
            "train/tokens_per_sec": tokens / seconds,
            "train/tflops_per_device": tflops,
            "train/mfu": tflops / self.peak if self.peak > 0 else 0.0,
        }


def memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"train/memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import psutil

    return {"train/memory_rss_gb": psutil.Process().memory_info().rss / 2**30}
