"""Hugging Face hand-off: open a checkpoint or an HF directory (``sources``), export to Hugging Face
(``export``), evaluate (``evaluate``) and the fine-tune check (``finetune``); each has its command line
as ``python -m bert_ds.<name>``."""
