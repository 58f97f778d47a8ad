"""``python -m bert_ds.jit_ops``: build DeepSpeed's JIT-compiled comm op ahead of time (the code is in ``bert_ds.cluster.jit_ops``)."""

from bert_ds.cluster.jit_ops import main

if __name__ == "__main__":
    main()
