"""Pretrain BERT (MLM + NSP) with DeepSpeed.

    python -m bert_ds.train CONFIG.yaml [key=value ...]                     # one process
    deepspeed --num_gpus N --module bert_ds.train CONFIG.yaml [key=value ...]   # N ranks on this node

Overrides use the config's dotted keys, e.g. ``train.zero_stage=2 optimizer.lr=1e-3``.
"""

from __future__ import annotations

import re
import sys

from bert_ds.config import ConfigError, load_run_config


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """CONFIG plus overrides; drops the ``--local_rank=N`` the deepspeed launcher appends (we read LOCAL_RANK)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if re.fullmatch(r"--local[_-]rank=\d+", a):
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        args.append(a)
    if not args or args[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    return args[0], args[1:]


def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_run_config(config_path, overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    from bert_ds import dist, trainer
    from bert_ds.preflight import PreflightError

    try:
        trainer.train(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except PreflightError as e:
        raise SystemExit(f"preflight failed: {e}") from None
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
