"""A DeepSpeed op build killed half-way must not wedge every later start on the machine.

torch guards a JIT build with a lock file it deletes itself; a build killed by a timeout or a SIGKILLed rank
leaves it behind and each later ``deepspeed.init_distributed`` on CPU then waits on it forever, silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from bert_ds.cluster import jit_ops
from tests.conftest import REPO, dist_env


def test_a_lock_file_no_process_holds_is_removed_and_one_held_open_is_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    with open(lock):  # a live builder keeps its lock file open
        assert not jit_ops.remove_stale_torch_lock(tmp_path)
        assert lock.exists()
    assert jit_ops.remove_stale_torch_lock(tmp_path)
    assert not lock.exists()
    assert not jit_ops.remove_stale_torch_lock(tmp_path)  # nothing to remove


def test_the_comm_op_loads_past_a_lock_file_left_by_a_killed_build(tmp_path):
    env = {**os.environ, **dist_env()}
    # the project's cache (built by `make ops`, or here if it is cold), copied: ninja finds it up to date
    subprocess.run([sys.executable, "-m", "bert_ds.jit_ops"], cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
    cache = tmp_path / "torch_extensions"
    name = "deepspeed_shm_comm"
    shutil.copytree(os.path.join(env["TORCH_EXTENSIONS_DIR"], name), cache / name)
    (cache / name / "lock").write_text("")  # what a build SIGKILLed half-way leaves

    # without the stale-lock check this waits forever (torch polls for the file to go away)
    proc = subprocess.run([sys.executable, "-m", "bert_ds.jit_ops"], cwd=REPO, env={**env, "TORCH_EXTENSIONS_DIR": str(cache)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"removing {cache / name / 'lock'}: a stale torch build lock" in proc.stderr
    assert "DeepSpeed comm op ready" in proc.stderr  # logged, like the warning
    assert not (cache / name / "lock").exists()
