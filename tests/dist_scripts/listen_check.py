"""After the start-up, on every rank: which local addresses listen on MASTER_PORT, and whether a data-loader worker holds
a socket that listens there. Each rank writes ``OUT_DIR/rank{R}.json``.

    deepspeed --num_gpus 2 --master_addr 127.0.0.1 tests/dist_scripts/listen_check.py OUT_DIR CONFIG
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path


def listeners(port: int) -> dict[int, str]:
    """socket inode -> local address of every socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr_hex, port_hex = fields[1].split(":")
            if int(port_hex, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found[int(fields[9])] = str(ipaddress.ip_address(packed)) if width == 8 else str(ipaddress.IPv6Address(packed))
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_dir, config = Path(args[0]), args[1]
    from bert_ds import startup
    from bert_ds.cluster import dist
    from bert_ds.config import load_run_config
    from bert_ds.data.loader import train_loader

    ctx = startup.start(load_run_config(config))
    listening = listeners(int(os.environ["MASTER_PORT"]))
    loader = train_loader(ctx.cfg, ctx.vocab, ctx.rank, ctx.world_size, 0)
    batches = iter(loader)
    next(batches)
    workers = [w.pid for w in batches._workers]
    held = sorted({listening[i] for pid in workers for i in socket_inodes(pid) if i in listening})
    out_dir.mkdir(parents=True, exist_ok=True)
    shm = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{os.environ['MASTER_PORT']}_*"))
    result = {"listening": sorted(set(listening.values())), "workers": len(workers), "workers_holding_the_listener": held,
              "shared_memory_names": shm}
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(result))
    del batches
    dist.shutdown()


if __name__ == "__main__":
    main()
