"""``python -m bert_ds.finetune``: fine-tune check of a pretrained checkpoint on a classification task (the code is in ``bert_ds.hf.finetune``)."""

from bert_ds.hf.finetune import main

if __name__ == "__main__":
    main()
