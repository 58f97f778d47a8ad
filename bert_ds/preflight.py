"""``python -m bert_ds.preflight``: check a job before it trains (the checks are in ``bert_ds.cluster.preflight``).

    deepspeed --hostfile HOSTFILE --master_addr NODE --module bert_ds.preflight CONFIG.yaml   # on the ranks
    python -m bert_ds.preflight --hostfile HOSTFILE --ssh                                     # on the launch node
"""

from __future__ import annotations

import argparse
import sys

from bert_ds.cluster import preflight
from bert_ds.cluster.hostfile import HostfileError, host_name_problem, read_hostfile


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bert_ds.preflight", description=preflight.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="run config (YAML) the job will use; run under the job's launcher")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for bert_ds.train")
    p.add_argument("--hostfile", help="launch-node mode: check this hostfile instead of running on ranks")
    p.add_argument("--ssh", action="store_true", help="with --hostfile: every host must resolve and accept a non-interactive ssh login")
    p.add_argument("--node-rank", type=int, help="with --hostfile: this node's --node_rank (no-ssh mode)")
    p.add_argument("--master-addr", help="with --hostfile: the rendezvous address, which must resolve here")
    args, extra = p.parse_known_args(argv)
    if args.hostfile:
        # the rendezvous address becomes a launcher argument on every host: a host name or an address, never an option
        addr_problem = host_name_problem(args.master_addr) if args.master_addr is not None else None
        try:
            problems = [f"MASTER_ADDR: {addr_problem}"] if addr_problem else []
            problems += preflight.check_hostfile(args.hostfile, ssh=args.ssh, node_rank=args.node_rank,
                                                 master_addr=None if addr_problem else args.master_addr)
        except HostfileError as e:
            problems = [str(e)]
        if problems:
            sys.stderr.write("preflight: cannot launch with this hostfile:\n" + "".join(f"  {m}\n" for m in problems))
            raise SystemExit(2)
        entries = read_hostfile(args.hostfile)
        sys.stderr.write(f"preflight: {args.hostfile}: {len(entries)} hosts, {sum(e.slots for e in entries)} ranks "
                         f"({', '.join(f'{e.host}:{e.slots}' for e in entries)}){' reachable over ssh' if args.ssh else ''}\n")
        return
    if not args.config:
        p.error("give a run config (on the ranks) or --hostfile (on the launch node)")
    from bert_ds import checkpoint, resume, startup
    from bert_ds.cluster import dist
    from bert_ds.config import ConfigError, load_run_config, split_command_line

    config_path, overrides = split_command_line([args.config, *args.overrides, *extra], __doc__)  # drops the launcher's --local_rank
    try:
        ctx = startup.start(load_run_config(config_path, overrides))
        # the checkpoint the run would resume: vocabulary, ZeRO stage, and its global batch on this many ranks
        resume.plan_resume(ctx.cfg, ctx.world_size, ctx.vocab.sha256)
    except (ConfigError, checkpoint.CheckpointError, preflight.PreflightError, dist.DistributedSetupError) as e:
        raise SystemExit(f"preflight failed: {e}") from None
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
