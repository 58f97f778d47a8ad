"""DeepSpeed's JIT-compiled ops, built once per TORCH_EXTENSIONS_DIR and never left half-built behind a lock.

On CPU, ``deepspeed.init_distributed`` compiles a shared-memory comm op (about a minute when the cache is
cold); on CUDA, FusedLamb/FusedAdam compile the same way unless DeepSpeed was installed with prebuilt ops.
torch guards each build with a lock *file* that it creates and deletes itself: a process killed mid-build
(a test timeout, a SIGKILLed rank, ``scancel``) leaves that file behind, and every later process on the
machine then waits on it forever, printing nothing. We build under an ``flock`` instead, which the kernel
releases when its holder dies, so a torch lock file found while we hold the flock belongs to a dead
builder and is removed (with a warning naming it). Ops loaded here are cached in the process, so
DeepSpeed's own later load of the same op does not touch the lock again.

``python -m bert_ds.jit_ops`` builds the comm op (``make test`` and ``make demo`` run it
first, so the first training job does not spend its start-up deadline compiling).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

FLOCK_NAME = "bert_ds_build.flock"


def build_directory(op_name: str) -> Path:
    """Where torch builds an extension called ``op_name`` (honours TORCH_EXTENSIONS_DIR)."""
    # torch has no public name for this; the private helper is the one its build uses, so it cannot disagree
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(op_name, verbose=False))


def _held_open_by_a_live_process(path: Path) -> bool:
    """Whether some process on this machine has ``path`` open (torch keeps its lock file open while building)."""
    target = str(path.resolve())
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == target:
                        return True
                except OSError:
                    continue
        except OSError:  # the process ended, or is not ours to look at
            continue
    return False


def remove_stale_torch_lock(build_dir: Path) -> bool:
    """Remove torch's build lock in ``build_dir`` if no live process holds it; call only while holding the flock."""
    lock = build_dir / "lock"
    if not lock.exists() or _held_open_by_a_live_process(lock):
        return False
    age = time.time() - lock.stat().st_mtime
    log.warning("removing %s: a stale torch build lock (%.0f s old) left by a build that was killed; "
                "without this every DeepSpeed start on this machine would wait on it forever", lock, age)
    lock.unlink(missing_ok=True)
    return True


def load_op(builder):
    """``builder.load()`` under an flock in its build directory, after clearing a dead builder's lock file."""
    build_dir = build_directory(builder.name)
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / FLOCK_NAME, "a") as flock_file:
        try:
            fcntl.flock(flock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building DeepSpeed op %s in %s", builder.name, build_dir)
            fcntl.flock(flock_file, fcntl.LOCK_EX)
        remove_stale_torch_lock(build_dir)
        started = time.monotonic()
        module = builder.load()
        took = time.monotonic() - started
        if took > 5:
            log.info("built DeepSpeed op %s in %.0f s (cached in %s)", builder.name, took, build_dir)
        return module


def _compatible_builder(name: str):
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def prebuild_comm_op() -> bool:
    """Build (or load) the CPU shared-memory comm op ``deepspeed.init_distributed`` loads.

    Returns False where the accelerator has none (CUDA: NCCL needs no build).
    """
    try:
        builder = _compatible_builder("ShareMemCommBuilder")
    except ImportError:
        return False
    if builder is None:
        return False
    load_op(builder)
    return True


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m bert_ds.jit_ops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    built = prebuild_comm_op()
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "torch's default extensions cache")
    if built:
        log.info("DeepSpeed comm op ready in %s (%.0f s)", where, time.monotonic() - started)
    else:
        log.info("no DeepSpeed comm op to build for this accelerator")


if __name__ == "__main__":
    main()
