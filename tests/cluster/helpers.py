"""Helpers for the cluster launch tests: start launch scripts, find and kill one rank, drive a private SLURM cluster.

Everything here talks to 127.0.0.1 only (or to the loopback of a namespace the test made with ``unshare -n``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bert_ds.cluster.dist import discover_ranks

REPO = Path(__file__).resolve().parents[2]
CLUSTER = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
TERMINAL_JOB_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout:.0f} s")


# -- processes -----------------------------------------------------------------------------------


def start(cmd: list[str], log: Path, env: dict, cwd: Path = REPO) -> subprocess.Popen:
    """Start a launch script in its own session (so a test can always clean up the whole tree)."""
    out = open(log, "ab")  # noqa: SIM115 - closed with the process by finish()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_file = out  # type: ignore[attr-defined]
    proc.log_path = log  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Exit status of a started launch script; on timeout its whole session is killed and TimeoutError raised."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        raise TimeoutError(f"{proc.args} still running after {timeout:.0f} s; killed. Log: {proc.log_path}") from None
    finally:
        proc.log_file.close()


def kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # the process is gone or not ours
        return None


def rank_processes(marker: str) -> dict[int, int]:
    """{rank: pid} of the bert-ds rank processes whose command line contains ``marker`` (e.g. the config path).

    A rank is a python process running ``-m bert_ds.*`` or ``launch/train.py`` (not a DeepSpeed launcher);
    its rank comes from the variables its launcher gave it, read by bert_ds.cluster.dist itself. DataLoader workers
    (children of a rank with the same command line) are skipped.
    """
    found: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        cmdline = _read(f"/proc/{entry}/cmdline")
        if not cmdline or marker.encode() not in cmdline:
            continue
        argv = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
        if not os.path.basename(argv[0]).startswith("python"):  # mpirun, srun, pdsh, ssh, bash wrappers
            continue
        is_rank = any(a == "-m" and b.startswith("bert_ds.") for a, b in zip(argv, argv[1:], strict=False)) or any(a.endswith("launch/train.py") for a in argv)
        if not is_rank or any("deepspeed" in a for a in argv[:3]):
            continue
        environ = _read(f"/proc/{entry}/environ") or b""
        env = dict(kv.split("=", 1) for kv in environ.decode(errors="replace").split("\0") if "=" in kv)
        stat = _read(f"/proc/{entry}/stat") or b""
        ppid = int(stat.rsplit(b")", 1)[-1].split()[1]) if stat else 0
        found[int(entry)] = (discover_ranks(env).rank, ppid)
    return {rank: pid for pid, (rank, ppid) in found.items() if ppid not in found}


def kill_rank(marker: str, rank: int) -> int:
    pid = wait_for(lambda: rank_processes(marker).get(rank), timeout=60, interval=0.05, what=f"rank {rank} process")
    os.kill(pid, signal.SIGKILL)
    return pid


def kill_leftovers(marker: str) -> list[int]:
    """SIGKILL rank processes still alive for ``marker``; returns their pids (a test asserts there are none)."""
    pids = list(rank_processes(marker).values())
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


# -- SLURM ------------------------------------------------------------------------------------------


class Slurm:
    """Client side of the private cluster made by tests/cluster/slurm_up.sh."""

    def __init__(self, directory: Path, env: dict):
        self.dir = directory
        self.env = {**env, "SLURM_CONF": str(directory / "slurm.conf")}

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc.stdout

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(map(str, args))} failed: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job -o`` as dicts (one per array task)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def state(self, job_id: str) -> str:
        states = {j.get("JobState", "?") for j in self.jobs(job_id)}
        return states.pop() if len(states) == 1 else ",".join(sorted(states))

    def wait(self, job_id: str, timeout: float, states: set[str] = TERMINAL_JOB_STATES) -> str:
        def done():
            jobs = self.jobs(job_id)
            return bool(jobs) and all(j.get("JobState") in states for j in jobs) and jobs[0]["JobState"]

        try:
            return wait_for(done, timeout, interval=0.25, what=f"job {job_id} in {sorted(states)}")
        except TimeoutError:
            self.run("scancel", job_id, check=False)
            raise
