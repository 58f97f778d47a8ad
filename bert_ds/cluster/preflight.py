"""Preflight: prove that every rank is there and sees the same world before training starts.

Run it on its own under any launcher, with the run config the job will use (rank 0 prints one
table and "preflight OK"; on a problem every rank that is alive exits with the same message)::

    deepspeed --hostfile hostfiles/example_2x8 --master_addr node001 --module bert_ds.preflight CONFIG.yaml
    srun python -m bert_ds.preflight CONFIG.yaml          # (MODULE=bert_ds.preflight with any launch/ script)

or before launching, on the launch node, to check a hostfile (exit status 2 on a problem)::

    python -m bert_ds.preflight --hostfile hostfiles/example_2x8 --ssh        # parse, resolve, ssh to every host

The trainer runs the same checks as part of its one start-up (``bert_ds.startup.start``), which
decides ranks, device, precision and vocabulary once and hands them here to be compared:

1. **Rendezvous with a deadline.** Rank 0 opens the job's TCPStore on MASTER_ADDR:MASTER_PORT, listening
   on that address only (loopback for a single-node run; the process group then reuses this store, so
   nothing else listens) and every rank posts a report: host,
   node, rank, local rank, device, versions of Python/torch/DeepSpeed/transformers/bert-ds, the
   size of every data shard it sees, and the vocabulary's SHA-256. Rank 0 waits at most
   ``BERT_DS_PREFLIGHT_TIMEOUT`` seconds (default 30) and then names the missing ranks and the
   hosts they were expected on, instead of letting ``init_process_group`` wait 10 minutes.
2. **Consistency.** Versions, shard sizes and vocabulary must match rank 0's; a node must not run
   more ranks than it has GPUs; a multi-node gloo job must not rely on a host name that resolves to
   loopback. Every rank raises the same :class:`PreflightError`.
3. **One all-reduce** on the training backend: starting the process group and the all-reduce must finish within
   4x ``BERT_DS_PREFLIGHT_TIMEOUT`` (2 minutes by default; on hundreds of GPUs this includes NCCL's
   communicator setup). A data plane that cannot connect (wrong GLOO_SOCKET_IFNAME /
   NCCL_SOCKET_IFNAME, a firewall) ends the process with a message instead of a hang.

Raise ``BERT_DS_PREFLIGHT_TIMEOUT`` where ranks start far apart (slow shared file systems,
container pulls on hundreds of nodes): it is the longest gap allowed between the first and the
last rank reaching the rendezvous.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path

from bert_ds.cluster.dist import RankInfo, discover_node, expected_rank_hosts
from bert_ds.cluster.hostfile import check_hosts, read_hostfile

log = logging.getLogger("bert_ds.preflight")

TIMEOUT_ENV = "BERT_DS_PREFLIGHT_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
COLLECTIVE_FACTOR = 4  # the process group and the first all-reduce get this many times the rendezvous wait
_KEY = "bert_ds/preflight"
_VERSIONED = ("torch", "deepspeed", "transformers", "bert-ds")


class PreflightError(RuntimeError):
    """The job cannot start: a rank is missing or sees a different world; the message says which and where."""


def timeout_s(env: Mapping[str, str]) -> float:
    value = env.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise PreflightError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None


# -- what one rank sees ------------------------------------------------------------------------


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _shard_sizes(prefixes: list[str]) -> dict[str, dict[str, int | None]]:
    sizes = {}
    for prefix in prefixes:
        sizes[prefix] = {}
        for ext in ("bin", "idx"):
            p = Path(f"{prefix}.{ext}")
            sizes[prefix][ext] = p.stat().st_size if p.is_file() else None
    return sizes


def _loopback_hostname(env: Mapping[str, str]) -> str | None:
    """The loopback address the host name resolves to, when gloo would pick its address that way."""
    if env.get("GLOO_SOCKET_IFNAME"):
        return None
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
    return addr if addr.startswith("127.") else None


def local_report(ranks: RankInfo, env: Mapping[str, str], *, device: str, device_error: str | None, backend: str, precision: str,
                 cuda_devices: int, vocab: Mapping[str, object], shard_prefixes: list[str]) -> dict:
    """Everything rank 0 compares, as plain JSON-able values; the start-up decided device, precision and vocabulary."""
    import torch

    hostname = socket.gethostname()
    node = discover_node(ranks, env, hostname)
    return {
        "rank": ranks.rank,
        "world_size": ranks.world_size,
        "local_rank": ranks.local_rank,
        "source": ranks.source,
        "host": hostname,
        "node": node.name,
        "node_rank": node.node_rank,
        "local_world_size": node.local_world_size,
        "pid": os.getpid(),
        "device": device,
        "device_error": device_error,
        "backend": backend,
        "precision": precision,
        "cuda_devices": cuda_devices,
        "versions": {"python": sys.version.split()[0], **{name: _version(name) for name in _VERSIONED}, "torch_build": torch.__version__},
        "shards": _shard_sizes(shard_prefixes),
        "vocab": dict(vocab),
        "gloo_socket_ifname": env.get("GLOO_SOCKET_IFNAME", ""),
        "loopback_hostname": _loopback_hostname(env),
    }


# -- what rank 0 concludes (pure) --------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _where(r: dict) -> str:
    node = r["node"] if r["node"] == r["host"] else f"{r['node']} ({r['host']})"
    return f"rank {r['rank']} on {node}"


def _node_key(r: dict) -> tuple:
    return (r["node"], r["node_rank"])


def find_problems(reports: Mapping[int, dict]) -> tuple[list[str], list[str]]:
    """(errors, warnings) comparing every rank's report with rank 0's."""
    errors: list[str] = []
    warnings: list[str] = []
    ref = reports[min(reports)]
    for rank in sorted(reports):
        r = reports[rank]
        if r["device_error"]:
            errors.append(f"{_where(r)}: {r['device_error']}")
        for name in ("python", "torch_build", "deepspeed", "transformers", "bert-ds"):
            if r["versions"][name] != ref["versions"][name]:
                errors.append(f"{_where(r)}: {name} {r['versions'][name]}, but {_where(ref)} has {ref['versions'][name]}")
        if not r["device_error"] and not ref["device_error"] and r["precision"] != ref["precision"]:
            errors.append(f"{_where(r)}: train.precision {r['precision']}, but {_where(ref)} trains in {ref['precision']} "
                          "(train.precision auto on mixed hardware: set it explicitly)")
        if "error" in r["vocab"]:
            errors.append(f"{_where(r)}: vocabulary: {r['vocab']['error']}")
        elif "sha256" in ref["vocab"] and r["vocab"]["sha256"] != ref["vocab"]["sha256"]:
            errors.append(
                f"{_where(r)}: vocabulary {r['vocab']['path']} (sha256 {r['vocab']['sha256'][:12]}) differs from "
                f"{_where(ref)}'s {ref['vocab']['path']} (sha256 {ref['vocab']['sha256'][:12]})"
            )
        for prefix, sizes in r["shards"].items():
            for ext, size in sizes.items():
                want = ref["shards"].get(prefix, {}).get(ext)
                if size is None:
                    errors.append(f"{_where(r)}: cannot see {prefix}.{ext} (not on this host's file system?)")
                elif want is not None and size != want:
                    errors.append(f"{_where(r)}: {prefix}.{ext} is {size:,} bytes, but {_where(ref)} sees {want:,} (a different or partial copy)")
    # several ranks per node: compare with the node's GPUs
    by_node: dict[tuple, list[dict]] = {}
    for r in reports.values():
        by_node.setdefault(_node_key(r), []).append(r)
    for ranks in by_node.values():
        first = min(ranks, key=lambda r: r["rank"])
        gpus = first["cuda_devices"]
        if gpus and len(ranks) > gpus:
            errors.append(
                f"node {first['node']} runs {len(ranks)} ranks but has {gpus} GPUs: set its slots (hostfile), "
                f"--num_gpus or --ntasks-per-node to {gpus}"
            )
        elif gpus and len(ranks) < gpus and first["backend"] == "nccl":
            warnings.append(f"node {first['node']} runs {_count(len(ranks), 'rank')} on {gpus} GPUs: {_count(gpus - len(ranks), 'GPU')} stay idle")
    if len(by_node) > 1:
        for r in sorted(reports.values(), key=lambda r: r["rank"]):
            if r["backend"] == "gloo" and r["loopback_hostname"]:
                errors.append(
                    f"{_where(r)}: GLOO_SOCKET_IFNAME is not set and the host name {r['host']} resolves to "
                    f"{r['loopback_hostname']} (loopback), so ranks on other nodes cannot reach this one; "
                    "export GLOO_SOCKET_IFNAME=<the network interface between the nodes>"
                )
    return errors, warnings


def missing_ranks_message(missing: list[int], reports: Mapping[int, dict], world_size: int, timeout: float, env: Mapping[str, str]) -> str:
    hosts = expected_rank_hosts(env)
    expected = [f"rank {r}" + (f" (expected on {hosts[r]})" if hosts and r < len(hosts) else "") for r in missing]
    present = ", ".join(_where(reports[r]) for r in sorted(reports))
    return (
        f"{len(missing)} of {world_size} ranks did not reach the rendezvous at {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')} "
        f"within {timeout:.0f} s: {', '.join(expected)}. They died before the rendezvous, were never started, or cannot reach "
        f"that address from their host: look at the launcher's output on those hosts. Reported: {present}. "
        f"({TIMEOUT_ENV} sets the wait)"
    )


def format_table(reports: Mapping[int, dict]) -> str:
    cols = ["rank", "node", "host", "local", "device", "python", "torch", "deepspeed", "transformers", "bert-ds", "vocab", "shards (bytes)"]
    rows = []
    for rank in sorted(reports):
        r = reports[rank]
        shards = sum(size or 0 for sizes in r["shards"].values() for size in sizes.values())
        v = r["versions"]
        rows.append([
            str(rank), r["node"], r["host"], str(r["local_rank"]), r["device"], v["python"], v["torch_build"], v["deepspeed"],
            v["transformers"], v["bert-ds"], r["vocab"].get("sha256", "ERROR")[:12], f"{shards:,}",
        ])  # fmt: skip
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


# -- the checks on live ranks ------------------------------------------------------------------


# How many preflights this process has run. The store outlives a run (torch.distributed keeps it), so a
# second ``trainer.train`` in the same processes (a sweep, a notebook, the tests' train_runs.py) must not
# read the first one's reports and verdict: every rank counts its calls alike, so they share a fresh prefix.
_rendezvous_count = itertools.count()
_stores: dict[tuple[str, int], object] = {}


def local_store():
    """A single process's store: in memory (it has no other rank to meet), so nothing listens on the network."""
    from torch.distributed import HashStore

    return HashStore()


