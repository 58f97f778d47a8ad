"""Hostfiles (``HOSTNAME slots=N``, the format of DeepSpeed, Open MPI and MVAPICH): parse strictly, generate
from a SLURM node list, and check that the hosts resolve and answer over ssh before anything is launched.

Format, one host per line; ``#`` starts a comment, blank lines are ignored::

    # two nodes with 8 GPUs each: 16 ranks, ranks 0-7 on node001, 8-15 on node002
    node001 slots=8
    node002 slots=8

``slots`` is the number of ranks started on that host: one per GPU. Ranks are numbered in file order,
so the first host runs rank 0 and is where the rendezvous (MASTER_ADDR) normally lives.

DeepSpeed's own parser accepts trailing garbage after ``slots=N`` (``node1 slots=8 gpus=4``) and
falls back to *local-only training* when the hostfile path does not exist; :func:`read_hostfile`
rejects both, with the line number. A host must be a host name (letters, digits, ``-``, ``_``
and dots, not starting with ``-``) or an IP address: host names end up as ssh and pdsh arguments,
where ``-oProxyCommand=...`` would be an option and ``node[1-4]`` or ``^file`` a host list.

Generating one inside an allocation::

    python -m bert_ds.hostfile from-slurm --slots 8 > hostfile       # node list from SLURM_JOB_NODELIST
    python -m bert_ds.hostfile from-slurm --nodelist 'gpu[001-004]' --slots 8

This module imports neither torch nor deepspeed: launch scripts call it before any rank starts.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HostEntry",
    "HostfileError",
    "check_hosts",
    "expand_nodelist",
    "expand_tasks_per_node",
    "format_hostfile",
    "from_slurm",
    "host_name_problem",
    "parse_hostfile",
    "read_hostfile",
]


class HostfileError(ValueError):
    """A hostfile that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class HostEntry:
    host: str
    slots: int
    line: int  # 1-based line number in the file it came from (0: generated)


# DNS labels (underscores allowed: /etc/hosts and cluster naming schemes use them), dot-separated
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def host_name_problem(host: str) -> str | None:
    """Why ``host`` is not a host name or an IP address (None: it is one)."""
    if _HOST_NAME.fullmatch(host) and len(host) <= 253:
        return None
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if host.startswith("-"):
        return f"{host!r} is not a host name (it starts with '-': ssh and pdsh would take it as an option)"
    return f"{host!r} is not a host name (letters, digits, '-', '_' and dots; or an IP address)"


def parse_hostfile(text: str, source: str = "hostfile") -> list[HostEntry]:
    """Entries in file order. Errors name ``source`` and the line: every line must be ``HOST slots=N``."""
    entries: list[HostEntry] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{source} line {number}"
        if len(fields) != 2 or not fields[1].startswith("slots="):
            raise HostfileError(f"{where}: expected 'HOSTNAME slots=N', got {raw.strip()!r}")
        host, slots_text = fields[0], fields[1][len("slots="):]
        problem = host_name_problem(host)
        if problem:
            raise HostfileError(f"{where}: {problem}")
        if not slots_text.isdigit() or int(slots_text) < 1:
            raise HostfileError(f"{where}: slots must be a whole number >= 1 (ranks on {host}, one per GPU), got {slots_text!r}")
        if host in seen:
            raise HostfileError(
                f"{where}: {host} is already listed on line {seen[host]}; DeepSpeed refuses duplicate hosts: "
                "give each host one line with its total slots"
            )
        seen[host] = number
        entries.append(HostEntry(host, int(slots_text), number))
    if not entries:
        raise HostfileError(f"{source}: no hosts (expected lines like 'node001 slots=8')")
    return entries


def read_hostfile(path: str | os.PathLike) -> list[HostEntry]:
    p = Path(path)
    if not p.is_file():
        # DeepSpeed only warns here and silently trains on the local node alone
        raise HostfileError(f"hostfile {p} does not exist (DeepSpeed would quietly fall back to training on this node only)")
    return parse_hostfile(p.read_text(), str(p))


def format_hostfile(entries: Sequence[HostEntry]) -> str:
    return "".join(f"{e.host} slots={e.slots}\n" for e in entries)


# -- SLURM node lists --------------------------------------------------------------------------


def _expand_brackets(pattern: str) -> list[str]:
    """``gpu[01-03,7]-ib`` -> gpu01-ib gpu02-ib gpu03-ib gpu7-ib; several bracket groups multiply out."""
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    names = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise HostfileError(f"bad range {part!r} in SLURM node list {pattern!r}")
        width = len(lo)  # zero padding is kept: n[08-10] -> n08 n09 n10
        for i in range(int(lo), int(hi or lo) + 1):
            names.extend(_expand_brackets(f"{head}{i:0{width}d}{tail}"))
    return names


