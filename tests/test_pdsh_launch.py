"""Launch scripts run nothing the user did not write: the pdsh launch through a fake ``pdsh`` that records its
arguments and then does what ssh does (joins the remote words with spaces and hands them to ``sh -c`` in a fresh
environment and home directory), the hostfile's host names, and ``MPIRUN_ARGS`` / ``SBATCH_ARGS``.

The pdsh launch runs DeepSpeed's real per-node launcher (``deepspeed.launcher.launch``) on two "hosts", each starting
one rank of a probe module that records the arguments, directory and environment it was given.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bert_ds.cluster.hostfile import HostfileError, from_slurm, parse_hostfile
from bert_ds.cluster.pdsh import LaunchError, check_hosts_for_pdsh, kill_command, remote_command
from tests.conftest import REPO

FAKE_PDSH = r'''#!{python}
import json, os, re, subprocess, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_PDSH_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
hosts, i = [], 0
while i < len(args) and args[i].startswith("-"):
    if args[i] == "-w":
        hosts = args[i + 1].split(",")
    i += 2 if args[i] in ("-w", "-f", "-R", "-l") else 1
command = " ".join(args[i:])  # ssh sends the remote words joined by spaces to the login shell
if os.environ.get("FAKE_PDSH_HANG") and "deepspeed.launcher.launch" in command:
    time.sleep(600)
home = os.environ["FAKE_PDSH_HOME"]
procs = []
for rank, host in enumerate(hosts):
    remote = re.sub("%[nh%]", lambda m: {"%n": str(rank), "%h": host, "%%": "%"}[m.group()], command)
    procs.append(subprocess.Popen(["sh", "-c", remote], cwd=home, env={"PATH": "/usr/bin:/bin", "HOME": home}))
sys.exit(max([p.wait() for p in procs] or [0]))
'''

PROBE = '''import json, os, sys
keys = ("HOSTILE_VAR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
with open(f"probe_rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in keys}}, f)
'''

HOSTILE_ARGS = [
    "run_dir=out dir $(touch pwned_subst)",
    "data.tokenizer=`touch pwned_backtick`",
    "x='; touch pwned_semicolon; '",
    'y="double" %n %h %% $HOME',
    "z=line one\nline two; touch pwned_newline",
]


def fake_pdsh(tmp_path: Path) -> dict:
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    (bin_dir / "pdsh").write_text(FAKE_PDSH.replace("{python}", sys.executable))
    (bin_dir / "pdsh").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_PDSH_LOG": str(tmp_path / "pdsh.log"), "FAKE_PDSH_HOME": str(home)}


def hostile_run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "a run dir 'with\" quotes $(touch pwned_dirname) %n"
    run_dir.mkdir()
    (run_dir / "probe_argv.py").write_text(PROBE)
    (run_dir / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
    return run_dir


def pdsh_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PDSH", "MASTER_"))}
    return {**env, **fake_pdsh(tmp_path), "PYTHON": sys.executable, "HOSTFILE": "hostfile", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29999", "SKIP_HOST_CHECK": "1", "MODULE": "probe_argv", "HOSTILE_VAR": "v $(touch pwned_env) 'q\" `id`",
            "FORWARD_ENV": "OMP_NUM_THREADS HOSTILE_VAR", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def recorded(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "pdsh.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_pdsh_launch_hands_every_rank_exactly_the_arguments_directory_and_environment_given_and_runs_nothing_else(tmp_path):
    run_dir = hostile_run_dir(tmp_path)
    proc = subprocess.run(["bash", str(REPO / "launch/hostfile_pdsh.sh"), "config.yaml", *HOSTILE_ARGS], cwd=run_dir,
                          env=pdsh_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(tmp_path.rglob("pwned*")) == []  # no $(...), `...`, ; or newline ran anywhere
    [call] = recorded(tmp_path)
    assert call[:5] == ["-S", "-f", "1024", "-w", "node1,node2"] and len(call) == 6, call  # one remote command word
    for rank in (0, 1):
        probe = json.loads((run_dir / f"probe_rank{rank}.json").read_text())
        assert probe["argv"] == ["--local_rank=0", "config.yaml", *HOSTILE_ARGS], probe["argv"]
        assert probe["cwd"] == str(run_dir)
        assert probe["env"] == {"HOSTILE_VAR": "v $(touch pwned_env) 'q\" `id`", "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "OMP_NUM_THREADS": "1"}, probe["env"]


def test_stopping_the_pdsh_launch_ends_its_launchers_on_every_host_and_only_them(tmp_path):
    run_dir = hostile_run_dir(tmp_path)
    proc = subprocess.Popen(["bash", str(REPO / "launch/hostfile_pdsh.sh"), "config.yaml"], cwd=run_dir,
                            env=pdsh_env(tmp_path, FAKE_PDSH_HANG="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not recorded(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        [launch] = recorded(tmp_path)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    launch_id = re.search(r"-X bert_ds_launch=([0-9a-f]{16}) ", launch[-1]).group(1)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert recorded(tmp_path)[1] == ["-S", "-f", "1024", "-w", "node1,node2", f"pkill -TERM -f -- 'bert_ds_launc[h]={launch_id}'"]


def test_the_remote_command_is_one_posix_shell_line_with_pdsh_substitution_only_for_the_node_rank():
    args = ["c.yaml", *HOSTILE_ARGS, "100%"]
    cmd = remote_command(python="/opt/my env/bin/python", cwd="/data/it's here", exports={"A": "1 $(x)", "PYTHONPATH": "/p q"},
                         launch_id="0123456789abcdef", world="eyJ4IjogWzBdfQ==", master_addr="node1", master_port=29500, module=True,
                         script="bert_ds.train", args=args)
    # pdsh's substitution, left to right: %n is the node rank, %% a literal % (and every other % of the command is doubled)
    unescaped = re.sub("%[nh%]", lambda m: {"%n": "3", "%%": "%"}.get(m.group(), "HOST"), cmd)
    assert "%h" not in cmd.replace("%%", "") and "HOST" not in unescaped
    # what the shell runs, word for word (the export and cd are shell syntax; the exec's words are the launcher's argv)
    out = subprocess.run(["sh", "-c", unescaped.replace("exec ", "printf '%s\\0' ", 1).replace("cd ", "test -n ", 1)],
                         capture_output=True, check=True).stdout.decode().split("\0")[:-1]
    assert out == ["/opt/my env/bin/python", "-X", "bert_ds_launch=0123456789abcdef", "-u", "-m", "deepspeed.launcher.launch",
                   "--world_info=eyJ4IjogWzBdfQ==", "--node_rank=3", "--master_addr=node1", "--master_port=29500", "--module",
                   "bert_ds.train", *args]
    assert kill_command("0123456789abcdef") == "pkill -TERM -f -- 'bert_ds_launc[h]=0123456789abcdef'"


@pytest.mark.parametrize("host", ["-oProxyCommand=touch${IFS}pwned", "-v", "node[1-4]", "^hosts", "user@node1", "node1,node2", "a/b", ".node", "node-"])
def test_hostfile_hosts_that_are_not_host_names_are_refused_naming_the_line(host):
    with pytest.raises(HostfileError, match=r"hosts line 2: .* is not a host name") as e:
        parse_hostfile(f"node0 slots=1\n{host} slots=1\n", "hosts")
    if host.startswith("-"):
        assert "ssh and pdsh would take it as an option" in str(e.value)


def test_host_names_and_ip_addresses_are_accepted_and_pdsh_refuses_ipv6_and_a_bad_master_addr():
    entries = parse_hostfile("node001 slots=8\ngpu_7.cluster.local slots=8\n10.0.0.5 slots=1\nfe80::1 slots=1\n", "hosts")
    assert [e.host for e in entries] == ["node001", "gpu_7.cluster.local", "10.0.0.5", "fe80::1"]
    check_hosts_for_pdsh(entries[:3], "hosts", "node001")
    with pytest.raises(LaunchError, match="hosts line 4: fe80::1: pdsh cannot take an IPv6 address"):
        check_hosts_for_pdsh(entries, "hosts", "node001")
    with pytest.raises(LaunchError, match="MASTER_ADDR: '-oProxyCommand=x' is not a host name"):
        check_hosts_for_pdsh(entries[:3], "hosts", "-oProxyCommand=x")
    with pytest.raises(HostfileError, match="SLURM node list"):
        from_slurm("n[1-2],-oX", 1)


def test_the_pdsh_script_stops_before_launching_on_a_host_name_that_would_be_an_ssh_option(tmp_path):
    run_dir = hostile_run_dir(tmp_path)
    (run_dir / "hostfile").write_text("node1 slots=1\n-oProxyCommand=touch${IFS}pwned slots=1\n")
    for skip in ("0", "1"):  # the preflight check refuses it; without the check, the launcher does
        proc = subprocess.run(["bash", str(REPO / "launch/hostfile_pdsh.sh"), "config.yaml"], cwd=run_dir,
                              env=pdsh_env(tmp_path, SKIP_HOST_CHECK=skip), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "hostfile line 2: '-oProxyCommand=touch${IFS}pwned' is not a host name" in proc.stderr, proc.stderr
    assert recorded(tmp_path) == [] and list(tmp_path.rglob("pwned*")) == []


def _fake(tmp_path: Path, name: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\nopen(os.environ['FAKE_LOG'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                      "print('123')\n")
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / f"{name}.log")}


def test_mpirun_args_and_sbatch_args_are_split_into_words_without_globbing_or_expansion(tmp_path):
    work = tmp_path / "work dir"
    work.mkdir()
    (work / "decoy.txt").write_text("")  # a * that globbed would turn into this name
    (work / "my hosts").write_text("localhost slots=2\n")
    env = {**os.environ, **_fake(tmp_path, "mpirun"), "NP": "2", "HOSTFILE": "my hosts", "SKIP_HOST_CHECK": "1", "PYTHON": sys.executable,
           "MPIRUN_ARGS": "--map-by ppr:1:node --mca btl ^openib * $(touch pwned_mpi)"}
    proc = subprocess.run(["bash", str(REPO / "launch/mpirun.sh"), "config.yaml", "x=$(touch pwned_arg)"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [argv] = [json.loads(line) for line in (tmp_path / "mpirun.log").read_text().splitlines()]
    assert argv[:4] == ["-np", "2", "--hostfile", "my hosts"], argv
    i = argv.index("--map-by")
    assert argv[i : i + 8] == ["--map-by", "ppr:1:node", "--mca", "btl", "^openib", "*", "$(touch", "pwned_mpi)"], argv
    assert argv[-2:] == ["config.yaml", "x=$(touch pwned_arg)"]

    env = {**os.environ, **_fake(tmp_path, "sbatch"), "NUM_PARTS": "2", "PARTS_PREFIX": "p", "OUTPUT_PREFIX": "o",
           "SBATCH_ARGS": "--partition=cpu * --comment=$(touch pwned_sbatch)"}
    proc = subprocess.run(["bash", str(REPO / "launch/slurm/preprocess.sh"), "--input", "corpus dir/"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in (tmp_path / "sbatch.log").read_text().splitlines()]
    assert [c[:4] for c in calls] == [["--parsable", "--partition=cpu", "*", "--comment=$(touch"]] * 2, calls
    assert calls[0][-2:] == ["--input", "corpus dir/"]
    assert list(tmp_path.rglob("pwned*")) == []


def test_the_hostfile_preflight_refuses_a_rendezvous_address_that_is_not_a_host_name(tmp_path):
    (tmp_path / "hosts").write_text("127.0.0.1 slots=1\n")
    proc = subprocess.run([sys.executable, "-m", "bert_ds.preflight", "--hostfile", str(tmp_path / "hosts"), "--master-addr=-oProxyCommand=x"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "MASTER_ADDR: '-oProxyCommand=x' is not a host name" in proc.stderr, proc.stderr
