"""Train one run exactly as ``python -m bert_ds.train CONFIG`` does, counting the start-up work this process does.

    deepspeed --num_gpus 2 --master_addr 127.0.0.1 tests/dist_scripts/count_startup.py OUT_DIR CONFIG [key=value ...]

Every call of the watched functions is counted with a profile hook (``sys.setprofile``), so a call is
seen however the code reaches the function: an import under another name, a second module calling it,
a method. Each rank writes ``OUT_DIR/rank{R}.json``: {what: number of calls}.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter
from pathlib import Path


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher puts it first
    out_dir, argv = Path(args[0]), args[1:]
    from bert_ds import precision, startup, train
    from bert_ds.cluster import dist, jit_ops
    from bert_ds.data import vocab

    watched = {
        dist.discover_ranks.__code__: "rank discovery",
        dist.select_device.__code__: "device selection",
        precision.has_fast_bf16.__code__: "precision resolution",
        vocab.vocab_sha256.__code__: "vocabulary hash",
        vocab.resolve_vocab.__code__: "vocabulary resolution",
        jit_ops.prebuild_comm_op.__code__: "JIT op build",
        startup.configure_logging.__code__: "logging setup",
        dist.init_process_group.__code__: "process group start",
    }
    counts: Counter = Counter()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            counts[watched[frame.f_code]] += 1

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        train.main(argv)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts.update(dict.fromkeys(watched.values(), 0))  # a step that never ran shows as 0, not missing
    (out_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({k: v for k, v in counts.items()}))


if __name__ == "__main__":
    main()
