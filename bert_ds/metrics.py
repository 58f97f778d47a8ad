"""Metric sinks (TensorBoard, console), throughput and MFU. The logging rank is chosen once.

Every rank gets a sink; all but rank 0 get ``NullSink``, so the loop never branches on rank.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from pathlib import Path

import torch

from bert_ds.config import LoggingConfig
from bert_ds.model import training_flops, useful_training_flops
from bert_ds.precision import DTYPES

log = logging.getLogger("bert_ds")


class NullSink:
    """Does nothing: what non-logging ranks (and disabled outputs) get."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
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

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def build_sink(is_logging_rank: bool, tensorboard_dir: Path | None) -> NullSink:
    if not is_logging_rank or tensorboard_dir is None:
        return NullSink()
    return TensorBoardSink(tensorboard_dir)


# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s per GPU, by precision; "tf32" is
# fp32 training with TF32 matmuls allowed. Matched against torch.cuda.get_device_name in order (specific names
# first). A MIG slice gets its share of the GPU's 7 compute slices. None: the precision has no tensor-core path
# there (bf16 on V100 is emulated), so the peak is measured instead.
DATASHEET_PEAKS: list[tuple[str, str, dict[str, float | None]]] = [
    (r"B200", "B200 (HGX, 1000 W)", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    (r"H200", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H100", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"A30\b", "A30", {"bf16": 165.0, "fp16": 165.0, "tf32": 82.0, "fp32": 10.3}),
    (r"A10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"L40S", "L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"L4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"V100.*SXM", "V100 SXM2", {"bf16": None, "fp16": 125.0, "tf32": 15.7, "fp32": 15.7}),
    (r"V100", "V100 PCIe", {"bf16": None, "fp16": 112.0, "tf32": 14.0, "fp32": 14.0}),
]
_MIG = re.compile(r"MIG (\d)g\.")


def datasheet_peak_tflops(device_name: str, precision: str, tf32: bool) -> tuple[float, str] | None:
    """(peak, where it came from) for a known accelerator and precision, or None to measure. Pure, testable without a GPU."""
    key = "tf32" if precision == "fp32" and tf32 else precision
    for pattern, label, peaks in DATASHEET_PEAKS:
        if re.search(pattern, device_name) and peaks.get(key) is not None:
            peak, where = float(peaks[key]), f"datasheet {label} {key} dense"
            mig = _MIG.search(device_name)
            if mig:
                slices = int(mig.group(1))
                peak, where = peak * slices / 7, f"{where}, MIG {slices}/7 of the GPU"
            return peak, where
    return None


def peak_tflops(cfg: LoggingConfig, device: torch.device, precision: str) -> tuple[float, str]:
    """The MFU denominator and where it came from: ``logging.peak_tflops_per_device``, else the datasheet peak of a
    known accelerator, else (CPUs, unknown GPUs) a matmul measured here."""
    if cfg.peak_tflops_per_device:
        return cfg.peak_tflops_per_device, "logging.peak_tflops_per_device"
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        known = datasheet_peak_tflops(torch.cuda.get_device_name(device), precision, tf32)
        if known:
            return known
    return measure_peak_tflops(device, DTYPES[precision]), f"measured: best {DTYPES[precision]} matmul rate of this {device.type}"


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, trials: int = 3, seconds: float = 0.1, max_size: int = 2048) -> float:
    """Achievable dense matmul TFLOP/s on this device and dtype: the MFU denominator where no datasheet applies.

    On CPUs there is no datasheet number to trust (AMX, AVX-512 and thread count all matter), so the
    machine's own large-matmul rate is the honest peak: the best of several short trials, so a neighbour
    briefly taking the core does not lower the peak (and inflate MFU). The matrix grows from 256 until one
    product takes 20 ms (or reaches ``max_size``), so an emulated dtype (bf16 on AVX2) costs a second, not minutes.
    Draws its matrices from its own generator: the global RNG streams a resumed run restored stay untouched.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    size = 256
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        torch.mm(a, b)  # warm-up: kernel selection, AMX tile config
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if time.perf_counter() - t0 > 0.02 or size >= max_size:
            break
        size *= 2
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
    """Samples, tokens and model FLOPs per second of training: the time between two ``measure`` calls, minus pauses.

    Checkpoints and evaluations run inside ``with throughput.paused():``, so their time never falls into a
    window, whatever ``train.log_interval``, ``checkpoint.interval_steps`` and ``eval.interval_steps`` are.
    """

    def __init__(self, flops_fn, world_size: int, peak_tflops_per_device: float, peak_source: str = ""):
        self.flops_fn = flops_fn  # (samples, masked tokens[, tokens, squared pair lengths]) -> model FLOPs
        self.world_size = world_size
        self.peak = peak_tflops_per_device
        self.peak_source = peak_source
        self._t = time.perf_counter()
        self._paused = 0.0

    @classmethod
    def for_model(cls, cfg: LoggingConfig, bert_config, seq_length: int, world_size: int, device: torch.device, precision: str) -> Throughput:
        """Throughput of training ``bert_config`` on ``seq_length``-token samples, MFU against :func:`peak_tflops`.

        FLOPs count the masked tokens actually predicted, not the cap, never activation recomputation, and, when
        :meth:`measure` is given the squared pair lengths, only non-padding tokens and each pair's own attention
        (``bert_ds.model.useful_training_flops``: useful work only, as MFU is defined; packed or not).
        """
        peak, source = peak_tflops(cfg, device, precision)

        def flops(samples, masked, tokens=None, squared_lengths=None):
            if tokens is None:
                return training_flops(bert_config, seq_length, samples, masked)
            return useful_training_flops(bert_config, tokens, squared_lengths, samples, masked)

        return cls(flops, world_size, peak, source)

    def reset(self) -> None:
        self._t = time.perf_counter()
        self._paused = 0.0

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0

    def measure(self, samples: int, tokens: int, masked: float, squared_lengths: float | None = None) -> dict[str, float]:
        """Rates since the last call: ``samples`` are pairs (several per row when packed), ``tokens`` non-padding ones."""
        now = time.perf_counter()
        seconds = max(now - self._t - self._paused, 1e-9)
        self._t, self._paused = now, 0.0
        work = self.flops_fn(samples, masked) if squared_lengths is None else self.flops_fn(samples, masked, tokens, squared_lengths)
        tflops = work / seconds / 1e12 / self.world_size
        return {
            "train/samples_per_sec": samples / seconds,
            "train/tokens_per_sec": tokens / seconds,
            "train/tflops_per_device": tflops,
            "train/mfu": tflops / self.peak if self.peak > 0 else 0.0,
        }