def expand_nodelist(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list (``scontrol show hostnames`` without needing scontrol)."""
    hosts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            item = nodelist[start:i].strip()
            if item:
                hosts.extend(_expand_brackets(item))
            start = i + 1
        if depth < 0:
            break
    if depth != 0:
        raise HostfileError(f"unbalanced brackets in SLURM node list {nodelist!r}")
    if not hosts:
        raise HostfileError("empty SLURM node list")
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise HostfileError(f"cannot read SLURM tasks-per-node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def from_slurm(nodelist: str, slots: int) -> list[HostEntry]:
    if slots < 1:
        raise HostfileError(f"--slots must be >= 1 (ranks per node, one per GPU), got {slots}")
    hosts = expand_nodelist(nodelist)
    for h in hosts:
        problem = host_name_problem(h)
        if problem:
            raise HostfileError(f"SLURM node list {nodelist!r}: {problem}")
    return [HostEntry(h, slots, 0) for h in hosts]


# -- reachability ------------------------------------------------------------------------------


def _ssh_base(env: Mapping[str, str]) -> list[str]:
    # the same options pdsh gives ssh: DeepSpeed's own pre-check ignores PDSH_SSH_ARGS_APPEND
    return ["ssh", *shlex.split(env.get("PDSH_SSH_ARGS_APPEND", ""))]


def ssh_target_address(host: str, env: Mapping[str, str]) -> str:
    """The HostName ssh would connect to for ``host`` (ssh config aliases applied; no connection made)."""
    try:
        # "--": a host is never an option (the parser already refuses names starting with "-")
        out = subprocess.run([*_ssh_base(env), "-G", "--", host], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return host
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key == "hostname":
            return value.strip()
    return host


def _resolve(name: str) -> str | None:
    """None if ``name`` resolves, else the resolver's reason."""
    try:
        socket.getaddrinfo(name, None)
        return None
    except OSError as e:
        return getattr(e, "strerror", None) or str(e)


def check_hosts(entries: Sequence[HostEntry], source: str, *, ssh: bool, env: Mapping[str, str] | None = None,
                connect_timeout_s: int = 5) -> list[str]:
    """Problems with the hosts of a hostfile (empty list: all fine).

    Every host must resolve (after ssh config aliases, when ``ssh``); with ``ssh`` it must also
    accept a non-interactive login (``BatchMode``), as pdsh needs.
    """
    env = os.environ if env is None else env
    problems = []
    for e in entries:
        target = ssh_target_address(e.host, env) if ssh else e.host
        reason = _resolve(target)
        if reason:
            alias = f" (ssh config HostName {target})" if target != e.host else ""
            problems.append(f"{source} line {e.line}: host {e.host}{alias} does not resolve: {reason}")
            continue
        if ssh:
            cmd = [*_ssh_base(env), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout_s}", "--", e.host, "true"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=connect_timeout_s + 10)
                failed = proc.returncode != 0
                detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            except subprocess.TimeoutExpired:
                failed, detail = True, f"no answer within {connect_timeout_s + 10} s"
            if failed:
                problems.append(
                    f"{source} line {e.line}: host {e.host} is not reachable over ssh ({detail}); "
                    "the launcher needs passwordless ssh to every host (or use the --no_ssh mode: launch/hostfile_no_ssh.sh)"
                )
    return problems


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bert_ds.hostfile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("from-slurm", help="write a hostfile for the SLURM allocation (or --nodelist) to stdout")
    gen.add_argument("--nodelist", default=None, help="SLURM node list, e.g. 'gpu[001-004]' (default: $SLURM_JOB_NODELIST)")
    gen.add_argument("--slots", type=int, required=True, help="ranks per node (one per GPU)")
    show = sub.add_parser("check", help="parse a hostfile and print its hosts (exit 2 on a malformed file)")
    show.add_argument("hostfile")
    args = p.parse_args(argv)
    try:
        if args.command == "from-slurm":
            nodelist = args.nodelist or os.environ.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise HostfileError("no --nodelist and SLURM_JOB_NODELIST is not set (run inside an allocation or pass --nodelist)")
            sys.stdout.write(format_hostfile(from_slurm(nodelist, args.slots)))
        else:
            entries = read_hostfile(args.hostfile)
            sys.stdout.write(format_hostfile(entries))
    except HostfileError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
