"""What a run exposes to the network: the rendezvous store listens on MASTER_ADDR only (loopback for a single-node
run), data-loader workers never hold its socket, and the address is never guessed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bert_ds.cluster import dist
from bert_ds.cluster.dist import DistributedSetupError, RankInfo
from tests.cluster.helpers import kill_session, wait_for
from tests.conftest import REPO, deepspeed_launch, dist_env, write_run_config


@pytest.mark.slow
def test_the_store_listens_on_loopback_only_and_no_loader_worker_holds_its_socket(pretraining_shards, tmp_path):
    """It listened on every interface (`::`), and the forked loader workers held the listening socket."""
    config = write_run_config(tmp_path / "run.yaml", pretraining_shards, tmp_path / "run", data={"num_workers": 1})
    deepspeed_launch(str(REPO / "tests" / "dist_scripts" / "listen_check.py"), tmp_path / "out", config, num_ranks=2)
    rank0, rank1 = (json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["listening"] == rank1["listening"] == ["127.0.0.1"]  # one listener, rank 0's, on the given address
    assert rank0["workers"] == rank1["workers"] == 1
    assert rank0["workers_holding_the_listener"] == rank1["workers_holding_the_listener"] == []
    # DeepSpeed's CPU all-reduce buffers are no longer named in /dev/shm once the ranks have mapped them (each launch
    # left 2 x 69 MB of memory there for good)
    assert rank0["shared_memory_names"] == rank1["shared_memory_names"] == []


@pytest.mark.parametrize("source", ["launcher", "slurm", "single"])
def test_an_empty_master_addr_is_an_error_not_a_guess(source):
    info = RankInfo(0, 1 if source == "single" else 2, 0, source)
    env = {"MASTER_ADDR": "", "MASTER_PORT": "29500"}
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR"):
        dist.set_rendezvous_address(info, env)


def test_a_name_that_resolves_to_loopback_cannot_serve_other_nodes():
    """Debian maps a machine's own name to 127.0.1.1: binding there would leave the other nodes' ranks outside."""
    with pytest.raises(DistributedSetupError, match=r"resolves to 127\.0\.0\.1 \(loopback\).*other nodes"):
        dist.listening_socket("localhost", 0, multi_node=True)
    for multi_node in (False, None):  # one node, or nobody says: the name is served where it resolves
        sock = dist.listening_socket("localhost", 0, multi_node=multi_node)
        assert sock.getsockname()[0] == "127.0.0.1"
        sock.close()
    sock = dist.listening_socket("127.0.0.1", 0, multi_node=True)  # an explicit loopback address is the user's choice
    assert sock.getsockname()[0] == "127.0.0.1"
    sock.close()


def _session_processes(sid: int) -> list[str]:
    """``pid comm`` of every live process in session ``sid`` (zombies excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(f"{stat.parent.name} {comm}")
    return found


@pytest.mark.slow
def test_a_killed_rank_leaves_no_loader_worker_or_forkserver_behind(pretraining_shards, tmp_path):
    """A SIGKILLed rank left its forkserver, loader worker and resource tracker running for good: the worker's parent is
    the forkserver, which lives while the worker holds its liveness pipe, so torch's watchdog never fired."""
    config = write_run_config(tmp_path / "run.yaml", pretraining_shards, tmp_path / "run", data={"num_workers": 1},
                              train={"max_steps": 100000, "log_interval": 1})  # fmt: skip
    rank = subprocess.Popen([sys.executable, "-m", "bert_ds.train", str(config)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **dist_env()})  # fmt: skip
    try:
        wait_for(lambda: rank.poll() is not None or any(p.endswith("pt_data_worker") for p in _session_processes(rank.pid)),
                 timeout=120, interval=0.5, what="a loader worker")  # fmt: skip
        assert rank.poll() is None, "the run ended"
        assert len(_session_processes(rank.pid)) >= 3, _session_processes(rank.pid)  # rank, forkserver, worker (+ tracker)
        rank.kill()
        rank.wait()
        try:
            wait_for(lambda: not _session_processes(rank.pid), timeout=15, interval=0.5)
        except TimeoutError:
            raise AssertionError(f"left behind by the killed rank: {_session_processes(rank.pid)}") from None
    finally:
        kill_session(rank)  # the whole process group: the rank and anything it started
