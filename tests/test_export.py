"""Export to Hugging Face: logits round trip for ZeRO 0/2/3 checkpoints of 2 ranks, fp32 masters of bf16 runs,
refusal of half-written and foreign directories, what transformers loads, and the peak memory of the export.

One launch of tests/dist_scripts/export_reference_worker.py (the real ``deepspeed`` launcher, 2 CPU ranks,
gloo on 127.0.0.1) trains every run with the real trainer and, for the fp32 runs, lets DeepSpeed reload
the final checkpoint on the same 2 ranks and records the logits of 8 evaluation samples: the reference.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, deepspeed_launch, run_module, tensorboard_scalars, write_run_config

OFFLINE = {"HF_HUB_OFFLINE": "1"}  # subprocesses never ask the model hub (everything is local)

WORKER = REPO / "tests" / "dist_scripts" / "export_reference_worker.py"
REFERENCE_RUNS = {"z0": (0, "fp32"), "z2": (2, "fp32"), "z3": (3, "fp32")}
BF16_RUNS = {"z0_bf16": (0, "bf16"), "z2_bf16": (2, "bf16")}
# big enough that the model, not the libraries, dominates the export's memory: ~26M parameters, 105 MB in fp32
BIG_MODEL = {"preset": "medium", "overrides": {}}  # 8 layers, hidden 512
MAX_LOGIT_DIFF = 1e-5  # measured: 0 for ZeRO 0 and 2 (bit-identical), 1.5e-7 for ZeRO 3 (fp32 both sides)


@pytest.fixture(scope="module")
def runs(pretraining_shards, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("export_runs")
    configs = {}
    for name, (stage, precision) in {**REFERENCE_RUNS, **BF16_RUNS}.items():
        configs[name] = write_run_config(
            d / f"{name}.yaml", pretraining_shards, d / name, train={"max_steps": 4, "micro_batch_size": 8, "zero_stage": stage,
            "precision": precision, "log_interval": 1}, eval={"num_samples": 32},
        )  # fmt: skip
    configs["big"] = write_run_config(
        d / "big.yaml", pretraining_shards, d / "big", model=BIG_MODEL, data={"valid_prefix": ""},
        train={"max_steps": 1, "micro_batch_size": 2, "zero_stage": 2, "precision": "fp32", "log_interval": 1},
    )  # fmt: skip
    references = [a for name, config in configs.items() for a in ("--reference" if name in REFERENCE_RUNS else "--run", config)]
    deepspeed_launch(str(WORKER), "--out", d / "reference", *references, timeout=900)
    return {"dir": d, **{name: d / name for name in configs}}


def hf_logits(out_dir: Path, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import BertForPreTraining

    model = BertForPreTraining.from_pretrained(out_dir).eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"])
    return out.prediction_logits[batch["labels"] != -100], out.seq_relationship_logits


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFERENCE_RUNS))
def test_exported_model_reproduces_the_training_models_logits_for_every_zero_stage(name, runs, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining

    from bert_ds.hf import evaluate, export

    info = export.export(runs[name], tmp_path / "hf")
    ref = torch.load(runs["dir"] / "reference" / f"{name}.pt")
    mlm, nsp = hf_logits(tmp_path / "hf", ref["batch"])
    mlm_diff, nsp_diff = (mlm - ref["mlm_logits"]).abs().max().item(), (nsp - ref["nsp_logits"]).abs().max().item()
    print(f"{name}: max |logit diff| MLM {mlm_diff:.2e} NSP {nsp_diff:.2e} ({info['weights']})")
    assert mlm.shape == ref["mlm_logits"].shape and mlm.shape[0] > 0
    assert mlm_diff < MAX_LOGIT_DIFF and nsp_diff < MAX_LOGIT_DIFF, (mlm_diff, nsp_diff)

    _, loading = AutoModelForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    _, loading = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not loading["missing_keys"], loading  # the pooler and NSP head are not part of a masked-LM model
    assert {k.rsplit(".", 1)[0] for k in loading["unexpected_keys"]} <= {"bert.pooler.dense", "cls.seq_relationship"}, loading

    # the fixed evaluation set: the trainer's (2 ranks, DeepSpeed engine), the checkpoint's and the export's numbers agree
    trainer_eval = {tag.split("/")[1]: values[-1][1] for tag, values in tensorboard_scalars(runs[name] / "tensorboard").items() if tag.startswith("eval/")}
    from_checkpoint, from_export = evaluate.run(runs[name]), evaluate.run(tmp_path / "hf")
    for metric in evaluate.METRICS:
        assert from_export[metric] == pytest.approx(from_checkpoint[metric], rel=1e-5, abs=1e-6), metric
        assert from_checkpoint[metric] == pytest.approx(trainer_eval[metric], rel=1e-5, abs=1e-6), metric


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BF16_RUNS))
def test_bf16_runs_export_their_fp32_master_weights(name, runs):
    from bert_ds.hf.sources import open_checkpoint

    source = open_checkpoint(runs[name])
    weights, where = source.fp32_weights()
    assert "fp32 master weights" in where
    module = torch.load(source.tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module["bert.embeddings.word_embeddings.weight"].dtype == torch.bfloat16
    # the bf16 module is the masters rounded; the masters carry more bits than bf16 holds
    assert all(torch.equal(weights[n].bfloat16(), module[n]) for n in weights), "masters assigned to the wrong parameters"
    assert any(not torch.equal(weights[n], module[n].float()) for n in weights), "exported the bf16 copy, not the masters"
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_export_refuses_a_half_written_checkpoint_and_a_directory_that_is_no_checkpoint(pretraining_shards, tmp_path):
    from bert_ds.hf import export

    half = tmp_path / "run" / "checkpoints" / "step00000005"
    half.mkdir(parents=True)
    (half / "mp_rank_00_model_states.pt").write_bytes(b"")  # written by one rank; no completion marker
    cases = {
        half: "checkpoint is incomplete (no bert_ds_complete.json: the run stopped while saving it)",
        tmp_path / "run": "found only incomplete ones (step00000005",
        pretraining_shards["dir"]: "no complete bert-ds checkpoint found",
        tmp_path / "missing": "no such checkpoint",
    }
    for source, message in cases.items():
        with pytest.raises(SystemExit) as exc:
            export.main([str(source), str(tmp_path / "out")])
        assert message in str(exc.value), (source, exc.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    proc = run_module("bert_ds.export", half, tmp_path / "out", check=False)  # the command line says the same
    assert proc.returncode != 0 and "checkpoint is incomplete" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_export_refuses_a_checkpoint_that_lost_a_ranks_partition(runs, tmp_path):
    from bert_ds.hf import export

    damaged = tmp_path / "z2"
    shutil.copytree(runs["z2"], damaged)
    for f in damaged.glob("checkpoints/step*/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        f.unlink()
    with pytest.raises(SystemExit) as exc:
        export.main([str(damaged), str(tmp_path / "out")])
    assert "written by 2 ranks but the ZeRO optimizer partition files of ranks [1] are missing" in str(exc.value), exc.value


@pytest.mark.slow
def test_export_command_writes_a_directory_that_transformers_and_fill_mask_load_offline(runs, tmp_path):
    from transformers import pipeline

    from bert_ds.hf import export

    out = tmp_path / "hf"
    proc = run_module("bert_ds.export", runs["z3"], out, env=OFFLINE)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 4 and "ZeRO-3 optimizer partitions of 2 ranks" in result["weights"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
            "README.md", "bert_ds_export.json"} <= names  # fmt: skip
    card = (out / "README.md").read_text()
    assert "pipeline_tag: fill-mask" in card and "ZeRO stage 3" in card and "steps: 4 of 4" in card and "| MLM loss |" in card
    fill = pipeline("fill-mask", model=str(out))
    predictions = fill("the quick [MASK] sees the river.")
    assert len(predictions) == 5 and all("[MASK]" not in p["sequence"] for p in predictions)
    with pytest.raises(SystemExit, match="already holds a model"):
        export.main([str(runs["z3"]), str(out)])


def test_safetensors_writer_matches_the_reference_reader(tmp_path):
    from safetensors import safe_open

    from bert_ds.hf.export import write_safetensors

    tensors = {
        "a": torch.randn(3, 5),
        "b.bias": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3),
        "scalar": torch.tensor(2.5),
        "view": torch.randn(10)[2:6],
    }
    write_safetensors(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    header_len = struct.unpack("<Q", (tmp_path / "m.safetensors").read_bytes()[:8])[0]
    assert header_len % 8 == 0
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name


PEAK_RSS_SCRIPT = r"""
import json, sys
import deepspeed, torch, transformers  # the libraries' own memory is the baseline, not the export's
from bert_ds.hf import export
from bert_ds.hf.sources import open_checkpoint, skeleton

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

