"""Start DeepSpeed's per-node launcher on every host of a hostfile over pdsh, with a remote command built here.

    python -m bert_ds.cluster.pdsh --hostfile HOSTFILE --master-addr NODE [--master-port 29500] \\
        [--forward-env "NAME ..."] --module -- bert_ds.train CONFIG.yaml [key=value ...]

Everything after ``--`` is the module (or script) and its arguments, handed to every rank word for word.

(``launch/hostfile_pdsh.sh`` runs it.) ``deepspeed --launcher pdsh`` builds the remote shell command itself and
quotes only the arguments that contain a space, with double quotes: a working directory or an override with a space,
a quote or ``$(...)`` broke the command or ran on every host, and its exports (``export K="V"``) and ``cd PATH`` were
not quoted either. Here every word of the remote command is quoted for a POSIX shell (``shlex.quote``), and ``%``
(pdsh's own substitution: ``%n`` is the node's rank, ``%h`` its name) is doubled, so the remote shell runs exactly::

    export NAME='value' ...; cd '/the/working dir' && exec '/path/to/python' -X bert_ds_launch=ID -u \\
        -m deepspeed.launcher.launch --world_info=... --node_rank=%n --master_addr=... --master_port=... \\
        --module 'bert_ds.train' 'CONFIG.yaml' 'key=value' ...

which is what DeepSpeed's runner means to run (same world info, node rank, environment: the variables it exports by
prefix, ``NCCL*``, ``PYTHON*``, ``UCX*``, ``MV2*``, ``MLFLOW*``, and those named in ``FORWARD_ENV``; values are passed
literally, never expanded). DeepSpeed's ``.deepspeed_env`` file is not read (its values were expanded by the remote
shell): name the variables in ``FORWARD_ENV`` instead; one that exists is reported. Hosts must be host names (the
hostfile parser refuses anything else, such as ``-oProxyCommand=...``), and so must the rendezvous address. The remote
login shell must be a POSIX shell (DeepSpeed's command needs one too).

``-X bert_ds_launch=ID`` (an option Python ignores) marks this launch's processes: on SIGINT or SIGTERM this process
stops pdsh and runs ``pkill -f`` for that mark on every host (DeepSpeed's runner kills every DeepSpeed launcher of
that Python there), whose ranks then stop with it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from bert_ds.cluster.hostfile import HostEntry, HostfileError, host_name_problem, read_hostfile

PDSH_FAN_OUT = 1024  # DeepSpeed's PDSH_MAX_FAN_OUT: every host at once
# variables DeepSpeed's runner hands to the remote launchers by prefix (runner.EXPORT_ENVS + the CUDA accelerator's)
EXPORT_PREFIXES = ("NCCL", "PYTHON", "MV2", "UCX", "MLFLOW")
DEEPSPEED_ENV_FILES = (Path.home() / ".deepspeed_env", Path(".deepspeed_env"))  # DeepSpeed reads these; this launcher does not
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LaunchError(ValueError):
    """The launch cannot be built safely; the message names the input and the fix."""


def world_info(entries: Sequence[HostEntry]) -> str:
    """DeepSpeed's ``--world_info``: base64 of ``{host: [slot, ...]}`` in hostfile order (``runner.encode_world_info``)."""
    return base64.urlsafe_b64encode(json.dumps({e.host: list(range(e.slots)) for e in entries}).encode("utf-8")).decode("utf-8")


def exported_environment(env: Mapping[str, str], forward: Sequence[str], cwd: str) -> dict[str, str]:
    """The variables the remote launchers get: DeepSpeed's prefixes and ``forward``; PYTHONPATH starts with ``cwd``."""
    out = {}
    for name, value in env.items():
        if name.startswith(EXPORT_PREFIXES):
            if not _NAME.fullmatch(name):
                raise LaunchError(f"the environment variable {name!r} is not a name a shell can export; unset it")
            out[name] = value
    for name in forward:
        if not _NAME.fullmatch(name):
            raise LaunchError(f"FORWARD_ENV: {name!r} is not a variable name")
        if name in env:
            out[name] = env[name]
    # DeepSpeed's runner puts the working directory first, so `--module` finds the code the launch node runs
    out["PYTHONPATH"] = cwd + (f":{env['PYTHONPATH']}" if env.get("PYTHONPATH") else "")
    return out


def _pdsh_word(word: str) -> str:
    """A word for the remote shell, with pdsh's ``%`` substitution switched off."""
    return shlex.quote(word).replace("%", "%%")


