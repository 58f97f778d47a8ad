"""Rank discovery and device selection: pure logic, checked for every launcher on CPU."""

from __future__ import annotations

import pytest

from bert_ds.dist import DistributedSetupError, RankInfo, discover_ranks, select_device


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
