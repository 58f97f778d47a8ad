"""``python -m bert_ds.export``: export a bert-ds checkpoint as a Hugging Face BERT directory (the code is in ``bert_ds.hf.export``)."""

from bert_ds.hf.export import main

if __name__ == "__main__":
    main()