def remote_command(*, python: str, cwd: str, exports: Mapping[str, str], launch_id: str, world: str, master_addr: str,
                   master_port: int, module: bool, script: str, args: Sequence[str]) -> str:
    """The one string pdsh hands each host's shell; only ``%n`` (the node rank) is left for pdsh to fill in."""
    parts = []
    if exports:
        parts.append("export " + " ".join(f"{name}={_pdsh_word(value)}" for name, value in exports.items()) + ";")
    parts += ["cd", _pdsh_word(cwd), "&&", "exec", _pdsh_word(python), "-X", f"bert_ds_launch={launch_id}", "-u", "-m",
              "deepspeed.launcher.launch", _pdsh_word(f"--world_info={world}"), "--node_rank=%n",
              _pdsh_word(f"--master_addr={master_addr}"), _pdsh_word(f"--master_port={master_port}")]
    if module:
        parts.append("--module")
    parts += [_pdsh_word(a) for a in [script, *args]]
    return " ".join(parts)


def kill_command(launch_id: str) -> str:
    # the bracket keeps the pattern from matching the shell that runs this very command
    return f"pkill -TERM -f -- 'bert_ds_launc[h]={launch_id}'"


def pdsh_command(hosts: Sequence[str], remote: str) -> list[str]:
    return ["pdsh", "-S", "-f", str(PDSH_FAN_OUT), "-w", ",".join(hosts), remote]


def check_hosts_for_pdsh(entries: Sequence[HostEntry], source: str, master_addr: str) -> None:
    """What pdsh adds to the hostfile parser's rules (host names only), and the rendezvous address."""
    for e in entries:
        if ":" in e.host or "%" in e.host:
            raise LaunchError(f"{source} line {e.line}: {e.host}: pdsh cannot take an IPv6 address (it reads 'x:host' as an rcmd "
                              "type); give the host a name (/etc/hosts or ~/.ssh/config)")
    problem = host_name_problem(master_addr)
    if problem:
        raise LaunchError(f"MASTER_ADDR: {problem}")


def run(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    p = argparse.ArgumentParser(prog="python -m bert_ds.cluster.pdsh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hostfile", required=True)
    p.add_argument("--master-addr", required=True, help="the rendezvous address (the first host, as the ranks reach it)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--forward-env", default="", help="names of more variables to hand to the ranks, separated by spaces")
    p.add_argument("--module", action="store_true", help="the command after -- starts with a module (python -m), not a script")
    p.usage = f"{p.prog} --hostfile HOSTFILE --master-addr ADDR [--master-port PORT] [--forward-env NAMES] [--module] -- SCRIPT [ARGS ...]"
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        p.error("give the module or script every rank runs, and its arguments, after --")
    script, args = command[0], command[1:]
    try:
        entries = read_hostfile(a.hostfile)
        check_hosts_for_pdsh(entries, a.hostfile, a.master_addr)
        if not 0 < a.master_port < 65536:
            raise LaunchError(f"MASTER_PORT: {a.master_port} is not a TCP port")
        cwd = os.path.abspath(".")
        launch_id = secrets.token_hex(8)
        remote = remote_command(
            python=sys.executable, cwd=cwd, exports=exported_environment(env, a.forward_env.split(), cwd), launch_id=launch_id,
            world=world_info(entries), master_addr=a.master_addr, master_port=a.master_port, module=a.module, script=script, args=args,
        )
    except (HostfileError, LaunchError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    for path in DEEPSPEED_ENV_FILES:
        if path.is_file():
            sys.stderr.write(f"note: {path} is not read by this launcher (DeepSpeed's expanded its values in the remote shell): "
                             "export the variables and name them in FORWARD_ENV\n")
    hosts = [e.host for e in entries]
    env["PDSH_RCMD_TYPE"] = "ssh"
    sys.stderr.write(f"pdsh launch {launch_id} on {len(hosts)} hosts ({', '.join(hosts)}), rendezvous {a.master_addr}:{a.master_port}\n")
    proc = subprocess.Popen(pdsh_command(hosts, remote), env=env)

    def stop(signum, frame) -> None:
        # as DeepSpeed's runner: stop pdsh, then end this launch's launchers on every host (their ranks end with them)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        subprocess.run(pdsh_command(hosts, kill_command(launch_id)), env=env, check=False)
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = proc.wait()  # pdsh -S: the largest exit status of the remote commands
    return code if code >= 0 else 128 - code


def main(argv: Sequence[str] | None = None) -> None:
    raise SystemExit(run(argv))


if __name__ == "__main__":
    main()
