"""Pretrain BERT (MLM + NSP) with DeepSpeed.

    python -m bert_ds.train CONFIG.yaml [key=value ...]                         # one process
    deepspeed --num_gpus N --module bert_ds.train CONFIG.yaml [key=value ...]   # N ranks on this node

Overrides use the config's dotted keys, e.g. ``train.zero_stage=2 optimizer.lr=1e-3``.
``python -m bert_ds CONFIG.yaml ...`` is the same command.
"""

from __future__ import annotations

import sys

from bert_ds.config import ConfigError, load_run_config, split_command_line


def main(argv: list[str] | None = None) -> None:
    config_path, overrides = split_command_line(sys.argv[1:] if argv is None else argv, __doc__)
    try:
        cfg = load_run_config(config_path, overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    # imported after the config is read: a typo in it fails before torch and DeepSpeed load
    from bert_ds import trainer
    from bert_ds.checkpoint import CheckpointError
    from bert_ds.cluster import dist
    from bert_ds.cluster.preflight import PreflightError

    try:
        trainer.train(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except PreflightError as e:
        raise SystemExit(f"preflight failed: {e}") from None
    except dist.DistributedSetupError as e:
        raise SystemExit(f"distributed setup error: {e}") from None
    except CheckpointError as e:
        raise SystemExit(f"checkpoint error: {e}") from None
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
