"""The one module that reads rank and address variables, and starts torch.distributed.

Where the rank comes from, in order (``discover_ranks``, a pure function):
  1. a torch-style launcher (``deepspeed``, ``torchrun``): RANK, WORLD_SIZE, LOCAL_RANK;
  2. SLURM ``srun``: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID;
  3. Open MPI ``mpirun``: OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK;
  4. MPICH / Intel MPI / PMI: PMI_RANK, PMI_SIZE, MPI_LOCALRANKID;
  5. nothing: a single process.

The master address is never guessed from a network interface (DeepSpeed's fallback uses
``hostname -I``, which picks whatever NIC comes first): it comes from MASTER_ADDR, or under
SLURM from the first host of the job's node list; a single process uses 127.0.0.1.

For the preflight (``bert_ds.preflight``) it also tells which node a rank runs on (``discover_node``)
and on which host every rank is expected (``expected_rank_hosts``), to name a rank that never arrived.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta

import torch

from bert_ds.hostfile import HostfileError, expand_nodelist, expand_tasks_per_node, read_hostfile

log = logging.getLogger(__name__)


class DistributedSetupError(RuntimeError):
    """Rank discovery or rendezvous cannot proceed; the message says which variable is missing."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    source: str  # launcher | slurm | openmpi | mpich | single


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    source: str

    @property
    def is_main(self) -> bool:
        """Rank 0 does the logging, writes the run directory files and TensorBoard events."""
        return self.rank == 0


