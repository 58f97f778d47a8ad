"""``python -m bert_ds CONFIG.yaml [key=value ...]``: the same command as ``python -m bert_ds.train``."""

from bert_ds.train import main

main()
