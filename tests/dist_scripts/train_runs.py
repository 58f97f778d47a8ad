"""Train several runs one after another in one launch, each exactly as ``python -m bert_ds.train`` would.

Launched by the tests under any launcher (``deepspeed --num_gpus 2``, or plain ``python`` for one process);
by hand, from the repository root:

    env OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo PYTHONPATH=. .venv/bin/deepspeed --num_gpus 2 \\
        --master_addr 127.0.0.1 --master_port 29513 tests/dist_scripts/train_runs.py \\
        --run a.yaml --run b.yaml train.max_steps=5

``--results FILE`` writes what each ``trainer.train`` returned (its ``TrainResult``: final state, the checkpoint it
resumed or started from, last metrics), so tests assert on returned state rather than on log lines.

Why: a launch costs ~25 s on a 2-core machine (the launcher and every rank import torch, DeepSpeed and
transformers, and tear them down again), a 30-step run of a test model ~3 s. Each run still gets its own
``bert_ds.trainer.train`` call: its own preflight, engine, data, checkpoints and TensorBoard directory.
A run that resumes is never in the same launch as the run that wrote its checkpoint (tests launch it
through ``bert_ds.train``), so resuming always crosses a process boundary, as it does for users.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch

from bert_ds import trainer
from bert_ds.cluster import dist
from bert_ds.config import load_run_config

log = logging.getLogger("bert_ds")


def record_rng_at_first_step(out_dir: Path, runs_done: list) -> None:
    """Save this rank's global RNG states when each run takes its first step (``trainer.train_step``'s first call)."""
    import random

    import numpy as np

    step, recorded = trainer.train_step, set()

    def recording(*args, **kwargs):
        run = len(runs_done)
        if run not in recorded:
            recorded.add(run)
            out_dir.mkdir(parents=True, exist_ok=True)
            states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
            torch.save(states, out_dir / f"run{run}_rank{torch.distributed.get_rank()}.pt")
        return step(*args, **kwargs)

    trainer.train_step = recording  # train() looks the step up in its module at every call


RECORDED_SETTINGS = ("lr", "betas", "eps", "weight_decay", "bias_correction", "max_trust_ratio")


def record_optimizer_steps(steps: list) -> None:
    """Append, at every optimizer step of any run, the settings each param group steps with (``steps[-1]`` is the current run's)."""

    def hook(optimizer, args, kwargs):
        steps[-1].append([{k: group[k] for k in RECORDED_SETTINGS if k in group} for group in optimizer.param_groups])

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(hook)


def capture_engines(engines: list) -> None:
    """Keep each run's engine (``trainer.build_engine``'s result) so its state can be read after the run."""
    build = trainer.build_engine

    def capturing(*args, **kwargs):
        engines.append(build(*args, **kwargs))
        return engines[-1]

    trainer.build_engine = capturing  # train() looks it up in its module at every call


OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def full_state(engine) -> dict:
    """The whole fp32 weights and optimizer moments by parameter name, and the step counts (collective: all ranks call).

    Under ZeRO each rank's flat partitions are cut into parameter slices with the layouts LAMB uses
    (``bert_ds.zero.partitions``, cross-checked against DeepSpeed's own bookkeeping) and summed over the ranks.
    """
    from bert_ds.zero.partitions import partition_layouts

    optimizer = engine.basic_optimizer
    names = {id(p): name for name, p in engine.module.named_parameters()}
    params: dict[str, dict[str, torch.Tensor]] = {}
    if engine.zero_optimization_stage() == 0:  # whole parameters in the client optimizer
        for p, name in ((p, names[id(p)]) for group in optimizer.param_groups for p in group["params"]):
            state = optimizer.state[p]
            params[name] = {"fp32": p.detach().float().clone(), **{k: state[k].clone() for k in OPTIMIZER_STATE_KEYS}}
        steps = [float(optimizer.state[p]["step"]) for group in optimizer.param_groups for p in group["params"]]
        return {"params": params, "steps": steps}
    wrapper = engine.optimizer
    groups = wrapper.fp16_groups if engine.zero_optimization_stage() == 3 else wrapper.round_robin_bit16_groups
    for (flat, layout), group_params in zip(partition_layouts(wrapper), groups, strict=True):
        sources = {"fp32": flat, **{k: optimizer.state[flat][k] for k in OPTIMIZER_STATE_KEYS}}
        for index, p in enumerate(group_params):
            numel = getattr(p, "ds_numel", p.numel())
            entry = params.setdefault(names[id(p)], {})
            for key, source in sources.items():
                full = torch.zeros(numel, dtype=torch.float32)
                for seg in (s for s in layout.segments if s.param_index == index):
                    full[seg.param_start : seg.param_start + seg.length] = source[seg.start : seg.start + seg.length]
                torch.distributed.all_reduce(full)  # each element is held by exactly one rank
                entry[key] = full
    # ZeRO 3 hands the optimizer one sub-group at a time (param_groups are emptied between steps): read the flats' states
    steps = [float(optimizer.state[flat]["step"]) for flat, _ in partition_layouts(wrapper)]
    return {"params": params, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", nargs="+", required=True, metavar=("CONFIG", "KEY=VALUE"),
                        help="a run config and its overrides; repeat for more runs")
    parser.add_argument("--results", type=Path, help="write every run's TrainResult here as JSON (rank 0; a list in --run order)")
    parser.add_argument("--record-rng", type=Path, help="save each rank's RNG states at each run's first step here (run{i}_rank{r}.pt)")
    parser.add_argument("--record-optimizer", action="store_true", help="add each run's per-step param-group settings to --results")
    parser.add_argument("--local_rank", type=int, default=0, help="(appended by the deepspeed launcher; rank comes from the environment)")
    parser.add_argument("--record-state", type=Path, help="save each run's final fp32 weights, moments and step counts here (run{i}.pt, rank 0)")
    args = parser.parse_args()
    engines: list = []
    if args.record_state:
        capture_engines(engines)
    linear = torch.nn.functional.linear
    results = []
    if args.record_rng:
        record_rng_at_first_step(args.record_rng, results)
    steps: list[list] = []
    if args.record_optimizer:
        record_optimizer_steps(steps)
    try:
        for config, *overrides in args.run:
            steps.append([])
            result = trainer.train(load_run_config(config, overrides))
            results.append({**dataclasses.asdict(result), "run_dir": str(result.run_dir), "optimizer_steps": steps[-1]})
            if args.record_state:
                state = full_state(engines[-1])
                if torch.distributed.get_rank() == 0:
                    args.record_state.mkdir(parents=True, exist_ok=True)
                    torch.save(state, args.record_state / f"run{len(results) - 1}.pt")
                engines.clear()
            if args.results and torch.distributed.get_rank() == 0:
                args.results.write_text(json.dumps(results, indent=2))
            # a run must leave the process as it found it, or the runs after it are not the runs a user gets
            if torch.nn.functional.linear is not linear:
                raise RuntimeError(f"{config} left torch.nn.functional.linear patched ({torch.nn.functional.linear!r})")
            log.info("train_runs: finished %s %s", config, " ".join(overrides))
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
