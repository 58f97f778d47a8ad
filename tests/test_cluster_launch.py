"""Every launch path in launch/ run for real on one machine, each a 2-rank bert-ds training job:

* ``launch/single_node.sh`` (deepspeed --num_gpus 2): the uninterrupted reference run;
* ``launch/hostfile_no_ssh.sh`` (two launchers, --node_rank 0/1) and ``launch/hostfile_pdsh.sh`` (pdsh over ssh to
  a private sshd on 127.0.0.1) with a two-host hostfile;
* ``launch/mpirun.sh`` (Open MPI from Debian, mpirun -np 2) and ``launch/deepspeed_openmpi.sh``;
* a private SLURM cluster (munged + slurmctld + two slurmd "nodes" n1, n2) running ``launch/slurm/*.sbatch``:
  srun across both nodes, a requeued job (also one requeued onto one node after a node failure), DeepSpeed's
  launcher inside an allocation, and a preprocessing job array with a dependent merge.

For every launcher, SIGKILL of one rank after the first checkpoint ends the whole job with a non-zero status
within 60 s, and the next launch (``checkpoint.resume: auto``) continues from the newest complete checkpoint
and ends on exactly the reference run's final loss (fp32; the resume is bit-exact). The preflight turns a rank
that died before the rendezvous, or a hostfile host that does not resolve or answer, into a clear error.

Network: only 127.0.0.1, or the loopback of a network namespace made here (``unshare -n``). The Debian
packages are installed by tests/cluster/install_packages.sh when missing; a test whose package cannot be
installed is skipped with a loud reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from bert_ds.checkpoint import COMPLETE_MARKER, latest_complete_tag, tag_for_step
from bert_ds.cluster.dist import free_port
from tests.cluster.helpers import CLUSTER, REPO, Slurm, finish, kill_leftovers, kill_rank, kill_session, rank_processes, start, wait_for
from tests.conftest import dist_env, tensorboard_scalars, write_run_config

pytestmark = pytest.mark.slow

STEPS, INTERVAL = 48, 8  # a checkpoint every 8 steps: the kill lands after the first one, with 40 steps to spare
KILL_DEADLINE_S = 60  # the whole job must be gone this long after one rank is SIGKILLed
LAUNCH_TIMEOUT_S = 300
TOOLS = {"slurm": ["slurmctld", "slurmd", "sbatch", "munged"], "mpi": ["mpirun"], "ssh": ["sshd", "ssh", "pdsh"], "netns": ["unshare", "ip"]}


def _have(tool: str) -> bool:
    return shutil.which(tool) is not None or os.access(f"/usr/sbin/{tool}", os.X_OK)


@pytest.fixture(scope="module")
def tools(request) -> dict[str, bool]:
    """Install the Debian packages that are missing; say loudly which launch paths cannot be tested."""
    proc = subprocess.run(["bash", str(CLUSTER / "install_packages.sh")], capture_output=True, text=True, timeout=900)
    available = {group: all(_have(t) for t in names) for group, names in TOOLS.items()}
    # a network namespace needs root (CAP_SYS_ADMIN), not only the binaries
    available["netns"] = available["netns"] and subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0
    missing = [group for group, ok in available.items() if not ok]
    if missing:
        banner = (f"!!! CLUSTER TESTS: the Debian packages for {missing} could not be installed: those launch paths are NOT tested "
                  f"(their tests are skipped). install_packages.sh said: {(proc.stdout + proc.stderr).strip()[-1500:]}")
        terminal = request.config.pluginmanager.getplugin("terminalreporter")
        if terminal is not None:
            terminal.write_line("\n" + "!" * 100 + "\n" + banner + "\n" + "!" * 100, red=True, bold=True)
        warnings.warn(banner, stacklevel=1)
    return available


def _need(tools: dict[str, bool], group: str) -> None:
    if not tools[group]:
        pytest.skip(f"!!! NOT TESTED: the Debian packages for {group} ({', '.join(TOOLS[group])}) could not be installed")


def _env(**extra: str) -> dict:
    """Environment of a launch: loopback only, one thread per rank, this venv's python and deepspeed."""
    return {**os.environ, **dist_env(), "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", **extra}