def open_store(report: dict, addr: str, port: int, timeout: float, env: Mapping[str, str]):
    """The job's rendezvous store (all ranks): rank 0 serves it on a socket bound to MASTER_ADDR only, the others connect.

    The process group reuses it (``dist.init_process_group(store=...)``), so nothing else listens. Raises
    :class:`PreflightError` naming the address, the host and the likely cause when it cannot be opened or reached.
    """
    if (addr, port) in _stores:  # a second run in the same processes: the process group still holds this store
        return _stores[(addr, port)]
    _stores[(addr, port)] = store = _connect(report, addr, port, timeout, env)
    return store


def _connect(report: dict, addr: str, port: int, timeout: float, env: Mapping[str, str]):
    from torch.distributed import TCPStore

    from bert_ds.cluster.dist import DistributedSetupError, listening_socket

    rank, world = report["rank"], report["world_size"]
    local = report["local_world_size"]
    if rank == 0:
        try:
            sock = listening_socket(addr, port, multi_node=None if local is None else local < world)
        except DistributedSetupError as e:
            raise PreflightError(f"{_where(report)}: cannot open the rendezvous: {e}") from None
        # the store serves on this socket for the rest of the process (it keeps the descriptor)
        return TCPStore(addr, port, world, True, timedelta(seconds=timeout), wait_for_workers=False, master_listen_fd=sock.detach(),
                        use_libuv=True)
    hosts = expected_rank_hosts(env)
    try:
        # rank 0 may start up to `timeout` after us
        return TCPStore(addr, port, world, False, timedelta(seconds=timeout), wait_for_workers=False)
    except Exception as e:  # DistNetworkError / RuntimeError, depending on the torch version
        master = f" (rank 0's host: {hosts[0]})" if hosts else ""
        raise PreflightError(
            f"{_where(report)}: could not reach the rendezvous at {addr}:{port}{master} within {timeout:.0f} s: rank 0 was never started "
            f"or died before the rendezvous, or MASTER_ADDR/MASTER_PORT is wrong or blocked from this host ({str(e).splitlines()[0]})"
        ) from None


