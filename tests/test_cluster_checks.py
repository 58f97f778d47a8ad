"""Hostfiles, SLURM node lists and the preflight's verdicts: pure logic, plus the launch-node checks as a user runs them.

The multi-process launches themselves are in test_cluster_launch.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bert_ds.cluster.dist import NodeInfo, discover_node, discover_ranks, expected_rank_hosts
from bert_ds.cluster.hostfile import HostEntry, HostfileError, expand_nodelist, expand_tasks_per_node, format_hostfile, from_slurm, parse_hostfile
from bert_ds.cluster.preflight import find_problems, format_table, missing_ranks_message
from tests.conftest import REPO

# -- hostfiles ---------------------------------------------------------------------------------


def test_a_hostfile_parses_into_hosts_with_slots_in_file_order():
    text = "# two nodes\nnode001 slots=8   # first: rank 0 and the rendezvous\n\n  node002 slots=4\n"
    assert parse_hostfile(text) == [HostEntry("node001", 8, 2), HostEntry("node002", 4, 4)]
    assert format_hostfile(parse_hostfile(text)) == "node001 slots=8\nnode002 slots=4\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("node1 slots=8\nnode2 slot=8\n", "hf line 2: expected 'HOSTNAME slots=N', got 'node2 slot=8'"),
        ("node1 slots=8 gpus=4\n", "hf line 1: expected 'HOSTNAME slots=N'"),  # DeepSpeed would accept this line
        ("node1\n", "hf line 1: expected 'HOSTNAME slots=N', got 'node1'"),
        ("node1 slots=0\n", "hf line 1: slots must be a whole number >= 1"),
        ("node1 slots=eight\n", "hf line 1: slots must be a whole number >= 1"),
        ("node1 slots=8\n# again\nnode1 slots=8\n", "hf line 3: node1 is already listed on line 1"),
        ("nöde slots=1\n", "hf line 1: 'nöde' is not a host name"),
        ("# nothing\n\n", "hf: no hosts"),
    ],
    ids=["typo", "trailing-field", "no-slots", "zero-slots", "word-slots", "duplicate", "bad-name", "empty"],
)
def test_a_malformed_hostfile_is_refused_with_its_line(text, message):
    with pytest.raises(HostfileError) as e:
        parse_hostfile(text, "hf")
    assert message in str(e.value)


def test_the_example_hostfiles_parse():
    for path in (REPO / "hostfiles").glob("example_*"):
        assert parse_hostfile(path.read_text(), str(path))
    assert parse_hostfile((REPO / "hostfiles/localhost_2").read_text()) == [HostEntry("localhost", 2, 3)]


# -- SLURM node lists --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("n1", ["n1"]),
        ("n[1-2]", ["n1", "n2"]),
        ("gpu[008-010,012],login1", ["gpu008", "gpu009", "gpu010", "gpu012", "login1"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
    ],
)
def test_slurm_node_lists_expand_like_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_a_hostfile_is_generated_from_a_slurm_node_list():
    assert format_hostfile(from_slurm("gpu[01-02]", 8)) == "gpu01 slots=8\ngpu02 slots=8\n"
    with pytest.raises(HostfileError, match="unbalanced"):
        expand_nodelist("gpu[01-02")
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]


def test_the_hostfile_generator_command_line():
    out = subprocess.run([sys.executable, "-m", "bert_ds.hostfile", "from-slurm", "--nodelist", "n[1-2]", "--slots", "4"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout == "n1 slots=4\nn2 slots=4\n"


def test_the_host_of_every_rank_comes_from_slurm_or_the_hostfile(tmp_path):
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "6", "SLURM_STEP_NODELIST": "gpu[1-2]", "SLURM_STEP_TASKS_PER_NODE": "4,2"}
    assert expected_rank_hosts(slurm) == ["gpu1"] * 4 + ["gpu2"] * 2
    hostfile = tmp_path / "hf"
    hostfile.write_text("a slots=2\nb slots=1\n")
    assert expected_rank_hosts({"RANK": "0", "WORLD_SIZE": "3", "BERT_DS_HOSTFILE": str(hostfile)}) == ["a", "a", "b"]
    assert expected_rank_hosts({"RANK": "0", "WORLD_SIZE": "3"}) is None


@pytest.mark.parametrize(
    "env, node",
    [
        ({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "CROSS_RANK": "1", "LOCAL_SIZE": "8"}, NodeInfo("h", 1, 8)),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURMD_NODENAME": "gpu2",
          "SLURM_STEP_TASKS_PER_NODE": "4,2"}, NodeInfo("gpu2", 1, 2)),
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, NodeInfo("h", None, 2)),
        ({}, NodeInfo("h", 0, 1)),
    ],
    ids=["deepspeed", "slurm", "openmpi", "single"],
)  # fmt: skip
def test_each_launcher_tells_a_rank_its_node(env, node):
    assert discover_node(discover_ranks(env), env, "h") == node


# -- the preflight's verdict -------------------------------------------------------------------


def _report(rank: int, world: int = 2, node: str = "n1", host: str = "h1", **changes) -> dict:
    report = {
        "rank": rank, "world_size": world, "local_rank": 0, "source": "slurm", "host": host, "node": node, "node_rank": None,
        "local_world_size": 1, "pid": 1, "device": "cpu", "device_error": None, "backend": "gloo", "precision": "fp32", "cuda_devices": 0,
        "versions": {"python": "3.11.7", "torch": "2.13.0", "torch_build": "2.13.0+cpu", "deepspeed": "0.19.8", "transformers": "5.0",
                     "bert-ds": "0.1.0"},
        "shards": {"data/train": {"bin": 100, "idx": 10}}, "vocab": {"path": "vocab", "sha256": "a" * 64, "size": 400},
        "gloo_socket_ifname": "lo", "loopback_hostname": None,
    }  # fmt: skip
    for key, value in changes.items():
        report[key] = {**report[key], **value} if isinstance(value, dict) and isinstance(report[key], dict) else value
    return report


def test_ranks_that_see_the_same_world_pass():
    reports = {0: _report(0, node="n1"), 1: _report(1, node="n2")}
    assert find_problems(reports) == ([], [])
    table = format_table(reports)
    assert table.splitlines()[0].split()[:3] == ["rank", "node", "host"] and "n2" in table.splitlines()[2]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"versions": {"torch_build": "2.12.0+cpu"}}, "rank 1 on n2 (h2): torch_build 2.12.0+cpu, but rank 0 on n1 (h1) has 2.13.0+cpu"),
        ({"versions": {"deepspeed": "0.18.0"}}, "rank 1 on n2 (h2): deepspeed 0.18.0"),
        ({"shards": {"data/train": {"bin": None, "idx": 10}}}, "rank 1 on n2 (h2): cannot see data/train.bin"),
        ({"shards": {"data/train": {"bin": 50, "idx": 10}}}, "data/train.bin is 50 bytes, but rank 0 on n1 (h1) sees 100"),
        ({"vocab": {"sha256": "b" * 64}}, "rank 1 on n2 (h2): vocabulary vocab (sha256 bbbbbbbbbbbb) differs"),
        ({"vocab": {"error": "vocab/ does not exist"}}, "rank 1 on n2 (h2): vocabulary: vocab/ does not exist"),
        ({"device_error": "local rank 4 has no GPU: this node has 4"}, "rank 1 on n2 (h2): local rank 4 has no GPU"),
        ({"gloo_socket_ifname": "", "loopback_hostname": "127.0.1.1"}, "the host name h2 resolves to 127.0.1.1 (loopback)"),
        ({"precision": "fp16"}, "rank 1 on n2 (h2): train.precision fp16, but rank 0 on n1 (h1) trains in fp32 (train.precision auto on mixed hardware"),
    ],
    ids=["torch", "deepspeed", "missing-shard", "shard-size", "vocab", "vocab-error", "device", "gloo-loopback", "precision"],
)
def test_a_rank_that_sees_a_different_world_is_named(changes, message):
    reports = {0: _report(0, node="n1", host="h1"), 1: _report(1, node="n2", host="h2", **changes)}
    errors, _ = find_problems(reports)
    assert any(message in e for e in errors), errors


def test_a_node_with_more_ranks_than_gpus_is_named_and_idle_gpus_are_a_warning():
    gpu = {"backend": "nccl", "cuda_devices": 2}
    over = {r: _report(r, world=3, node="gpu1", **gpu) for r in range(3)}
    errors, _ = find_problems(over)
    assert errors == ["node gpu1 runs 3 ranks but has 2 GPUs: set its slots (hostfile), --num_gpus or --ntasks-per-node to 2"]
    under = {0: _report(0, world=1, node="gpu1", backend="nccl", cuda_devices=8)}
    assert find_problems(under) == ([], ["node gpu1 runs 1 rank on 8 GPUs: 7 GPUs stay idle"])


def test_a_rank_that_never_reported_is_named_with_its_expected_host(tmp_path):
    hostfile = tmp_path / "hf"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    env = {"MASTER_ADDR": "node1", "MASTER_PORT": "29500", "BERT_DS_HOSTFILE": str(hostfile), "RANK": "0", "WORLD_SIZE": "4"}
    reports = {0: _report(0, world=4, node="h1", host="h1"), 1: _report(1, world=4, node="h1", host="h1")}
    message = missing_ranks_message([2, 3], reports, 4, 30, env)
    assert message.startswith("2 of 4 ranks did not reach the rendezvous at node1:29500 within 30 s: "
                              "rank 2 (expected on node2), rank 3 (expected on node2).")
    assert "Reported: rank 0 on h1, rank 1 on h1" in message


# -- the launch-node check, as the launch scripts run it ------------------------------------------


def _script(name: str, hostfile: Path, config: str = "unused.yaml", **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(["bash", str(REPO / "launch" / name), config], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "HOSTFILE": str(hostfile), **env})


def test_a_launch_script_stops_on_a_malformed_hostfile_before_starting_anything(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=two\n")
    proc = _script("hostfile_no_ssh.sh", hostfile, NODE_RANK="0", MASTER_ADDR="127.0.0.1")
    assert proc.returncode == 2, proc.stderr
    assert f"{hostfile} line 2: slots must be a whole number >= 1" in proc.stderr
    assert "deepspeed" not in proc.stderr.lower().replace("bert_ds", "")  # the launcher never ran


def test_a_launch_script_refuses_a_node_rank_outside_the_hostfile_and_a_missing_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    proc = _script("hostfile_no_ssh.sh", hostfile, NODE_RANK="2", MASTER_ADDR="127.0.0.1")
    assert proc.returncode == 2 and "node rank 2 is outside [0, 2)" in proc.stderr, proc.stderr
    missing = _script("hostfile_pdsh.sh", tmp_path / "nope")
    assert missing.returncode == 2 and "does not exist (DeepSpeed would quietly fall back to training on this node only)" in missing.stderr