def _config(d: Path, shards: dict) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    config = write_run_config(
        d / "run.yaml", shards, d / "run",
        data={"num_workers": 0},  # no DataLoader worker processes: a killed rank leaves nothing behind to wait for
        train={"max_steps": STEPS, "micro_batch_size": 8, "zero_stage": 2, "precision": "fp32", "log_interval": 1},
        scheduler={"name": "linear", "warmup_steps": 4, "total_steps": STEPS},
        checkpoint={"interval_steps": INTERVAL, "keep_last": 2}, eval={"interval_steps": 0, "num_samples": 32},
    )  # fmt: skip
    return config, d / "run"


def _losses(run_dir: Path) -> dict[int, float]:
    return dict(tensorboard_scalars(run_dir / "tensorboard")["train/loss"])


def _logs(d: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(d.glob("*.log")) + sorted(d.glob("*.out")))


def _assert_final_checkpoint(run_dir: Path) -> None:
    marker = json.loads((run_dir / "checkpoints" / tag_for_step(STEPS) / COMPLETE_MARKER).read_text())
    assert marker["world_size"] == 2 and marker["step"] == STEPS, marker
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for_step(STEPS)


def _first_checkpoint_or_exit(run_dir: Path, alive) -> None:
    first = run_dir / "checkpoints" / tag_for_step(INTERVAL) / COMPLETE_MARKER
    wait_for(lambda: first.exists() or not alive(), LAUNCH_TIMEOUT_S, what=f"{first}")
    assert first.exists(), "the job ended before its first checkpoint"


def _assert_resumed_to_the_reference(run_dir: Path, log: str, tag: str, reference: dict) -> None:
    step = int(tag[len("step"):])
    assert f"resumed from {run_dir / 'checkpoints'}/{tag} at step {step}" in log, log[-3000:]
    _assert_final_checkpoint(run_dir)
    losses = _losses(run_dir)
    # bit-identical to the uninterrupted run from the resume point on, final loss included
    assert [losses[s] for s in range(step + 1, STEPS + 1)] == [reference["losses"][s] for s in range(step + 1, STEPS + 1)]


def _assert_no_rank_left(config: Path) -> None:
    """No rank process of this run survives its launcher. (A killed rank's DataLoader worker notices its
    parent is gone within 5 s, torch's check interval, so give it that long.)"""
    try:
        wait_for(lambda: not rank_processes(str(config)), timeout=15, interval=0.5)
    except TimeoutError:
        raise AssertionError(f"rank processes outlived their launcher: {kill_leftovers(str(config))}") from None


def _kill_one_rank_then_resume(d: Path, shards: dict, reference: dict, launch) -> dict:
    """``launch(config, log_dir) -> [Popen]``; kill rank 1 after the first checkpoint, time the job's end, relaunch."""
    config, run_dir = _config(d, shards)
    procs = launch(config, d / "attempt1")
    try:
        _first_checkpoint_or_exit(run_dir, lambda: all(p.poll() is None for p in procs))
        kill_rank(str(config), 1)
        killed_at = time.monotonic()
        codes = [finish(p, KILL_DEADLINE_S + 30) for p in procs]
        took = time.monotonic() - killed_at
        _assert_no_rank_left(config)
    finally:
        for p in procs:
            kill_session(p)
    log1 = _logs(d / "attempt1")
    print(f"\n{d.name}: the job exited {took:.1f} s after rank 1 was killed, codes {codes}")  # shown with -s
    assert took < KILL_DEADLINE_S and all(c != 0 for c in codes), (took, codes, log1[-3000:])
    tag = latest_complete_tag(run_dir / "checkpoints")
    assert tag is not None and INTERVAL <= int(tag[len("step"):]) < STEPS, tag

    procs = launch(config, d / "attempt2")
    codes = [finish(p, LAUNCH_TIMEOUT_S) for p in procs]
    log2 = _logs(d / "attempt2")
    assert codes == [0] * len(procs), log2[-5000:]
    _assert_resumed_to_the_reference(run_dir, log2, tag, reference)
    return {"exit_after_kill_s": took, "resumed_from": tag}


