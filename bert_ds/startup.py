"""A run's one start-up: ranks, device, precision, vocabulary and logging decided once, then checked across ranks.

    ctx = start(cfg)   # on every rank; a RunContext, or PreflightError / DistributedSetupError with a message

Each step runs once per process, in this order:

1. the ranks, from the launcher or scheduler (``cluster.dist.discover_ranks``), and logging for them;
2. the vocabulary and its hash (``data.vocab.resolve_vocab``);
3. this rank's device (``cluster.dist.select_device``) and precision (``precision.resolve_precision``);
4. DeepSpeed's comm op, built before any deadline starts (``cluster.jit_ops``);
5. the preflight: every rank posts what 1-3 decided and rank 0 compares (``cluster.preflight``), so a
   missing rank or a rank that sees another world stops the job with one message naming it;
6. the process group and one all-reduce, within a deadline.

The trainer and ``python -m bert_ds.preflight`` both start here; nothing after it decides any of these again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch

from bert_ds import memory
from bert_ds.cluster import dist, jit_ops, preflight
from bert_ds.cluster.dist import RankInfo
from bert_ds.config import ConfigError, RunConfig
from bert_ds.data.vocab import Vocab, resolve_vocab
from bert_ds.precision import DTYPES, resolve_precision

log = logging.getLogger("bert_ds")


@dataclass(frozen=True)
class RunContext:
    """What the start-up decided for this process; everything after it reads these, never the environment."""

    cfg: RunConfig
    """The run config with ``train.precision`` resolved for this device (``auto`` made concrete)."""
    ranks: RankInfo
    device: torch.device
    backend: str
    """``nccl`` on GPUs, ``gloo`` on CPUs."""
    vocab: Vocab
    memory_baseline: int = 0
    """This process's RSS at the end of start-up (libraries imported, process group up, no model yet), in bytes."""

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    @property
    def is_main(self) -> bool:
        """Rank 0 does the logging, writes the run directory's files and TensorBoard events."""
        return self.ranks.rank == 0

    @property
    def precision(self) -> str:
        return self.cfg.train.precision

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.train.precision]


def configure_logging(rank: int) -> None:
    """INFO on rank 0, warnings elsewhere, each line prefixed with the rank; DeepSpeed's own chatter quietened."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def start(cfg: RunConfig, env: MutableMapping[str, str] | None = None) -> RunContext:
    """Decide this process's ranks, device, precision and vocabulary once, check them across ranks, start the process group.

    All ranks must call it. Raises :class:`bert_ds.cluster.preflight.PreflightError` (the same message on
    every rank that is alive) when the job cannot start.
    """
    env = os.environ if env is None else env
    ranks = dist.discover_ranks(env)
    configure_logging(ranks.rank)
    memory.return_freed_memory()  # before any large tensor exists: see bert_ds.memory
    try:
        vocab, vocab_report = resolve_vocab(cfg), None
    except ConfigError as e:  # reported through the preflight, so rank 0 names the rank that cannot read it
        vocab, vocab_report = None, {"error": str(e)}
    if vocab is not None:
        vocab_report = {"path": vocab.path, "sha256": vocab.sha256, "size": vocab.size}

    cuda = torch.cuda.is_available()
    cuda_devices = torch.cuda.device_count() if cuda else 0
    try:
        device_type, index, backend = dist.select_device(cfg.train.device, ranks.local_rank, cuda, cuda_devices)
        device, device_error = dist.device_for(device_type, index), None
        precision, why = resolve_precision(cfg.train.precision, device_type, index)
    except dist.DistributedSetupError as e:  # reported through the preflight, as above
        device, backend, device_error, precision, why = None, "none", str(e), "none", ""

    report = preflight.local_report(
        ranks, env, device=str(device) if device is not None else "none", device_error=device_error, backend=backend,
        precision=precision, cuda_devices=cuda_devices, vocab=vocab_report, shard_prefixes=cfg.data.prefixes(),
    )
    # on CPU, starting the process group JIT-compiles a comm op (~1 min cold): done here, outside the deadlines below
    jit_ops.prebuild_comm_op()
    timeout = preflight.timeout_s(env)
    if ranks.world_size == 1:
        store, reports = preflight.local_store(), {0: report}
        preflight.check_alone(report)
    else:
        addr, port = dist.set_rendezvous_address(ranks, env)
        t0 = time.monotonic()
        store = preflight.open_store(report, addr, port, timeout, env)
        reports = preflight.rendezvous(report, store, timeout, env)
        log.info("preflight: all %d ranks reported in %.1f s", ranks.world_size, time.monotonic() - t0)
    # 4x the rendezvous wait: on hundreds of GPUs the first all-reduce includes NCCL's communicator setup
    with preflight.deadline(preflight.COLLECTIVE_FACTOR * timeout,
                            f"rank {ranks.rank}: starting the {backend} process group and one all-reduce over {ranks.world_size} ranks "
                            "(check GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME and firewalls between the nodes)"):
        dist.init_process_group(ranks, device, backend, store)
        all_reduce_ms = preflight.check_all_reduce(ranks.rank, ranks.world_size, device)
    if ranks.rank == 0:
        log.info("%s", preflight.summary(reports, backend, all_reduce_ms))
    if precision != cfg.train.precision:
        log.info("precision %s (%s)", precision, why)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    return RunContext(cfg=cfg, ranks=ranks, device=device, backend=backend, vocab=vocab, memory_baseline=memory.rss_bytes())
