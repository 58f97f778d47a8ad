"""Train a BERT WordPiece vocabulary with Hugging Face ``tokenizers``.

    python -m data_tools.train_tokenizer --input corpus/ --output vocab/ --vocab-size 30522 [--cased]

Writes ``vocab.txt``, ``tokenizer.json`` and ``tokenizer_config.json``, a directory that
``transformers.BertTokenizerFast.from_pretrained`` loads and ``data_tools.preprocess
--tokenizer`` takes. ``--from-existing DIR`` instead imports an existing vocabulary (e.g.
a Hugging Face BERT checkpoint that ships only ``vocab.txt``) into the same layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from bert_ds.data.vocab import SPECIAL_TOKENS, load_tokenizer, tokenizer_info
from bert_ds.files import FileUnit
from data_tools import sources
from data_tools.text import normalize_document


def iter_texts(inputs: list[str], one_doc_per_line: bool, text_key: str, skip_bad_files: bool, report: bool = True) -> Iterator[str]:
    """Batches of paragraphs from every input, in the same order preprocess reads them; ``report``: say what was skipped or replaced."""
    stats = sources.ReadStats()
    for path in sources.expand_inputs(inputs):
        kind = sources.input_kind(path, one_doc_per_line)
        try:
            sources.check_readable(path, kind)
        except sources.InputError as e:
            if not skip_bad_files:
                raise
            if report:
                print(f"skipping {e}", file=sys.stderr)
            continue
        for unit in sources.plan_units([path], one_doc_per_line):
            batch = []
            for text, _ in sources.read_unit(unit, text_key, stats):
                batch.extend(line for line in normalize_document(text).split("\n") if line.strip())
            yield batch
    if report and stats.invalid_utf8:
        print(f"replaced {stats.invalid_utf8:,} invalid UTF-8 sequence(s)", file=sys.stderr)
    if report and stats.too_long:
        print(f"skipped {stats.too_long:,} document(s) longer than {sources.MAX_DOCUMENT_BYTES:,} bytes (first at: "
              f"{'; '.join(stats.too_long_at)})", file=sys.stderr)


def untrained_bert_tokenizer(lowercase: bool, strip_accents: bool | None) -> Tokenizer:
    """BERT's pipeline: clean text, split CJK characters, optional lower-case/accent strip, WordPiece."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def train_wordpiece(texts: Callable[[bool], Iterator[list[str]]], vocab_size: int, min_frequency: int, limit_alphabet: int,
                    lowercase: bool, strip_accents: bool | None) -> Tokenizer:
    """WordPiece training that gives the same vocabulary every time for the same corpus.

    ``tokenizers`` numbers the ``##`` continuation characters in hash-map order, which changes from
    process to process, and breaks ties between equally frequent merges by those numbers, so the same
    corpus can give different vocabularies (huggingface/tokenizers#1794). Here a first pass that makes
    no merges finds the continuation characters; the real pass gets them up front, sorted, as extra
    special tokens (the trainer numbers those in the order given), and they are turned back into
    ordinary vocabulary entries afterwards. The cost: one more counting pass over the corpus.
    ``texts(report)`` reads the corpus; only the real pass reports what it skipped or replaced.
    """
    trainer_options = dict(min_frequency=min_frequency, limit_alphabet=limit_alphabet, continuing_subword_prefix="##",
                           show_progress=sys.stderr.isatty())
    probe = untrained_bert_tokenizer(lowercase, strip_accents)
    probe.train_from_iterator(texts(False), trainer=trainers.WordPieceTrainer(vocab_size=0, special_tokens=SPECIAL_TOKENS, **trainer_options))
    continuations = sorted(t for t in probe.get_vocab() if t.startswith("##"))

    tok = untrained_bert_tokenizer(lowercase, strip_accents)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + continuations, **trainer_options)
    tok.train_from_iterator(texts(True), trainer=trainer)
    # the continuation characters stay in the vocabulary but must not be added tokens (those match raw text)
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    return Tokenizer.from_str(json.dumps(spec))


def add_bert_post_processor(tok: Tokenizer) -> None:
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )


def save(tok: Tokenizer, output: Path, lowercase: bool, strip_accents: bool | None) -> None:
    """Write the tokenizer directory's files as one unit, ``tokenizer.json`` (what loaders read first) last."""
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": lowercase,
        "strip_accents": strip_accents,
        "tokenize_chinese_chars": True,
        "model_max_length": 512,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    special = {k: v for k, v in config.items() if k.endswith("_token")}
    names = ["vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"]
    with FileUnit([output / name for name in names]) as unit, tempfile.TemporaryDirectory(dir=output) as scratch:
        (vocab_file,) = tok.model.save(scratch)  # vocab.txt, one token per line in id order
        os.replace(vocab_file, unit.temp(output / "vocab.txt"))
        unit.temp(output / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        unit.temp(output / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        tok.save(str(unit.temp(output / "tokenizer.json")))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.train_tokenizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", help="text/JSONL(.gz)/parquet files, directories, globs, or a datasets dir")
    p.add_argument("--output", required=True, help="directory to write the tokenizer to")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--cased", action="store_true", help="keep case (default: lower-case, as bert-base-uncased)")
    p.add_argument("--strip-accents", choices=["auto", "yes", "no"], default="auto", help="auto: strip when uncased (as BERT)")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--limit-alphabet", type=int, default=1000, help="most frequent characters kept as initial alphabet")
    p.add_argument("--text-key", default="text")
    p.add_argument("--one-doc-per-line", action="store_true")
    p.add_argument("--skip-bad-files", action="store_true")
    p.add_argument("--from-existing", metavar="DIR", help="import an existing vocabulary directory instead of training")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    output = Path(args.output)
    lowercase = not args.cased
    # None lets the normalizer follow `lowercase`, which is what BERT's uncased models do
    strip_accents = {"auto": None, "yes": True, "no": False}[args.strip_accents]

    if args.from_existing:
        tok = load_tokenizer(args.from_existing)
        cfg_path = Path(args.from_existing) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        save(tok, output, bool(cfg.get("do_lower_case", True)), cfg.get("strip_accents"))
    else:
        if not args.input:
            p.error("--input is required unless --from-existing is given")
        try:
            tok = train_wordpiece(lambda report: iter_texts(args.input, args.one_doc_per_line, args.text_key, args.skip_bad_files, report),
                                  args.vocab_size, args.min_frequency, args.limit_alphabet, lowercase, strip_accents)
        except sources.InputError as e:
            raise SystemExit(f"error: {e}") from None
        add_bert_post_processor(tok)
        save(tok, output, lowercase, strip_accents)
    info = tokenizer_info(output)
    print(json.dumps({"output": str(output), "vocab_size": info.vocab_size, "vocab_sha256": info.vocab_sha256}))


if __name__ == "__main__":
    main()
