"""``python -m bert_ds.hostfile``: write a hostfile from a SLURM allocation, or check one (the code is in ``bert_ds.cluster.hostfile``)."""

from bert_ds.cluster.hostfile import main

if __name__ == "__main__":
    main()