# -- one node: the reference ---------------------------------------------------------------------


def _single_node(config: Path, logs: Path) -> list[subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    env = _env(NUM_GPUS="2", MASTER_PORT=str(free_port()))
    return [start(["bash", str(REPO / "launch/single_node.sh"), str(config)], logs / "single_node.log", env)]


@pytest.fixture(scope="module")
def reference(pretraining_shards, tmp_path_factory) -> dict:
    """The uninterrupted 2-rank run every other launcher must reproduce (launch/single_node.sh)."""
    d = tmp_path_factory.mktemp("reference")
    config, run_dir = _config(d, pretraining_shards)
    [proc] = _single_node(config, d)
    code = finish(proc, LAUNCH_TIMEOUT_S)
    assert code == 0, _logs(d)[-5000:]
    return {"run_dir": run_dir, "losses": _losses(run_dir), "log": _logs(d)}


def test_single_node_script_trains_two_ranks_to_the_final_checkpoint_after_a_preflight(reference):
    _assert_final_checkpoint(reference["run_dir"])
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))
    assert "preflight OK: 2 ranks" in reference["log"], reference["log"][-3000:]


def test_single_process_script_runs_the_preflight_alone(pretraining_shards, tmp_path):
    config, run_dir = _config(tmp_path, pretraining_shards)
    env = _env(MODULE="bert_ds.preflight")
    proc = subprocess.run(["bash", str(REPO / "launch/single_process.sh"), str(config)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preflight OK: 1 rank on 1 node" in proc.stderr and "rank  node  host  local  device  python  torch" in proc.stderr
    assert not run_dir.exists()  # checked, not trained


def test_single_node_kill_one_rank_ends_the_job_and_the_next_launch_resumes(pretraining_shards, reference, tmp_path):
    _kill_one_rank_then_resume(tmp_path, pretraining_shards, reference, _single_node)


# -- hostfile: --no_ssh and pdsh over ssh --------------------------------------------------------


def _hostfile(d: Path, *lines: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / "hostfile"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _no_ssh(config: Path, logs: Path, extra_env: dict | None = None) -> list[subprocess.Popen]:
    hostfile = _hostfile(logs, "node1 slots=1", "node2 slots=1")  # labels only: --no_ssh never contacts them
    port = str(free_port())
    return [
        start(["bash", str(REPO / "launch/hostfile_no_ssh.sh"), str(config)], logs / f"node{r}.log",
              _env(HOSTFILE=str(hostfile), NODE_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(extra_env or {})))
        for r in (0, 1)
    ]  # fmt: skip


def test_hostfile_no_ssh_kill_one_rank_ends_both_nodes_and_the_next_launch_resumes(pretraining_shards, reference, tmp_path):
    _kill_one_rank_then_resume(tmp_path, pretraining_shards, reference, _no_ssh)


@pytest.fixture(scope="module")
def sshd(tools, tmp_path_factory):
    """A private sshd on 127.0.0.1:<free port>; node1 and node2 are aliases for it in its ssh client config."""
    _need(tools, "ssh")
    d = tmp_path_factory.mktemp("ssh")
    env = {**os.environ, "SSH_DIR": str(d), "SSH_PORT": str(free_port())}
    subprocess.run(["bash", str(CLUSTER / "sshd_up.sh")], env=env, check=True, timeout=60)
    yield d
    pid_file = d / "sshd.pid"
    if pid_file.exists():
        subprocess.run(["kill", pid_file.read_text().strip()], check=False)


def test_hostfile_pdsh_over_ssh_kill_one_rank_ends_the_job_and_the_next_launch_resumes(pretraining_shards, reference, sshd, tmp_path):
    def pdsh(config: Path, logs: Path) -> list[subprocess.Popen]:
        hostfile = _hostfile(logs, "node1 slots=1", "node2 slots=1")
        env = _env(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   PDSH_SSH_ARGS_APPEND=f"-F {sshd / 'ssh_config'}")
        return [start(["bash", str(REPO / "launch/hostfile_pdsh.sh"), str(config)], logs / "pdsh.log", env)]

    _kill_one_rank_then_resume(tmp_path, pretraining_shards, reference, pdsh)
    log = _logs(tmp_path / "attempt2")
    assert "reachable over ssh" in log and "node1: " in log and "node2: " in log  # pdsh prefixes each host's lines


# -- MPI -------------------------------------------------------------------------------------------

MPI_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # CI runs as root


def test_mpirun_kill_one_rank_ends_the_job_and_the_next_launch_resumes(pretraining_shards, reference, tools, tmp_path):
    _need(tools, "mpi")

    def mpirun(config: Path, logs: Path) -> list[subprocess.Popen]:
        logs.mkdir(parents=True, exist_ok=True)
        env = _env(NP="2", MASTER_PORT=str(free_port()), MPIRUN_ARGS="--oversubscribe", **MPI_ROOT)
        return [start(["bash", str(REPO / "launch/mpirun.sh"), str(config)], logs / "mpirun.log", env)]

    _kill_one_rank_then_resume(tmp_path, pretraining_shards, reference, mpirun)


def test_deepspeed_openmpi_launcher_kill_one_rank_ends_the_job_and_the_next_launch_resumes(pretraining_shards, reference, tools, tmp_path):
    _need(tools, "mpi")

    def ds_openmpi(config: Path, logs: Path) -> list[subprocess.Popen]:
        hostfile = _hostfile(logs, "localhost slots=2")
        env = _env(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), SOCKET_IFNAME="lo", **MPI_ROOT)
        return [start(["bash", str(REPO / "launch/deepspeed_openmpi.sh"), str(config)], logs / "ds_openmpi.log", env)]

    _kill_one_rank_then_resume(tmp_path, pretraining_shards, reference, ds_openmpi)
    assert "mpirun -n 2 -hostfile" in _logs(tmp_path / "attempt2")


# -- preflight ------------------------------------------------------------------------------------


def test_preflight_names_the_rank_that_died_before_the_rendezvous_within_60s(pretraining_shards, tmp_path):
    config, _ = _config(tmp_path, pretraining_shards)
    t0 = time.monotonic()
    node0, node1 = _no_ssh(config, tmp_path, extra_env={"BERT_DS_PREFLIGHT_TIMEOUT": "10"})  # default 30 s: ~45 s in all here
    try:
        kill_rank(str(config), 1)  # as soon as it exists: seconds before it could reach the rendezvous
        assert finish(node1, 30) != 0
        code = finish(node0, KILL_DEADLINE_S)
        took = time.monotonic() - t0
    finally:
        kill_session(node0)
        kill_session(node1)
    log = (tmp_path / "node0.log").read_text()
    print(f"\n{tmp_path.name}: node 0 exited with {code} {took:.1f} s after the launch")  # shown with -s
    assert code != 0 and took < KILL_DEADLINE_S, (code, took)
    assert "1 of 2 ranks did not reach the rendezvous" in log and "rank 1 (expected on node2)" in log, log[-3000:]
    _assert_no_rank_left(config)


def test_preflight_stops_a_launch_whose_hostfile_host_does_not_resolve_or_answer(pretraining_shards, tools, tmp_path):
    """In a fresh network namespace (loopback only, made here): no name lookup or connection can leave it."""
    _need(tools, "ssh")
    _need(tools, "netns")
    config, _ = _config(tmp_path, pretraining_shards)
    ssh_config = tmp_path / "ssh_config"
    # node1 is this namespace's loopback on a port where nothing listens: a host that is down
    ssh_config.write_text(f"Host node1\n  HostName 127.0.0.1\n  Port {free_port()}\nHost *\n  BatchMode yes\n  StrictHostKeyChecking no\n")
    hostfile = _hostfile(tmp_path, "node1 slots=1", "ghost-node slots=1")
    env = _env(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PDSH_SSH_ARGS_APPEND=f"-F {ssh_config}")
    script = f"ip link set lo up && exec bash {REPO / 'launch/hostfile_pdsh.sh'} {config}"
    t0 = time.monotonic()
    proc = subprocess.run(["unshare", "--net", "bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 2 and took < KILL_DEADLINE_S, (proc.returncode, took, proc.stderr)
    assert f"{hostfile} line 2: host ghost-node does not resolve" in proc.stderr, proc.stderr
    assert f"{hostfile} line 1: host node1 is not reachable over ssh" in proc.stderr and "Connection refused" in proc.stderr, proc.stderr
    assert "cmd = " not in proc.stdout + proc.stderr  # DeepSpeed's launcher never started


# -- SLURM ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tools, tmp_path_factory):
    """A private 2-node SLURM cluster for this module: its own munge key/socket, config, state and ports."""
    _need(tools, "slurm")
    d = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "CLUSTER_DIR": str(d), "CTLD_PORT": str(free_port()), "N1_PORT": str(free_port()), "N2_PORT": str(free_port())}
    up = subprocess.run(["bash", str(CLUSTER / "slurm_up.sh")], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield Slurm(d, _env())
    finally:
        subprocess.run(["bash", str(CLUSTER / "slurm_down.sh")], env=env, timeout=120, check=False)


def _port() -> dict:
    # the scripts' default port, 20000 + job id % 10000, could meet another test cluster's job on this machine
    return {"MASTER_PORT": str(free_port())}


def _slurm_ranks_log(slurm: Slurm, job: str, d: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in d.glob(f"*-{job}.out"))


def test_slurm_srun_sbatch_trains_across_both_nodes_to_the_final_checkpoint(slurm, pretraining_shards, reference, tmp_path):
    config, run_dir = _config(tmp_path, pretraining_shards)
    job = slurm.sbatch(REPO / "launch/slurm/train_srun.sbatch", config, cwd=tmp_path, env=_port())
    state = slurm.wait(job, LAUNCH_TIMEOUT_S)
    log = _slurm_ranks_log(slurm, job, tmp_path)
    assert state == "COMPLETED", log[-5000:]
    assert f"job {job} (restart 0) on n[1-2]: 2 tasks" in log
    # the automatic preflight: one rank on each node, both in rank 0's table
    assert "preflight OK: 2 ranks on 2 nodes" in log
    table = log[log.index("rank  node  host"):].splitlines()
    assert table[1].split()[:2] == ["0", "n1"] and table[2].split()[:2] == ["1", "n2"], table[:3]
    _assert_final_checkpoint(run_dir)
    losses = _losses(run_dir)
    assert losses == reference["losses"]  # every step, bit for bit: srun's ranks are the launcher's ranks
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert [s for s, _ in scalars["train/lr"]] == list(range(1, STEPS + 1)) and "eval/mlm_loss" in scalars


def test_slurm_requeued_job_resumes_from_the_latest_checkpoint_and_reaches_the_uninterrupted_loss(slurm, pretraining_shards, reference, tmp_path):
    config, run_dir = _config(tmp_path, pretraining_shards)
    job = slurm.sbatch(REPO / "launch/slurm/train_srun.sbatch", config, cwd=tmp_path, env=_port())
    _first_checkpoint_or_exit(run_dir, lambda: slurm.state(job) in {"PENDING", "RUNNING"})
    kill_rank(str(config), 1)
    killed_at = time.monotonic()
    state = slurm.wait(job, KILL_DEADLINE_S + 30)
    took = time.monotonic() - killed_at
    print(f"\n{tmp_path.name}: job {job} {state} {took:.1f} s after rank 1 was killed")  # shown with -s
    assert state == "FAILED" and took < KILL_DEADLINE_S, (state, took, _slurm_ranks_log(slurm, job, tmp_path)[-3000:])
    _assert_no_rank_left(config)
    tag = latest_complete_tag(run_dir / "checkpoints")
    assert tag is not None and INTERVAL <= int(tag[len("step"):]) < STEPS, tag
    # the same job again (#SBATCH --requeue): same id, SLURM_RESTART_COUNT=1; it may start once the old job
    # credential has expired (cred_expire=10 in tests/cluster/slurm.conf.in; Slurm's default is 120 s)
    slurm.run("scontrol", "requeue", job)
    state = slurm.wait(job, LAUNCH_TIMEOUT_S, states={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = _slurm_ranks_log(slurm, job, tmp_path)  # --open-mode=append: both runs in one file
    assert state == "COMPLETED", log[-5000:]
    assert f"job {job} (restart 0)" in log and f"job {job} (restart 1)" in log
    _assert_resumed_to_the_reference(run_dir, log, tag, reference)


def test_slurm_job_on_two_nodes_resubmitted_onto_one_node_resumes_and_reaches_its_final_checkpoint(slurm, pretraining_shards, tmp_path):
    """Issue 14: the unchanged sbatch script runs on both nodes; n2's rank dies and the job fails; the same script and
    config submitted again on the one node left (``sbatch --nodes=1``) resumes the 2-rank ZeRO-2 checkpoint on 1 rank,
    through its universal copy, with the same global batch, and reaches its final checkpoint. (The same job requeued
    onto one node: the next test.)"""
    config, run_dir = _config(tmp_path, pretraining_shards)
    job = slurm.sbatch(REPO / "launch/slurm/train_srun.sbatch", config, cwd=tmp_path, env=_port())
    _first_checkpoint_or_exit(run_dir, lambda: slurm.state(job) in {"PENDING", "RUNNING"})
    kill_rank(str(config), 1)  # n2's rank dies: the job fails
    assert slurm.wait(job, KILL_DEADLINE_S + 30) == "FAILED"
    _assert_no_rank_left(config)
    tag = latest_complete_tag(run_dir / "checkpoints")
    assert tag is not None and INTERVAL <= int(tag[len("step"):]) < STEPS, tag
    again = slurm.sbatch("--nodes=1", REPO / "launch/slurm/train_srun.sbatch", config, cwd=tmp_path, env=_port())
    state = slurm.wait(again, LAUNCH_TIMEOUT_S)
    log = _slurm_ranks_log(slurm, again, tmp_path)
    assert state == "COMPLETED", log[-5000:]
    assert f"job {again} (restart 0) on n1: 1 tasks" in log, log[-3000:]
    assert "resuming a 2-rank ZeRO-2 checkpoint on 1 rank: global batch 16 = 8 micro x 2 accumulation x 1" in log
    assert "universal conversion" in log
    resumed_at = int(tag[len("step"):])
    assert f"resumed from {run_dir / 'checkpoints'}/{tag} at step {resumed_at}" in log
    marker = json.loads((run_dir / "checkpoints" / tag_for_step(STEPS) / COMPLETE_MARKER).read_text())
    assert marker["world_size"] == 1 and marker["step"] == STEPS and marker["global_batch_size"] == 16, marker
    # every step after the resume trained and logged (dropout is on here: its per-rank streams start fresh on one
    # rank, so the losses are not compared with the reference's; tests/test_elastic_resume.py does that without dropout)
    assert set(range(resumed_at + 1, STEPS + 1)) <= set(_losses(run_dir))


def test_slurm_job_on_two_nodes_requeued_onto_one_node_after_a_node_failure_resumes_and_reaches_its_final_checkpoint(
    slurm, pretraining_shards, tmp_path
):
    """Issue 14: the same job, not a new one. The unchanged sbatch script runs on n1+n2; n2 goes DOWN (the node
    failure as Slurm sees it), so Slurm requeues the job (#SBATCH --requeue); shrunk while pending
    (``scontrol update JobId=J NumNodes=1 NumCPUs=1 NumTasks=1``) it restarts on n1 alone with the same id,
    SLURM_RESTART_COUNT=1 and the SLURM_NTASKS=2 it was submitted with; the script's srun takes its task count from
    the allocation (1 node x 1 task), resumes the 2-rank ZeRO-2 checkpoint on 1 rank and reaches the final one."""
    config, run_dir = _config(tmp_path, pretraining_shards)
    job = slurm.sbatch(REPO / "launch/slurm/train_srun.sbatch", config, cwd=tmp_path, env=_port())
    _first_checkpoint_or_exit(run_dir, lambda: slurm.state(job) in {"PENDING", "RUNNING"})

    def requeued() -> bool:
        info = slurm.jobs(job)
        return bool(info) and info[0].get("JobState") == "PENDING" and int(info[0].get("Restarts", 0)) >= 1

    def first_ranks_gone() -> bool:
        return not set(first_ranks.values()) & set(rank_processes(str(config)).values())

    first_ranks = rank_processes(str(config))
    assert sorted(first_ranks) == [0, 1], (first_ranks, _slurm_ranks_log(slurm, job, tmp_path)[-3000:])
    try:
        slurm.run("scontrol", "update", "NodeName=n2", "State=DOWN", "Reason=bert-ds-test-node-failure")
        # requeued by Slurm itself: pending again, with a restart counted (and held for cred_expire, 10 s here)
        wait_for(requeued, 60, interval=0.25, what=f"job {job} requeued after n2 went down")
        slurm.run("scontrol", "update", f"JobId={job}", "NumNodes=1", "NumCPUs=1", "NumTasks=1")
        wait_for(first_ranks_gone, 15, interval=0.5, what=f"the end of the first run's ranks {first_ranks}")  # on n1 and n2
        state = slurm.wait(job, LAUNCH_TIMEOUT_S, states={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    finally:
        slurm.run("scontrol", "update", "NodeName=n2", "State=RESUME", check=False)
        wait_for(lambda: "idle" in slurm.run("sinfo", "-h", "-N", "-n", "n2", "-o", "%T", check=False), 60, interval=0.5, what="n2 idle again")
    log = _slurm_ranks_log(slurm, job, tmp_path)  # --open-mode=append: both runs in one file
    assert state == "COMPLETED", log[-5000:]
    info = slurm.jobs(job)[0]
    assert int(info["Restarts"]) == 1 and info["NodeList"] == "n1", info
    assert f"job {job} (restart 0) on n[1-2]: 2 tasks" in log and f"job {job} (restart 1) on n1: 1 tasks" in log, log[-3000:]
    _assert_no_rank_left(config)
    assert "resuming a 2-rank ZeRO-2 checkpoint on 1 rank: global batch 16 = 8 micro x 2 accumulation x 1" in log
    resumed = log[log.index("resumed from "):].split("\n", 1)[0]  # resumed from DIR/TAG at step N (...)
    tag = resumed.split(" at step ")[0].rsplit("/", 1)[1]
    resumed_at = int(tag[len("step"):])
    assert resumed.startswith(f"resumed from {run_dir / 'checkpoints'}/{tag} at step {resumed_at}") and INTERVAL <= resumed_at < STEPS, resumed
    marker = json.loads((run_dir / "checkpoints" / tag_for_step(STEPS) / COMPLETE_MARKER).read_text())
    assert marker["world_size"] == 1 and marker["step"] == STEPS and marker["global_batch_size"] == 16, marker
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for_step(STEPS)
    assert set(range(resumed_at + 1, STEPS + 1)) <= set(_losses(run_dir))  # every step after the resume trained


def test_slurm_deepspeed_launcher_inside_the_allocation_kill_one_rank_fails_the_job_and_a_new_one_resumes(
    slurm, pretraining_shards, reference, tmp_path
):
    config, run_dir = _config(tmp_path, pretraining_shards)

    def submit() -> str:
        # from the repository root, as the script's header says (it finds launch/train.py there)
        return slurm.sbatch(f"--output={tmp_path}/%x-%j.out", REPO / "launch/slurm/train_deepspeed.sbatch", config, cwd=REPO, env=_port())

    job = submit()
    _first_checkpoint_or_exit(run_dir, lambda: slurm.state(job) in {"PENDING", "RUNNING"})
    kill_rank(str(config), 1)
    killed_at = time.monotonic()
    state = slurm.wait(job, KILL_DEADLINE_S + 30)
    took = time.monotonic() - killed_at
    log = _slurm_ranks_log(slurm, job, tmp_path)
    print(f"\n{tmp_path.name}: job {job} {state} {took:.1f} s after rank 1 was killed")  # shown with -s
    assert state == "FAILED" and took < KILL_DEADLINE_S, (state, took, log[-3000:])
    assert "n1 slots=1\nn2 slots=1\n" in log and "srun -n 2 --kill-on-bad-exit=1" in log  # the generated hostfile, then srun
    _assert_no_rank_left(config)
    tag = latest_complete_tag(run_dir / "checkpoints")
    assert tag is not None and INTERVAL <= int(tag[len("step"):]) < STEPS, tag
    job = submit()  # a new job, same run_dir: resume: auto
    state = slurm.wait(job, LAUNCH_TIMEOUT_S)
    log = _slurm_ranks_log(slurm, job, tmp_path)
    assert state == "COMPLETED", log[-5000:]
    _assert_resumed_to_the_reference(run_dir, log, tag, reference)


def test_slurm_job_array_preprocesses_two_parts_and_a_dependent_job_merges_them_byte_for_byte(slurm, pretraining_shards, tmp_path):
    shards = pretraining_shards  # its "train" shards are the single-process run of the same command
    env = {"NUM_PARTS": "2", "PARTS_PREFIX": str(tmp_path / "part"), "OUTPUT_PREFIX": str(tmp_path / "merged"),
           "BERT_DS_UNIT_BYTES": "20000"}  # parts split the input by work units (1 MB by default; the corpus is 0.5 MB)
    proc = subprocess.run(
        ["bash", str(REPO / "launch/slurm/preprocess.sh"), "--input", str(shards["dir"] / "corpus.txt"), "--tokenizer", str(shards["vocab"]),
         "--valid-fraction", "0.05", "--workers", "1"],
        cwd=tmp_path, env={**slurm.env, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    array, merge = proc.stdout.split()
    assert slurm.wait(merge, LAUNCH_TIMEOUT_S) == "COMPLETED", _logs(tmp_path)
    tasks = slurm.jobs(array)
    assert len(tasks) == 2 and {t["JobState"] for t in tasks} == {"COMPLETED"}, tasks
    # the merge started only after both array tasks had ended (ISO timestamps compare as strings)
    assert slurm.jobs(merge)[0]["StartTime"] >= max(t["EndTime"] for t in tasks)
    for suffix in ("", "_valid"):
        for ext in ("bin", "idx"):
            merged = Path(f"{tmp_path / 'merged'}{suffix}.{ext}").read_bytes()
            single = Path(f"{shards['train']}{suffix}.{ext}").read_bytes()
            assert merged == single, f"merged{suffix}.{ext} differs from the single-process run"
    assert Path(f"{tmp_path / 'part0'}.bin").stat().st_size > 0 and Path(f"{tmp_path / 'part1'}.bin").stat().st_size > 0