_SOURCES = [
    ("launcher", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
]


def discover_ranks(env: Mapping[str, str]) -> RankInfo:
    for source, rank_var, size_var, local_var in _SOURCES:
        if rank_var in env:
            if size_var not in env:
                raise DistributedSetupError(f"{rank_var} is set but {size_var} is not: cannot tell the world size")
            try:
                rank, world = int(env[rank_var]), int(env[size_var])
                local = int(env.get(local_var, "0"))
            except ValueError:
                raise DistributedSetupError(f"{rank_var}={env[rank_var]!r} / {size_var}={env[size_var]!r} are not integers") from None
            if not 0 <= rank < world:
                raise DistributedSetupError(f"{rank_var}={rank} is outside [0, {size_var}={world})")
            return RankInfo(rank, world, local, source)
    return RankInfo(0, 1, 0, "single")


def slurm_master_addr(env: Mapping[str, str]) -> str | None:
    """First host of the job step's node list, resolved to its NodeAddr (``scontrol``)."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    first = subprocess.check_output(["scontrol", "show", "hostnames", nodelist], text=True).split()[0]
    node = subprocess.check_output(["scontrol", "show", "node", first, "-o"], text=True)
    m = re.search(r"NodeAddr=(\S+)", node)
    return m.group(1) if m else first


def set_rendezvous_address(info: RankInfo, env: MutableMapping[str, str]) -> tuple[str, int]:
    """Fill in MASTER_ADDR / MASTER_PORT (explicit, or the first SLURM node; never an interface guess).

    ``init`` calls this; ``bert_ds.preflight`` calls it before ``init`` to rendezvous on the same address.
    """
    if info.source == "single":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_ADDR" not in env:
        addr = slurm_master_addr(env) if info.source == "slurm" else None
        if addr is None:
            raise DistributedSetupError(
                f"MASTER_ADDR is not set ({info.source} started {info.world_size} ranks): pass --master_addr to the launcher "
                "or export MASTER_ADDR (bert-ds never guesses an address from the network interfaces)"
            )
        env["MASTER_ADDR"] = addr
    env.setdefault("MASTER_PORT", "29500")
    return env["MASTER_ADDR"], int(env["MASTER_PORT"])


@dataclass(frozen=True)
class NodeInfo:
    name: str  # SLURMD_NODENAME under srun, else the host name
    node_rank: int | None  # index of the node in the job: CROSS_RANK (deepspeed), GROUP_RANK (torchrun), SLURM_NODEID
    local_world_size: int | None  # ranks on this node


def discover_node(info: RankInfo, env: Mapping[str, str], hostname: str) -> NodeInfo:
    """Which node a rank runs on, as its launcher tells it (several emulated nodes may share one host name)."""

    def _int(name: str) -> int | None:
        value = env.get(name, "")
        return int(value) if value.isdigit() else None

    if info.source == "launcher":
        node_rank = _int("CROSS_RANK") if "CROSS_RANK" in env else _int("GROUP_RANK")
        local = _int("LOCAL_SIZE") if "LOCAL_SIZE" in env else _int("LOCAL_WORLD_SIZE")
    elif info.source == "slurm":
        node_rank = _int("SLURM_NODEID")
        try:
            counts = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
        except HostfileError:
            counts = []
        local = counts[node_rank] if node_rank is not None and node_rank < len(counts) else None
    elif info.source == "openmpi":
        node_rank, local = None, _int("OMPI_COMM_WORLD_LOCAL_SIZE")
    elif info.source == "mpich":
        node_rank, local = None, _int("MPI_LOCALNRANKS")
    else:
        node_rank, local = 0, 1
    return NodeInfo(env.get("SLURMD_NODENAME") or hostname, node_rank, local)


def expected_rank_hosts(env: Mapping[str, str]) -> list[str] | None:
    """The host each rank should run on, from the SLURM task layout or the hostfile; None when nothing says.

    Only used to name a missing rank's host in an error. DeepSpeed numbers ranks in hostfile order
    (the launch scripts export the hostfile's path as BERT_DS_HOSTFILE); srun places tasks in blocks by default.
    """
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    tasks = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    try:
        if "RANK" not in env and "SLURM_PROCID" in env and nodelist and tasks:
            return [h for h, n in zip(expand_nodelist(nodelist), expand_tasks_per_node(tasks), strict=False) for _ in range(n)]
        if env.get("BERT_DS_HOSTFILE"):
            return [e.host for e in read_hostfile(env["BERT_DS_HOSTFILE"]) for _ in range(e.slots)]
    except HostfileError:
        pass
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def select_device(preference: str, local_rank: int, cuda_available: bool, cuda_device_count: int) -> tuple[str, int | None, str]:
    """(device type, device index, backend) for a rank. Pure, so it is testable without a GPU."""
    if preference == "cuda" and not cuda_available:
        raise DistributedSetupError("train.device is 'cuda' but torch sees no CUDA device (torch.cuda.is_available() is False)")
    if preference == "cuda" or (preference == "auto" and cuda_available):
        if local_rank >= cuda_device_count:
            raise DistributedSetupError(
                f"local rank {local_rank} has no GPU: this node has {cuda_device_count}; "
                "the hostfile's slots= (or --num_gpus / --ntasks-per-node) exceeds the GPUs per node"
            )
        return "cuda", local_rank, "nccl"
    return "cpu", None, "gloo"


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


def init(device_preference: str = "auto", timeout_minutes: float = 10.0) -> DistContext:
    """Discover ranks, pin the device, and start DeepSpeed's process group (all ranks must call)."""
    env = os.environ
    info = discover_ranks(env)
    set_rendezvous_address(info, env)
    # torch.distributed's env:// rendezvous reads these names whatever launched us
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(info.rank), str(info.world_size), str(info.local_rank)
    device_type, index, backend = select_device(device_preference, info.local_rank, torch.cuda.is_available(), torch.cuda.device_count())
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(device)
    import deepspeed

    from bert_ds import jit_ops

    jit_ops.prebuild_comm_op()  # a no-op when the preflight built it; else it is built under our flock, not torch's lock file
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(minutes=timeout_minutes))
    log.info("rank %d/%d (local %d, from %s) on %s, backend %s, master %s:%s", info.rank, info.world_size, info.local_rank,
             info.source, device, backend, env["MASTER_ADDR"], env["MASTER_PORT"])
    return DistContext(info.rank, info.world_size, info.local_rank, device, backend, info.source)


def shutdown() -> None:
    """Tear the process group down before exit (Open MPI ranks abort otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