model_bytes = 4 * skeleton(open_checkpoint(sys.argv[1]).bert_config).numel
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
base = status("VmRSS")
export.export(sys.argv[1], sys.argv[2])
print(json.dumps({"base": base, "peak": status("VmHWM"), "model_bytes": model_bytes}))
"""


@pytest.mark.slow
def test_export_peak_memory_stays_under_twice_the_fp32_model_size(runs, tmp_path):
    # ZeRO-2 on 2 ranks: each rank file holds half the fp32 masters plus both Adam/LAMB moments (1.5x the model)
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(runs["big"]), str(tmp_path / "hf")],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = (m["peak"] - m["base"]) / m["model_bytes"]
    print(f"export of a {m['model_bytes'] / 1e6:.0f} MB fp32 model: peak RSS {m['peak'] / 1e6:.0f} MB, "
          f"{(m['peak'] - m['base']) / 1e6:.0f} MB above the {m['base'] / 1e6:.0f} MB after imports = {growth:.2f}x the model")  # fmt: skip
    assert m["model_bytes"] > 100e6
    assert growth < 2.0, m
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > m["model_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("crafted", ["mp_rank_00_model_states.pt", "rng_rank1.pt"])
def test_a_crafted_checkpoint_file_runs_nothing_under_export_evaluate_finetune_or_resume(runs, tmp_path, crafted):
    """A checkpoint file that unpickles into os.system ran its command under export and evaluate (DeepSpeed's own
    loader would have run it on resume). Every path refuses it, naming the file, and nothing runs."""
    from tests.test_checkpoint import crafted_pickle

    run = tmp_path / "run"
    shutil.copytree(runs["z2"], run)
    tag = run / "checkpoints" / "step00000004"
    ran = tmp_path / "RAN"
    crafted_pickle(tag / crafted, ran)
    (tmp_path / "train.csv").write_text("text,label\na b,0\nc d,1\n")
    commands = {
        "bert_ds.export": [run, tmp_path / "hf"],
        "bert_ds.evaluate": [run],
        "bert_ds.finetune": ["--model", run, "--train", tmp_path / "train.csv", "--valid", tmp_path / "train.csv", "--epochs", "1"],
        "bert_ds.train": [run / "config.yaml", f"run_dir={run}", "train.max_steps=6", "data.num_workers=0"],  # resume: auto, 1 rank
    }
    for module, args in commands.items():
        if module in ("bert_ds.export", "bert_ds.evaluate", "bert_ds.finetune") and crafted.startswith("rng"):
            continue  # those read the weights only; the RNG files matter to resume
        proc = run_module(module, *args, check=False, env=OFFLINE)
        assert proc.returncode != 0, module
        assert f"{crafted}: refused: it would unpickle posix.system" in proc.stderr, (module, proc.stderr[-2000:])
        assert not ran.exists(), module
