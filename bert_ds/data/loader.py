"""Batches for one rank: which global samples it reads (``RankBatchSampler``), how they are stacked (``collate``).

Rank ``r`` of ``world_size`` reads global positions ``consumed + r, consumed + r + w, ...``, so
ranks are disjoint and together cover the sequence; resuming from ``consumed_samples = step *
global_batch_size`` restarts each rank exactly where it was. Samples themselves are pure functions
of their global index (``bert_ds.data.pretraining``), so nothing else needs saving.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bert_ds.config import RunConfig
from bert_ds.data.run_datasets import train_dataset
from bert_ds.data.vocab import Vocab


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch; shapes stay fixed (no trimming of padding).

    All fields are views of one int64 buffer: a worker hands a batch to the main process
    as one shared-memory segment instead of five, which halves the transfer cost.
    """
    batch_size = len(samples)
    shapes = {key: (batch_size, *value.shape) for key, value in samples[0].items()}
    buffer = torch.empty(sum(math.prod(shape) for shape in shapes.values()), dtype=torch.int64)
    batch, offset = {}, 0
    for key, shape in shapes.items():
        size = math.prod(shape)
        view = buffer[offset : offset + size].view(shape)
        torch.stack([s[key] for s in samples], out=view)
        batch[key] = view
        offset += size
    return batch


class RankBatchSampler(Sampler[list[int]]):
    """Micro-batches of global sample indices for one rank: ``start + rank + world_size * t``.

    Endless (the dataset rolls epochs over) unless ``max_samples`` is given.
    """

    def __init__(self, micro_batch_size: int, rank: int, world_size: int, consumed_samples: int, max_samples: int | None = None) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}: must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}")
        if consumed_samples < 0 or consumed_samples % world_size:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of world_size={world_size} "
                "(it counts samples over all ranks: steps * global batch size)"
            )
        if max_samples is not None and max_samples % (micro_batch_size * world_size):
            raise ValueError(
                f"max_samples={max_samples} must be a multiple of micro_batch_size * world_size = {micro_batch_size * world_size}"
            )
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.consumed_samples = consumed_samples
        self.max_samples = max_samples

    def __len__(self) -> int:
        if self.max_samples is None:
            raise TypeError("an endless sampler has no length; pass max_samples for a finite one")
        return self.max_samples // (self.micro_batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        stride = self.micro_batch_size * self.world_size
        position = self.consumed_samples + self.rank
        end = None if self.max_samples is None else self.consumed_samples + self.max_samples
        while end is None or position < end:
            yield list(range(position, position + stride, self.world_size))
            position += stride


@functools.cache
def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers start from a fresh forkserver process, never forked from a rank.

    A forked worker would inherit the rank's memory (a whole model before ZeRO-3 partitions it, pages it then
    touches and copies) and its open sockets (the rendezvous store's listener). The forkserver is a new
    interpreter that has imported only this module's dependencies (preloaded, so a worker starts in
    milliseconds); the dataset reaches a worker pickled, its shards re-opened as memory maps.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bert_ds.data.loader"])
    return context


def _end_with_the_rank(rank_pid: int, worker_id: int) -> None:
    """``worker_init_fn``: the worker exits as soon as the rank that reads it is gone, however the rank ended.

    Why our own: torch's worker watchdog exits when the worker's parent changes, but a forkserver worker's parent
    is the forkserver, and the forkserver lives on while any of its clients, this worker included, holds its
    liveness pipe. So a SIGKILLed rank left its forkserver and workers running for good (seen after every killed
    run). The worker waits on a pidfd of the rank (readable once the rank has exited; polling its pid where
    ``pidfd_open`` is missing); with the workers gone, the forkserver and its resource tracker exit by themselves.
    """
    try:
        pidfd = os.pidfd_open(rank_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3, other systems): poll
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while _alive(rank_pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="rank-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def build_dataloader(
    dataset: Dataset,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    consumed_samples: int,
    num_workers: int,
    seed: int,
    *,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    pin_memory: bool = False,
    max_samples: int | None = None,
) -> DataLoader:
    """A loader over this rank's samples, starting at global position ``consumed_samples``.

    Args:
        dataset: the samples; every rank passes an identically built dataset.
        micro_batch_size: samples per batch on this rank.
        rank: this data-parallel rank.
        world_size: number of data-parallel ranks.
        consumed_samples: samples consumed so far by all ranks together (steps * global batch).
        num_workers: worker processes; the batches do not depend on it.
        seed: base seed of the workers' own torch/numpy generators (the samples do not use
            them: they are seeded from ``dataset.seed``), fixed so nothing else can vary.
        persistent_workers: keep workers alive across ``iter()`` calls.
        prefetch_factor: batches prefetched per worker (torch default when None).
        pin_memory: pin batches for faster host-to-GPU copies.
        max_samples: stop after this many samples over all ranks; None = endless.
    """
    sampler = RankBatchSampler(micro_batch_size, rank, world_size, consumed_samples, max_samples)
    return DataLoader(
        dataset,
        multiprocessing_context=_worker_context() if num_workers > 0 else None,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=functools.partial(_end_with_the_rank, os.getpid()) if num_workers > 0 else None,
    )


def train_loader(cfg: RunConfig, vocab: Vocab, rank: int, world_size: int, consumed_samples: int) -> DataLoader:
    """This rank's endless loader over the run's training samples, from global position ``consumed_samples``."""
    return build_dataloader(train_dataset(cfg, vocab), cfg.train.micro_batch_size, rank, world_size, consumed_samples,
                            cfg.data.num_workers, cfg.seed)
