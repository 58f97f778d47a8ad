"""A vocabulary is not trusted beyond its size: files over the caps are refused by name before ``tokenizers`` reads
them, and a run materialises the vocabulary once."""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import pytest

from bert_ds.data import vocab
from bert_ds.data.vocab import TokenizerError, load_tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocab_txt(d: Path, num_tokens: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "vocab.txt", "w") as f:
        f.write("\n".join(SPECIALS + [f"tok{i}" for i in range(num_tokens - len(SPECIALS))]) + "\n")
    return d


def test_a_vocab_txt_over_the_token_cap_is_refused_naming_file_and_cap_without_reading_it_into_memory(tmp_path):
    cap = getattr(vocab, "MAX_VOCAB_SIZE", 1 << 19)
    d = vocab_txt(tmp_path / "big", cap + 1)
    tracemalloc.start()
    try:
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{d / 'vocab.txt'}: more than {cap:,} tokens" in str(e.value) and "MAX_VOCAB_SIZE" in str(e.value)
    assert peak < 2 << 20, peak  # counted a block at a time (reading it as a set of lines took ~40 MB here)
    assert load_tokenizer(vocab_txt(tmp_path / "at_cap", cap)).get_vocab_size() == cap  # the cap itself is allowed


def test_a_vocabulary_file_over_the_byte_cap_is_refused_before_tokenizers_parses_it(vocab_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(vocab, "MAX_VOCAB_FILE_BYTES", 1000, raising=False)
    d = tmp_path / "tok"
    shutil.copytree(vocab_dir, d)
    monkeypatch.setattr(vocab, "Tokenizer", _CountingTokenizer)
    monkeypatch.setattr(_CountingTokenizer, "calls", {"load": 0, "get_vocab": 0})
    with pytest.raises(TokenizerError, match=rf"{d / 'tokenizer.json'}: [\d,]+ bytes, more than the 1,000 bytes a vocabulary file may have"):
        load_tokenizer(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=rf"{d / 'vocab.txt'}: [\d,]+ bytes, more than the 1,000 bytes"):
        load_tokenizer(d)
    assert _CountingTokenizer.calls["load"] == 0


def test_a_tokenizer_json_with_more_tokens_than_the_cap_is_refused(vocab_dir, monkeypatch):
    monkeypatch.setattr(vocab, "MAX_VOCAB_SIZE", 100, raising=False)
    with pytest.raises(TokenizerError, match=rf"{vocab_dir / 'tokenizer.json'}: 400 tokens, more than the 100"):
        load_tokenizer(vocab_dir)


class _CountingTokenizer:
    """Stands for ``tokenizers.Tokenizer`` in ``bert_ds.data.vocab``: counts parses and Python copies of the vocabulary."""

    calls = {"load": 0, "get_vocab": 0}

    def __init__(self, real):
        self._real = real

    @classmethod
    def from_file(cls, path):
        from tokenizers import Tokenizer

        cls.calls["load"] += 1
        return cls(Tokenizer.from_file(path))

    def get_vocab(self, *args, **kwargs):
        self.calls["get_vocab"] += 1
        return self._real.get_vocab(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_a_run_loads_and_materialises_its_vocabulary_once(vocab_dir, tmp_path, monkeypatch):
    from bert_ds.config import run_config_from_dict

    monkeypatch.setattr(vocab, "Tokenizer", _CountingTokenizer)
    monkeypatch.setattr(_CountingTokenizer, "calls", {"load": 0, "get_vocab": 0})
    cfg = run_config_from_dict({"run_dir": str(tmp_path / "run"), "data": {"train_prefix": str(tmp_path / "none"), "tokenizer": str(vocab_dir)},
                                "train": {"max_steps": 1}})
    v = vocab.resolve_vocab(cfg)
    assert v.size == 400 and len(v.tokens) == 400
    # one parse of tokenizer.json, one Python copy of the vocabulary (the hash is taken from it)
    assert _CountingTokenizer.calls == {"load": 1, "get_vocab": 1}, _CountingTokenizer.calls


def test_a_tokenizer_json_whose_ids_are_not_0_to_n_is_refused_naming_it(vocab_dir, tmp_path):
    import json

    from bert_ds.config import ConfigError, run_config_from_dict

    d = tmp_path / "sparse"
    shutil.copytree(vocab_dir, d)
    data = json.loads((d / "tokenizer.json").read_text())
    last = list(data["model"]["vocab"])[-1]
    data["model"]["vocab"][last] = 100_000  # 400 tokens, one of them id 100,000: embeddings have 400 rows
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=rf"{d}: token ids are not 0..399: {last!r} has id 100000"):
        vocab.tokenizer_info(d)
    cfg = run_config_from_dict({"run_dir": str(tmp_path / "run"), "data": {"train_prefix": str(tmp_path / "none"), "tokenizer": str(d)},
                                "train": {"max_steps": 1}})
    with pytest.raises(ConfigError, match=rf"data.tokenizer: {d}: token ids are not 0..399"):
        vocab.resolve_vocab(cfg)
