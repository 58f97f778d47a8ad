"""Rank discovery, device and precision selection: pure logic, checked for every launcher and device on CPU."""

from __future__ import annotations

import pytest

from bert_ds.cluster.dist import DistributedSetupError, RankInfo, discover_ranks, select_device
from bert_ds.precision import has_fast_bf16, select_precision


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, RankInfo(3, 8, 1, "launcher")),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, RankInfo(5, 8, 1, "slurm")),
        ({"OMPI_COMM_WORLD_RANK": "7", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}, RankInfo(7, 8, 3, "openmpi")),
        ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}, RankInfo(2, 4, 0, "mpich")),
        ({}, RankInfo(0, 1, 0, "single")),
        # a launcher's variables win over the scheduler's (deepspeed inside an allocation)
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, RankInfo(1, 2, 1, "launcher")),
    ],
    ids=["launcher", "slurm", "openmpi", "mpich", "single", "launcher-in-slurm"],
)
def test_discover_ranks(env, expected):
    assert discover_ranks(env) == expected


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0"}, "WORLD_SIZE is not"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "outside [0, WORLD_SIZE=4)"),
        ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "not integers"),
    ],
)
def test_bad_rank_variables_are_named(env, message):
    with pytest.raises(DistributedSetupError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        discover_ranks(env)


def test_device_selection_by_capability():
    assert select_device("auto", 0, cuda_available=False, cuda_device_count=0) == ("cpu", None, "gloo")
    assert select_device("auto", 1, cuda_available=True, cuda_device_count=8) == ("cuda", 1, "nccl")
    assert select_device("cpu", 0, cuda_available=True, cuda_device_count=8) == ("cpu", None, "gloo")
    with pytest.raises(DistributedSetupError, match="no CUDA device"):
        select_device("cuda", 0, cuda_available=False, cuda_device_count=0)
    with pytest.raises(DistributedSetupError, match="local rank 4 has no GPU: this node has 4"):
        select_device("auto", 4, cuda_available=True, cuda_device_count=4)


@pytest.mark.parametrize(
    "requested, device, fast_bf16, expected",
    [
        ("auto", "cuda", True, "bf16"),  # A100/H100
        ("auto", "cuda", False, "fp16"),  # V100: NVIDIA's BERT recipe, dynamic loss scaling
        ("auto", "cpu", True, "bf16"),  # AVX-512 / AVX512-BF16 / AMX: oneDNN's bf16 kernels
        ("auto", "cpu", False, "fp32"),  # AVX2 only: scalar bf16 loops, 20-200x slower than fp32
        ("bf16", "cpu", False, "bf16"),  # an explicit choice is kept (with a warning at start-up)
        ("fp16", "cuda", True, "fp16"),
        ("fp32", "cuda", True, "fp32"),
    ],
)
def test_precision_auto_picks_by_hardware_and_an_explicit_choice_stays(requested, device, fast_bf16, expected):
    precision, why = select_precision(requested, device, fast_bf16)
    assert precision == expected
    assert why.startswith("train.precision")


def test_this_cpu_runs_bf16_at_speed_exactly_when_it_has_avx512():
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    # oneDNN's bf16 kernels start at AVX-512 "core" (F, BW, VL, DQ); AMX and AVX512-BF16 CPUs have it too
    assert has_fast_bf16("cpu") == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags), sorted(f for f in flags if "avx" in f or "amx" in f)
