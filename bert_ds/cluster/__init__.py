"""Cluster operations: ranks and the process group (``dist``), the preflight checks (``preflight``),
hostfiles (``hostfile``) and DeepSpeed's JIT-built ops (``jit_ops``). Launch scripts use these; the
trainer reaches them only through its start-up (``bert_ds.startup``)."""