def rendezvous(report: dict, store, timeout: float, env: Mapping[str, str]) -> dict[int, dict]:
    """Post this rank's report; rank 0 collects all of them and posts a verdict. Returns the reports (rank 0; {} elsewhere).

    Raises :class:`PreflightError`, with the same verdict on every rank that is alive, when a rank is
    missing or the reports disagree.
    """
    rank, world = report["rank"], report["world_size"]
    key = f"{_KEY}/{next(_rendezvous_count)}"
    store.set(f"{key}/report/{rank}", json.dumps(report))
    if rank != 0:
        try:
            # rank 0 may start up to `timeout` after us, then waits up to `timeout` for the others
            store.wait([f"{key}/verdict"], timedelta(seconds=2 * timeout + 10))
            verdict = store.get(f"{key}/verdict").decode()
            store.add(f"{key}/acks", 1)
        except Exception as e:
            raise PreflightError(f"{_where(report)}: lost rank 0 before its verdict ({str(e).splitlines()[0]}): see rank 0's output") from None
        if verdict != "ok":
            raise PreflightError(verdict)
        return {}
    wait_until = time.monotonic() + timeout
    while True:
        missing = [r for r in range(world) if not store.check([f"{key}/report/{r}"])]
        if not missing or time.monotonic() > wait_until:
            break
        time.sleep(0.1)
    reports = {r: json.loads(store.get(f"{key}/report/{r}")) for r in range(world) if r not in missing}
    if missing:
        verdict = missing_ranks_message(missing, reports, world, timeout, env)
    else:
        errors, warnings = find_problems(reports)
        for w in warnings:
            log.warning("preflight: %s", w)
        verdict = "\n".join(errors)
        if errors:
            log.error("preflight: the ranks disagree:\n%s", format_table(reports))
    store.set(f"{key}/verdict", verdict or "ok")
    if verdict:
        # let the ranks that are there read the verdict before this store goes away
        ack_deadline = time.monotonic() + 5
        while int(store.add(f"{key}/acks", 0)) < len(reports) - 1 and time.monotonic() < ack_deadline:
            time.sleep(0.1)
        raise PreflightError(verdict)
    return reports


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Exit the process (status 1) with a message if the block takes longer than ``seconds``.

    A rank blocked in a collective cannot be interrupted from Python; exiting lets the launcher
    (deepspeed, srun --kill-on-bad-exit, mpirun) stop the rest of the job.
    """
    def expire() -> None:
        log.critical("preflight: %s did not finish within %.0f s; exiting", what, seconds)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def check_alone(report: dict) -> None:
    """The checks of a single-process run: its own report against itself (a device it cannot have, ...)."""
    errors, warnings = find_problems({report["rank"]: report})
    for w in warnings:
        log.warning("preflight: %s", w)
    if errors:
        raise PreflightError("\n".join(errors))


def check_all_reduce(rank: int, world_size: int, device) -> float:
    """One all-reduce of rank+1 over all ranks; returns its milliseconds. Raises PreflightError on a wrong sum."""
    import torch
    import torch.distributed as tdist

    t0 = time.monotonic()
    x = torch.full((1,), float(rank + 1), device=device)
    if tdist.is_initialized():
        tdist.all_reduce(x)
    got, want = float(x.item()), world_size * (world_size + 1) / 2  # .item(): a device-to-host sync
    if got != want:
        raise PreflightError(f"rank {rank}: all-reduce of rank+1 over {world_size} ranks gave {got}, expected {want}")
    return 1000 * (time.monotonic() - t0)


def summary(reports: Mapping[int, dict], backend: str, all_reduce_ms: float) -> str:
    nodes = len({_node_key(r) for r in reports.values()})
    return f"preflight OK: {_count(len(reports), 'rank')} on {_count(nodes, 'node')}, {backend} all-reduce {all_reduce_ms:.1f} ms\n{format_table(reports)}"


# -- command line ------------------------------------------------------------------------------


def check_hostfile(path: str, *, ssh: bool, node_rank: int | None = None, master_addr: str | None = None,
                   env: Mapping[str, str] | None = None) -> list[str]:
    """Launcher-side problems with a hostfile (empty: fine). Raises HostfileError for a malformed file."""
    env = os.environ if env is None else env
    entries = read_hostfile(path)
    problems = []
    if node_rank is not None and not 0 <= node_rank < len(entries):
        problems.append(f"node rank {node_rank} is outside [0, {len(entries)}): {path} lists {len(entries)} hosts")
    if master_addr:
        try:
            socket.getaddrinfo(master_addr, None)
        except OSError as e:
            problems.append(f"MASTER_ADDR {master_addr} does not resolve: {e.strerror or e}")
    if ssh:
        problems += check_hosts(entries, path, ssh=True, env=env)
    return problems
