"""``python -m bert_ds.evaluate``: score a checkpoint or a Hugging Face BERT on a fixed MLM/NSP evaluation set (the code is in ``bert_ds.hf.evaluate``)."""

from bert_ds.hf.evaluate import main

if __name__ == "__main__":
    main()
