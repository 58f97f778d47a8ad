"""MFU's denominator (datasheet peaks of known accelerators, a measured matmul elsewhere) and throughput windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from bert_ds import metrics
from bert_ds.config import LoggingConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, precision, tf32, peak, source",
    [
        ("NVIDIA A100-SXM4-80GB", "bf16", False, 312.0, "A100 bf16"),
        ("NVIDIA A100 80GB PCIe", "fp16", False, 312.0, "A100 fp16"),
        ("NVIDIA A100-SXM4-40GB", "fp32", True, 156.0, "A100 tf32"),
        ("NVIDIA A100-SXM4-40GB", "fp32", False, 19.5, "A100 fp32"),
        ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "bf16", False, 312.0 * 3 / 7, "MIG 3/7"),
        ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4, "H100 SXM"),  # the SXM part's name
        ("NVIDIA H100 PCIe", "bf16", False, 756.0, "H100 PCIe"),
        ("NVIDIA H200", "bf16", False, 989.4, "H200"),
        ("NVIDIA B200", "bf16", False, 2250.0, "B200"),
        ("Tesla V100-SXM2-32GB", "fp16", False, 125.0, "V100 SXM2"),
        ("Tesla V100-PCIE-16GB", "fp16", False, 112.0, "V100 PCIe"),
        ("NVIDIA L4", "bf16", False, 121.0, "L4"),
        ("NVIDIA L40S", "bf16", False, 362.1, "L40S"),
        ("NVIDIA A10", "bf16", False, 125.0, "A10"),
    ],
)
def test_known_accelerators_get_their_datasheet_dense_peak(name, precision, tf32, peak, source):
    got, where = metrics.datasheet_peak_tflops(name, precision, tf32)
    assert got == pytest.approx(peak) and all(word in where for word in source.split()), (got, where)


@pytest.mark.parametrize("name, precision", [("NVIDIA GeForce RTX 4090", "bf16"), ("Tesla V100-SXM2-32GB", "bf16"), ("AMD Instinct MI300X", "bf16")])
def test_unknown_accelerators_and_emulated_precisions_are_measured(name, precision):
    assert metrics.datasheet_peak_tflops(name, precision, tf32=False) is None


def test_on_a_cpu_the_peak_is_measured_unless_set(monkeypatch):
    assert metrics.peak_tflops(LoggingConfig(peak_tflops_per_device=7.5), torch.device("cpu"), "fp32") == (7.5, "logging.peak_tflops_per_device")
    monkeypatch.setattr(metrics, "measure_peak_tflops", lambda device, dtype: 0.123)
    peak, where = metrics.peak_tflops(LoggingConfig(), torch.device("cpu"), "bf16")
    assert peak == 0.123 and "measured" in where and "bfloat16" in where


def test_measuring_the_peak_draws_nothing_from_the_global_generators():
    """A resumed run measures the peak after restoring its RNG states: it must not move them (it did, and broke exact resume)."""
    before = torch.get_rng_state().clone()
    peak = metrics.measure_peak_tflops(torch.device("cpu"), torch.float32, trials=1, seconds=0.01, max_size=256)
    assert peak > 0 and torch.equal(torch.get_rng_state(), before)


def test_paused_time_never_falls_into_a_throughput_window(monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 13.0, 20.0, 30.0, 31.0, 32.0])  # start, reset; pause 10-13, measure at 20; pause 30-31, measure 32
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    t = metrics.Throughput(lambda samples, masked: 1e12 * samples, world_size=1, peak_tflops_per_device=2.0)
    t.reset()
    with t.paused():  # a checkpoint between two logs
        pass
    assert t.measure(samples=170, tokens=1700, masked=0)["train/samples_per_sec"] == pytest.approx(170 / 17)
    with t.paused():  # an evaluation
        pass
    m = t.measure(samples=11, tokens=0, masked=0)
    assert m["train/samples_per_sec"] == pytest.approx(11 / 11) and m["train/mfu"] == pytest.approx(0.5)


def test_recipes_leave_the_peak_to_the_device():
    """A hard-coded A100 peak (312) read about 3x too high on an H100; recipes leave it at 0 (datasheet or measured)."""
    for path in sorted((REPO / "launch" / "configs").glob("*.yaml")):
        peak = (yaml.safe_load(path.read_text()).get("logging") or {}).get("peak_tflops_per_device", 0.0)
        assert peak == 0.0, (path.name, peak)
