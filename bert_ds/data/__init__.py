"""Pretraining data: the shard format and its metadata, the vocabulary, sentence-pair samples, masking, batches.

``indexed_dataset`` (the Megatron-compatible ``.bin/.idx`` format) and ``metadata`` (its ``.json``)
are the files; ``vocab`` says which tokenizer a run uses; ``pretraining`` builds NSP/SOP samples
from shards, ``masking`` masks them, ``loader`` gives each rank its batches. ``data_tools`` writes
shards with these modules; the trainer reads them.
"""
