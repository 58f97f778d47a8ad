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

For the preflight (``bert_ds.cluster.preflight``) it also tells which node a rank runs on (``discover_node``)
and on which host every rank is expected (``expected_rank_hosts``), to name a rank that never arrived.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta

import torch

from bert_ds.cluster.hostfile import HostfileError, expand_nodelist, expand_tasks_per_node, read_hostfile

log = logging.getLogger(__name__)


class DistributedSetupError(RuntimeError):
    """Rank discovery or rendezvous cannot proceed; the message says which variable is missing."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    source: str  # launcher | slurm | openmpi | mpich | single


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
    """Fill in MASTER_ADDR / MASTER_PORT for a job of several ranks (explicit, or the first SLURM node; never an interface guess).

    The start-up (``bert_ds.startup``) calls it once, before the preflight rendezvous, which the process group then reuses.
    """
    if env.get("MASTER_ADDR") == "":  # DeepSpeed would then guess one from `hostname -I`
        raise DistributedSetupError(f"MASTER_ADDR is set but empty ({info.source} started {info.world_size} ranks): give the "
                                    "rendezvous address (--master_addr, or export MASTER_ADDR)")
    if "MASTER_ADDR" not in env:
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


def listening_socket(addr: str, port: int, multi_node: bool | None) -> socket.socket:
    """A socket bound to MASTER_ADDR itself (not every interface) and listening: the rendezvous store's server socket.

    torch's TCPStore binds to all interfaces; handed this socket (``master_listen_fd``) it serves only here, so a
    single-node or loopback run listens on loopback only and a multi-node run on the address the launcher or
    scheduler named. A host name that resolves to a loopback address on the master (Debian maps the machine's own
    name to 127.0.1.1 in /etc/hosts) cannot serve ranks on other nodes: refused when the job spans several.
    """
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    except OSError as e:
        raise DistributedSetupError(f"MASTER_ADDR {addr} does not resolve on rank 0's host ({e.strerror or e})") from None
    ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
    if ip.is_loopback and multi_node and addr != sockaddr[0]:
        raise DistributedSetupError(
            f"MASTER_ADDR {addr} resolves to {ip} (loopback) on rank 0's host, so ranks on other nodes cannot reach the "
            "rendezvous there (Debian's /etc/hosts maps a machine's own name to 127.0.1.1): set MASTER_ADDR to this node's "
            "address on the network between the nodes"
        )
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
    except OSError as e:
        sock.close()
        raise DistributedSetupError(f"cannot listen on {addr}:{port} ({e.strerror or e}): is the port taken? set MASTER_PORT") from None
    sock.listen(1024)
    return sock


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (for single-process runs and tests)."""
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


def device_for(device_type: str, index: int | None) -> torch.device:
    """The torch device of a ``select_device`` choice."""
    return torch.device(device_type, index) if index is not None else torch.device(device_type)


def init_process_group(ranks: RankInfo, device: torch.device, backend: str, store, timeout_minutes: float = 10.0) -> None:
    """Pin the device and start the process group on decided ranks and device, over the rendezvous ``store`` (all ranks).

    The store is the preflight's (``bert_ds.cluster.preflight.open_store``): the process group opens no listener of
    its own. DeepSpeed's communication layer then wraps this group; its JIT comm op is built beforehand
    (``bert_ds.cluster.jit_ops``), outside any deadline.
    """
    # DeepSpeed's engine reads LOCAL_RANK (and its launcher's ranks RANK, WORLD_SIZE) from the environment, whatever launched us
    os.environ.update(RANK=str(ranks.rank), WORLD_SIZE=str(ranks.world_size), LOCAL_RANK=str(ranks.local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import deepspeed

    if not torch.distributed.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        torch.distributed.init_process_group(backend, store=store, rank=ranks.rank, world_size=ranks.world_size, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(minutes=timeout_minutes))
    unlink_shared_memory_names(ranks.rank)
    log.info("rank %d/%d (local %d, from %s) on %s, backend %s, master %s:%s", ranks.rank, ranks.world_size, ranks.local_rank,
             ranks.source, device, backend, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))


def unlink_shared_memory_names(rank: int) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer once every rank has mapped every buffer.

    DeepSpeed's shared-memory comm op (CPU, all ranks on one node) creates a ~69 MB segment per rank named
    ``/dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}`` (DeepSpeed 0.19's shm.cpp), maps
    its peers' by name while initialising, and never unlinks them: every launch left its segments in /dev/shm, which
    is memory (a test session left 8 GB). After the barrier every rank holds its mappings, so the names can go; the
    memory is freed when the last rank exits, also when it is killed.
    """
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # no shared-memory op here (GPU, ranks on several nodes, another accelerator)
        pass


def shutdown() -> None:
    """Tear the process group down before exit (Open MPI ranks abort otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
