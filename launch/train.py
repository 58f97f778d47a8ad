"""`python launch/train.py CONFIG ...` = `python -m bert_ds.train CONFIG ...`, for launchers that can only run a
script path (DeepSpeed's `--launcher slurm` ignores `--module`)."""

from bert_ds.train import main

main()
