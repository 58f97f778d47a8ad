"""Chinese whole-word masking: segmentation at preprocessing (PREFIX.words), masking whole words, the trainer's checks.

Everything runs on an embedded Chinese sample (mixed with English) and a Chinese BERT directory the test
builds (vocabulary from the corpus, ``BertForPreTraining.save_pretrained`` weights); no hub, no shared corpora.
The reference implementations here are plain loops, independent of the vectorised code they check.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from bert_ds.data import word_boundaries
from bert_ds.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from bert_ds.data.masking import IGNORE_INDEX, MaskingVocab, continuation_table, mask_tokens
from bert_ds.data.metadata import metadata_path, read_metadata
from bert_ds.data.pretraining import PretrainingDataset
from bert_ds.data.word_boundaries import WordBoundaryError, WordFlags, words_path
from tests.conftest import best_unigram_accuracy, run_module, train_runs, write_run_config

# Real-looking Chinese prose with English terms, quotes and a domain term (龘龙科技) whose first character the
# test vocabulary lacks, so it becomes [UNK] inside a segmented word.
SAMPLE_DOCUMENTS = [
    "深度学习模型需要大量的训练数据。我们使用 DeepSpeed 在多台机器上训练 BERT 模型！你知道预训练和微调有什么区别吗？"
    "预训练让模型学习语言的一般规律，微调让模型适应具体任务。",
    "中文没有空格，所以分词是自然语言处理的第一步。「分词的质量直接影响模型的效果。」他说。"
    "全词掩码把同一个词的所有汉字一起遮住，模型必须根据上下文猜出整个词。",
    "龘龙科技是一家位于杭州的人工智能公司。公司的工程师每天都在改进 tokenization 算法。"
    "他们发现 whole word masking 对中文阅读理解任务很有帮助。",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。故宫、长城和颐和园每年吸引数百万游客。"
    "春天的时候，公园里开满了桃花和杏花。",
    "我们在服务器上安装了 Debian 操作系统。软件包管理器可以自动解决依赖关系；管理员只需要输入一条命令。"
    "如果系统出现问题，日志文件会记录详细的错误信息。",
    "他问：“今天的会议几点开始？”秘书回答说：“下午三点，在三楼的会议室。”会议讨论了明年的研究计划和预算。",
    "机器翻译系统把英文句子翻译成中文。早期的系统使用规则，后来的系统使用统计方法，现在的系统使用神经网络。"
    "Transformer 架构改变了整个领域。",
    "小明喜欢在周末去图书馆看书。他最喜欢的作家是鲁迅，因为鲁迅的文章既深刻又幽默。"
    "图书馆的管理员认识小明，经常给他推荐新书。",
    "龘龙科技的研究人员发表了一篇关于中文预训练模型的论文。论文比较了字级别掩码和全词掩码两种方法。"
    "实验表明，全词掩码在多个中文任务上取得了更好的结果。",
    "天气预报说明天有大雨，出门记得带伞。这个城市的夏天又热又潮湿，很多人选择在晚上散步。"
    "河边的风很凉快，孩子们在草地上放风筝。",
]
UNK_CHARACTER = "龘"
USER_WORDS = ["龘龙科技", "全词掩码", "字级别掩码"]
SEQ_LEN = 64


def chinese_documents(num_docs: int, seed: int = 0, num_topics: int = 12) -> list[str]:
    """Learnable Chinese: each topic owns its nouns, verbs and places (two-character words from its own characters),
    and a story continues across sentences (the object of one is the subject of the next), so a masked word is
    predictable from its context, as in ``data_tools.sample_corpus.synthetic_documents``."""
    rng = random.Random(seed)
    pool = [chr(c) for c in range(0x4E00, 0x9FA5)]
    rng.shuffle(pool)
    chars = iter(pool)

    def word() -> str:
        return next(chars) + next(chars)

    topics = [{"nouns": [word() for _ in range(6)], "verbs": [word() for _ in range(3)], "places": [word() for _ in range(2)]}
              for _ in range(num_topics)]
    docs = []
    for _ in range(num_docs):
        topic = rng.choice(topics)
        subject = rng.choice(topic["nouns"])
        sentences = []
        for _ in range(rng.randint(4, 10)):
            obj = rng.choice([n for n in topic["nouns"] if n != subject])
            sentences.append(f"{subject}在{rng.choice(topic['places'])}{rng.choice(topic['verbs'])}了{obj}。")
            subject = obj
        docs.append("".join(sentences))
    return docs


def write_documents(docs: list[str], path: Path) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def zh(tmp_path_factory) -> dict:
    """The sample and a learnable corpus; a Chinese BERT dir (vocab from both, without 龘; tiny saved weights); shards."""
    from transformers import BertConfig, BertForPreTraining

    d = tmp_path_factory.mktemp("zh")
    sample = write_documents(SAMPLE_DOCUMENTS, d / "sample.txt")
    learn = write_documents(chinese_documents(1500, seed=3), d / "learn.txt")
    run_module("data_tools.train_tokenizer", "--input", sample, learn, "--output", d / "trained", "--vocab-size", "3000")
    tokens = [t for t in (d / "trained" / "vocab.txt").read_text(encoding="utf-8").splitlines() if t != UNK_CHARACTER]
    hf = d / "chinese-bert"
    hf.mkdir()
    (hf / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    (hf / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenize_chinese_chars": True,
                                                          "tokenizer_class": "BertTokenizer"}))
    config = BertConfig(vocab_size=len(tokens), hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForPreTraining(config).save_pretrained(hf)
    user_dict = d / "user.dict"
    user_dict.write_text("".join(f"{w} 100000 n\n" for w in USER_WORDS), encoding="utf-8")
    common = ["--tokenizer", hf, "--workers", "1", "--progress", "off"]
    run_module("data_tools.preprocess", "--input", sample, "--output-prefix", d / "sample_none", *common)
    run_module("data_tools.preprocess", "--input", sample, "--output-prefix", d / "sample", *common,
               "--word-segmenter", "jieba", "--user-dict", user_dict)
    return {"dir": d, "hf": hf, "tokens": tokens, "sample": sample, "learn": learn, "user_dict": user_dict,
            "shard": d / "sample", "shard_none": d / "sample_none"}


def is_cjk(ch: str) -> bool:
    return any(lo <= ord(ch) <= hi for lo, hi in word_boundaries.CJK_RANGES)


def reference_flags(text_path: Path, hf: Path, user_words: list[str]) -> list[bool]:
    """Continuation flags from jieba words mapped to tokens through the Hugging Face tokenizer's character offsets."""
    import rjieba
    from transformers import BertTokenizerFast

    from data_tools.text import document_sentences, normalize_document

    jieba = rjieba.Jieba()
    for w in user_words:
        jieba.add_word(w, 100000, "n")
    tok = BertTokenizerFast.from_pretrained(str(hf))
    flags: list[bool] = []
    for doc in text_path.read_text(encoding="utf-8").split("\n\n"):
        for sentence in document_sentences(normalize_document(doc)):
            char_flag = []
            for word in jieba.cut(sentence):
                whole = all(is_cjk(c) for c in word)
                char_flag += [whole and i > 0 for i in range(len(word))]
            enc = tok(sentence, add_special_tokens=False, return_offsets_mapping=True)
            for start, end in enc["offset_mapping"]:
                flags.append(end - start == 1 and is_cjk(sentence[start]) and char_flag[start])
    return flags


def test_segmented_preprocessing_writes_the_same_shard_plus_flags_that_match_jieba(zh):
    for ext in ("bin", "idx"):
        assert Path(f"{zh['shard']}.{ext}").read_bytes() == Path(f"{zh['shard_none']}.{ext}").read_bytes()
    assert not words_path(zh["shard_none"]).exists()
    ds = IndexedDataset(zh["shard"])
    flags = WordFlags(zh["shard"], ds.num_tokens).window(0, ds.num_tokens)
    expected = reference_flags(zh["sample"], zh["hf"], USER_WORDS)
    assert len(expected) == ds.num_tokens
    assert flags.tolist() == expected
    unk = zh["tokens"].index("[UNK]")
    assert (ds.tokens == unk).sum() >= 2  # 龘 is in the shard as [UNK] ...
    assert flags[np.flatnonzero(np.asarray(ds.tokens) == unk) + 1].all()  # ... and 龘龙科技 still continues after it
    meta = read_metadata(zh["shard"])["word_segmentation"]
    assert meta["segmenter"] == "jieba" and meta["library"] == "rjieba" and meta["library_version"]
    assert meta["continuations"] == int(flags.sum()) > 100
    import hashlib

    assert meta["user_dictionaries"] == [{"path": str(zh["user_dict"].resolve()), "sha256": hashlib.sha256(zh["user_dict"].read_bytes()).hexdigest(),
                                          "words": len(USER_WORDS)}]
    assert read_metadata(zh["shard_none"])["word_segmentation"] == {"segmenter": "none", "cjk_tokens": meta["cjk_tokens"]}


def test_segmented_preprocessing_gives_the_library_s_ids_on_adversarial_text(zh, tmp_path):
    """Units of CJK characters and the runs between them tokenize as the whole sentence does, whatever is next to them."""
    docs = [
        "ＡＢＣ中文ｘｙｚ１２３，混合。日本語のかなカタカナと한국어도。Café naïve 中\u0301文 e\u0301中。",
        "表情😀符号𠀀𠀁扩展B区字，兼容字\uf900\ufa0e。控制\x07字符\u200b零宽，[MASK]中[UNK]文。",
        "  前后 空格  中 文  。English only sentence here. 数字3.14和2024年。",
    ]
    corpus = write_documents(docs, tmp_path / "adversarial.txt")
    common = ["--input", corpus, "--tokenizer", zh["hf"], "--workers", "1"]
    run_module("data_tools.preprocess", *common, "--output-prefix", tmp_path / "plain")
    run_module("data_tools.preprocess", *common, "--output-prefix", tmp_path / "seg", "--word-segmenter", "jieba")
    for ext in ("bin", "idx"):
        assert (tmp_path / f"seg.{ext}").read_bytes() == (tmp_path / f"plain.{ext}").read_bytes()
    run_module("data_tools.inspect", tmp_path / "seg", "--verify")


def test_a_user_dictionary_joins_domain_terms_the_built_in_dictionary_splits(zh, tmp_path):
    import rjieba

    assert rjieba.Jieba().cut("字级别掩码") != ["字级别掩码"]  # otherwise this test shows nothing
    run_module("data_tools.preprocess", "--input", zh["sample"], "--tokenizer", zh["hf"], "--output-prefix", tmp_path / "plain",
               "--workers", "1", "--word-segmenter", "jieba")
    n = IndexedDataset(zh["shard"]).num_tokens
    with_dict, without = WordFlags(zh["shard"], n).window(0, n), WordFlags(tmp_path / "plain", n).window(0, n)
    assert with_dict.sum() > without.sum()
    # every character after the first of 字级别掩码 continues it with the dictionary
    ids = [zh["tokens"].index(c) for c in "字级别掩码"]
    tokens = np.asarray(IndexedDataset(zh["shard"]).tokens)
    at = [i for i in range(n - 5) if tokens[i : i + 5].tolist() == ids]
    assert at and all(with_dict[i : i + 5].tolist() == [False, True, True, True, True] for i in at)
    assert not all(without[i : i + 5].tolist() == [False, True, True, True, True] for i in at)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe bad\n", "user.dict:1: not UTF-8"),
        ("词语 12\n两个 词 语 5\n".encode(), "user.dict:2:"),
        (b"\n\n", "user.dict: no words"),
    ],
)
def test_bad_user_dictionaries_are_refused_naming_file_and_line(zh, tmp_path, content, message):
    path = tmp_path / "user.dict"
    path.write_bytes(content)
    proc = run_module("data_tools.preprocess", "--input", zh["sample"], "--tokenizer", zh["hf"], "--output-prefix", tmp_path / "out",
                      "--word-segmenter", "jieba", "--user-dict", path, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("out*"))


def test_a_user_dictionary_without_a_segmenter_is_an_error(zh, tmp_path):
    proc = run_module("data_tools.preprocess", "--input", zh["sample"], "--tokenizer", zh["hf"], "--output-prefix", tmp_path / "out",
                      "--user-dict", zh["user_dict"], check=False)
    assert proc.returncode != 0 and "--user-dict needs --word-segmenter jieba" in proc.stderr


def test_a_failed_segmented_run_leaves_no_files_and_the_previous_shard_intact(zh, tmp_path):
    prefix = copy_shard(zh["shard"], tmp_path / "shard")
    before = {ext: Path(f"{prefix}.{ext}").read_bytes() for ext in ("bin", "idx", "words", "json")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好的。很好。"}\n{"text": \n', encoding="utf-8")
    proc = run_module("data_tools.preprocess", "--input", zh["sample"], bad, "--tokenizer", zh["hf"], "--output-prefix", prefix,
                      "--workers", "1", "--word-segmenter", "jieba", check=False)
    assert proc.returncode != 0 and "bad.jsonl" in proc.stderr
    assert {ext: Path(f"{prefix}.{ext}").read_bytes() for ext in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "shard.bin", "shard.idx", "shard.json", "shard.words"]


def test_merge_keeps_word_boundaries_byte_for_byte_and_inspect_verifies_them(zh, tmp_path):
    args = ["--input", zh["sample"], "--tokenizer", zh["hf"], "--workers", "1", "--word-segmenter", "jieba", "--user-dict", zh["user_dict"]]
    # small work units would be needed to split one 3 KB file; two files split the input instead
    halves = [write_documents(SAMPLE_DOCUMENTS[:5], tmp_path / "a.txt"), write_documents(SAMPLE_DOCUMENTS[5:], tmp_path / "b.txt")]
    args[1] = halves[0]
    args.insert(2, halves[1])
    run_module("data_tools.preprocess", *args, "--output-prefix", tmp_path / "whole")
    for i in range(2):
        run_module("data_tools.preprocess", *args, "--output-prefix", tmp_path / f"part{i}", "--shard-index", i, "--num-shards", 2)
    run_module("data_tools.merge", "--inputs", tmp_path / "part0", tmp_path / "part1", "--output-prefix", tmp_path / "merged")
    assert IndexedDataset(tmp_path / "part0").num_tokens % 8  # the concatenation crosses a byte boundary
    for ext in ("bin", "idx", "words"):
        assert (tmp_path / f"merged.{ext}").read_bytes() == (tmp_path / f"whole.{ext}").read_bytes(), ext
    merged, whole = read_metadata(tmp_path / "merged"), read_metadata(tmp_path / "whole")
    assert merged["word_segmentation"] == whole["word_segmentation"]
    out = run_module("data_tools.inspect", tmp_path / "merged", "--verify", "--json").stdout
    assert {"no word crosses a sentence", "continuations are CJK tokens after CJK tokens", "word continuation count"} <= set(
        json.loads(out)["verified"])


def test_merge_refuses_mixing_segmented_and_unsegmented_shards(zh, tmp_path):
    proc = run_module("data_tools.merge", "--inputs", zh["shard"], zh["shard_none"], "--output-prefix", tmp_path / "m", check=False)
    assert proc.returncode != 0 and "different word segmentations" in proc.stderr


def copy_shard(src: Path, dst: Path) -> Path:
    for ext in ("bin", "idx", "json", "words"):
        if Path(f"{src}.{ext}").exists():
            Path(f"{dst}.{ext}").write_bytes(Path(f"{src}.{ext}").read_bytes())
    return dst


def flip_bit(prefix: Path, token: int) -> None:
    path = words_path(prefix)
    data = bytearray(path.read_bytes())
    data[word_boundaries.HEADER_SIZE + token // 8] ^= 1 << (token % 8)
    path.write_bytes(bytes(data))


def test_inspect_verify_catches_corrupt_truncated_and_leftover_word_boundaries(zh, tmp_path):
    ds = IndexedDataset(zh["shard"])
    tokens = np.asarray(ds.tokens)
    second_sentence = int(ds.sequence_pointers[1]) // ds.dtype.itemsize
    english = next(i for i in range(1, len(tokens)) if zh["tokens"][tokens[i]].isascii() and zh["tokens"][tokens[i]].isalpha()
                   and zh["tokens"][tokens[i - 1]].isascii())
    cjk_start = next(i for i in range(1, len(tokens)) if is_cjk(zh["tokens"][tokens[i]][0]) and len(zh["tokens"][tokens[i]]) == 1
                     and i != second_sentence and not WordFlags(zh["shard"], len(tokens)).window(i, 1)[0])
    cases = {
        "sentence": (lambda p: flip_bit(p, second_sentence), "starts with a word continuation"),
        "english": (lambda p: flip_bit(p, english), "only CJK characters join words"),
        "count": (lambda p: flip_bit(p, cjk_start), "word continuations"),
        "truncated": (lambda p: words_path(p).write_bytes(words_path(p).read_bytes()[:-1]), "truncated or corrupt"),
        "missing": (lambda p: words_path(p).unlink(), "file not found"),
    }
    for name, (damage, message) in cases.items():
        prefix = copy_shard(zh["shard"], tmp_path / name)
        run_module("data_tools.inspect", prefix, "--verify")
        damage(prefix)
        proc = run_module("data_tools.inspect", prefix, "--verify", check=False)
        assert proc.returncode != 0 and message in proc.stderr and str(prefix) in proc.stderr, (name, proc.stderr)
    # a .words beside a shard whose .json records no segmentation is a leftover: reported, and never read
    prefix = copy_shard(zh["shard_none"], tmp_path / "leftover")
    words_path(prefix).write_bytes(words_path(zh["shard"]).read_bytes())
    proc = run_module("data_tools.inspect", prefix, "--verify", check=False)
    assert proc.returncode != 0 and "leftover" in proc.stderr
    # preprocessing without a segmenter over a segmented prefix removes its .words with the old data
    prefix = copy_shard(zh["shard"], tmp_path / "rewritten")
    run_module("data_tools.preprocess", "--input", zh["sample"], "--tokenizer", zh["hf"], "--output-prefix", prefix, "--workers", "1")
    assert not words_path(prefix).exists()


# -- masking -----------------------------------------------------------------------------------


def masking_vocab(tokens: list[str]) -> MaskingVocab:
    special = [tokens.index(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")]
    return MaskingVocab.build(len(tokens), tokens.index("[MASK]"), special, continuation_table(tokens))


def reference_words(ids: np.ndarray, cont: np.ndarray, tokens: list[str]) -> list[list[int]]:
    """Words as lists of maskable positions: a ## piece joins a maskable left neighbour; a flagged token joins the
    word of its left neighbour whatever that is ([UNK] included), but nothing joins across [CLS]/[SEP]/[PAD]."""
    structural = {tokens.index(t) for t in ("[PAD]", "[CLS]", "[SEP]")}
    unk = tokens.index("[UNK]")
    words: list[list[int]] = []
    current: list[int] | None = None  # the open word, maybe still without a maskable token
    for i, t in enumerate(ids.tolist()):
        if t in structural:
            current = None
            continue
        maskable = t != unk
        joins = current is not None and (bool(cont[i]) or (tokens[t].startswith("##") and maskable and i > 0 and ids[i - 1] != unk))
        if not joins:
            current = []
            words.append(current)
        if maskable:
            current.append(i)
    return [w for w in words if w]


def windows(ds: IndexedDataset, flags: WordFlags, num: int, seed: int, cls: int, sep: int, pad: int):
    """[CLS] A [SEP] B [SEP] [PAD]... cut from random offsets, so words are cut at both ends as truncation cuts them."""
    rng = np.random.default_rng(seed)
    n = ds.num_tokens
    for _ in range(num):
        len_a = int(rng.integers(1, SEQ_LEN - 4))
        len_b = int(rng.integers(1, SEQ_LEN - 2 - len_a))
        a, b = int(rng.integers(0, n - len_a)), int(rng.integers(0, n - len_b))
        if rng.random() < 0.3:  # B right after A: the word at the cut crosses the [SEP] in the text
            b = min(a + len_a, n - len_b)
        ids = np.full(SEQ_LEN, pad, dtype=np.int64)
        cont = np.zeros(SEQ_LEN, dtype=bool)
        ids[0], ids[1 + len_a], ids[2 + len_a + len_b] = cls, sep, sep
        ids[1 : 1 + len_a] = ds.tokens[a : a + len_a]
        ids[2 + len_a : 2 + len_a + len_b] = ds.tokens[b : b + len_b]
        cont[1 : 1 + len_a] = flags.window(a, len_a)
        cont[2 + len_a : 2 + len_a + len_b] = flags.window(b, len_b)
        yield ids, cont


def test_whole_chinese_and_english_words_are_masked_at_15_percent_and_no_word_crosses_a_sep(zh):
    tokens = zh["tokens"]
    vocab = masking_vocab(tokens)
    ds = IndexedDataset(zh["shard"])
    flags = WordFlags(zh["shard"], ds.num_tokens)
    cls, sep, pad = (tokens.index(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    rng = np.random.default_rng(0)
    partial = masked = candidates = multi_cjk = multi_english = crossings = split_at_sep = 0
    for ids, cont in windows(ds, flags, 4000, seed=1, cls=cls, sep=sep, pad=pad):
        _, labels = mask_tokens(ids, vocab, rng, mask_prob=0.15, max_predictions=SEQ_LEN, whole_word=True, word_continues=cont)
        chosen = labels != IGNORE_INDEX
        for word in reference_words(ids, cont, tokens):
            flags_of_word = chosen[word]
            partial += int(flags_of_word.any() and not flags_of_word.all())
            if len(word) > 1 and flags_of_word.all():
                multi_cjk += int(bool(cont[word[1]]))
                multi_english += int(tokens[ids[word[1]]].startswith("##"))
        masked += int(chosen.sum())
        candidates += int((~vocab.is_special[ids]).sum())
        first_b = int(np.flatnonzero(ids == sep)[0]) + 1
        if cont[first_b] and not vocab.is_special[ids[first_b - 2]]:  # the text's word continues across the [SEP]
            crossings += 1
            split_at_sep += int(chosen[first_b - 2] != chosen[first_b])
    assert partial == 0
    assert multi_cjk > 1000 and multi_english > 50  # whole words of both kinds were masked: the checks were not vacuous
    assert abs(masked / candidates - 0.15) < 0.005, masked / candidates
    # the two sides of a [SEP] are separate words: masked independently, so they sometimes differ
    assert crossings > 100 and split_at_sep > 0.05 * crossings, (crossings, split_at_sep)


def test_replacements_are_per_token_inside_a_chinese_word(zh):
    """80/10/10 is drawn per token (Google's and HFL's choice): a masked two-character word is sometimes [MASK] + kept."""
    tokens = zh["tokens"]
    vocab = masking_vocab(tokens)
    ds = IndexedDataset(zh["shard"])
    flags = WordFlags(zh["shard"], ds.num_tokens)
    cls, sep, pad = (tokens.index(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    rng = np.random.default_rng(0)
    mixed = whole_mask = 0
    for ids, cont in windows(ds, flags, 2000, seed=2, cls=cls, sep=sep, pad=pad):
        out, labels = mask_tokens(ids, vocab, rng, mask_prob=0.15, max_predictions=SEQ_LEN, whole_word=True, word_continues=cont)
        for word in reference_words(ids, cont, tokens):
            if len(word) == 2 and cont[word[1]] and labels[word[0]] != IGNORE_INDEX:
                as_mask = out[word] == vocab.mask_id
                whole_mask += int(as_mask.all())
                mixed += int(as_mask.any() and not as_mask.all())
    assert mixed > 0.2 * (mixed + whole_mask), (mixed, whole_mask)  # per word it would be 0; per token 2*0.8*0.2 = 32%


def test_english_sequences_mask_exactly_as_before_when_given_no_chinese_words():
    """word_continues all False is the old ## rule, bit for bit (samples of English shards must not change)."""
    vocab_tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(300)] + [f"##p{i}" for i in range(300)]
    vocab = masking_vocab(vocab_tokens)
    rng = np.random.default_rng(5)
    for seed in range(300):
        ids = rng.integers(0, len(vocab_tokens), size=SEQ_LEN)
        ids[0], ids[-1] = 2, 3
        old = mask_tokens(ids, vocab, np.random.default_rng(seed), mask_prob=0.15, max_predictions=20, whole_word=True)
        new = mask_tokens(ids, vocab, np.random.default_rng(seed), mask_prob=0.15, max_predictions=20, whole_word=True,
                          word_continues=np.zeros(SEQ_LEN, bool))
        for a, b in zip(old, new, strict=True):
            np.testing.assert_array_equal(a, b)


# -- the dataset -----------------------------------------------------------------------------


def dataset(prefix: Path, tokens: list[str], whole_word: bool = True, **kwargs) -> PretrainingDataset:
    ids = {t: tokens.index(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")}
    return PretrainingDataset(
        prefix, vocab_size=len(tokens), cls_id=ids["[CLS]"], sep_id=ids["[SEP]"], pad_id=ids["[PAD]"], mask_id=ids["[MASK]"],
        unk_id=ids["[UNK]"], max_seq_length=SEQ_LEN, max_predictions_per_seq=SEQ_LEN, seed=7, whole_word_mask=whole_word,
        is_continuation=continuation_table(tokens), is_cjk_token=word_boundaries.cjk_token_table(tokens), **kwargs,
    )


def test_the_dataset_hands_masking_the_flags_of_exactly_the_tokens_it_placed(tmp_path, monkeypatch):
    """A shard whose flag is a function of the token (id odd): every sample's flags must be that function of its tokens."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(0x4E00 + i) for i in range(200)]
    rng = np.random.default_rng(0)
    prefix = tmp_path / "shard"
    writer = IndexedDatasetWriter(prefix, np.uint16, sidecars=[words_path(prefix)])
    bits = word_boundaries.WordFlagsWriter(writer.temp_path(words_path(prefix)))
    for _ in range(60):
        lengths = rng.integers(3, 30, size=int(rng.integers(2, 8)))
        ids = rng.integers(5, len(tokens), size=int(lengths.sum()))
        writer.add_documents(ids, lengths, [len(lengths)])
        bits.add(ids % 2 == 1)
    bits.close()
    writer.finalize({"tokenizer": {"vocab_sha256": "0" * 64, "vocab_size": len(tokens)}, "word_segmentation": {"segmenter": "jieba"}})
    seen = []
    import bert_ds.data.pretraining as pretraining

    def recording(input_ids, *args, word_continues=None, **kwargs):
        seen.append((input_ids.copy(), word_continues))
        return mask_tokens(input_ids, *args, word_continues=word_continues, **kwargs)

    monkeypatch.setattr(pretraining, "mask_tokens", recording)
    ds = dataset(prefix, tokens)
    samples = [ds[i] for i in range(300)]
    for (ids, cont), sample in zip(seen, samples, strict=True):
        text = ids >= 5
        np.testing.assert_array_equal(cont[text], ids[text] % 2 == 1)
        assert not cont[~text].any()  # [CLS], [SEP], [PAD]
        chosen = sample["labels"].numpy() != IGNORE_INDEX
        assert all(chosen[w].all() or not chosen[w].any() for w in reference_words(ids, cont, tokens))
    # without whole-word masking the flags are not read: samples equal those of the same shard without them
    plain = dataset(prefix, tokens, whole_word=False)
    (tmp_path / "shard.words").unlink()
    meta = json.loads(metadata_path(prefix).read_text())
    del meta["word_segmentation"]
    metadata_path(prefix).write_text(json.dumps(meta))
    for i in range(50):
        for key, value in dataset(prefix, tokens, whole_word=False)[i].items():
            assert (plain[i][key] == value).all()


def test_whole_word_masking_of_chinese_shards_without_word_boundaries_stops_naming_the_shard(zh, tmp_path):
    tokens = zh["tokens"]
    with pytest.raises(WordBoundaryError, match=r"sample_none: data.whole_word_mask is true and this shard holds [\d,]+ Chinese") as e:
        dataset(zh["shard_none"], tokens)
    assert "--word-segmenter jieba" in str(e.value)
    # no metadata (Megatron's tools): the tokens are scanned instead
    bare = copy_shard(zh["shard_none"], tmp_path / "bare")
    metadata_path(bare).unlink()
    with pytest.raises(WordBoundaryError, match="bare: data.whole_word_mask is true and this shard holds Chinese"):
        dataset(bare, tokens)
    dataset(zh["shard_none"], tokens, whole_word=False)  # character-level masking is still there when asked for
    assert dataset(zh["shard"], tokens)[0]["input_ids"].shape == (SEQ_LEN,)


def test_english_shards_need_no_word_boundaries(pretraining_shards):
    from bert_ds.data.vocab import load_tokenizer, vocab_tokens

    tokens = vocab_tokens(load_tokenizer(pretraining_shards["vocab"]))
    ds = dataset(pretraining_shards["train"], tokens)
    assert all(s.words is None for s in ds._shards)


# -- training --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_chinese_bert_continued_with_whole_word_masking_learns(zh, tmp_path):
    """Continued pretraining from the Chinese BERT directory (model.init_from) on segmented shards: eval accuracy
    on whole-word-masked held-out words ends far above always guessing the most frequent token."""

    d = zh["dir"]
    run_module("data_tools.preprocess", "--input", zh["learn"], "--tokenizer", zh["hf"], "--output-prefix", d / "learn",
               "--valid-fraction", "0.05", "--workers", "2", "--word-segmenter", "jieba")
    shards = {"train": d / "learn", "valid": d / "learn_valid"}
    # a run that asks for whole-word masking on unsegmented Chinese shards stops before training, naming them
    run_module("data_tools.preprocess", "--input", zh["learn"], "--tokenizer", zh["hf"], "--output-prefix", d / "plain", "--workers", "1")
    bad = write_run_config(tmp_path / "bad.yaml", {"train": d / "plain", "valid": ""}, tmp_path / "bad",
                           model={"init_from": str(zh["hf"]), "overrides": {}}, data={"whole_word_mask": True, "valid_prefix": ""})
    proc = run_module("bert_ds.train", bad, check=False)
    assert proc.returncode != 0 and "plain: data.whole_word_mask is true" in proc.stderr, proc.stderr[-2000:]

    config = write_run_config(
        tmp_path / "run.yaml", shards, tmp_path / "run", model={"init_from": str(zh["hf"]), "overrides": {}},
        data={"whole_word_mask": True, "max_seq_length": SEQ_LEN},
        train={"max_steps": 300, "micro_batch_size": 32, "log_interval": 50}, optimizer={"name": "adamw", "lr": 3e-3},
        scheduler={"name": "linear", "warmup_steps": 30}, eval={"interval_steps": 300, "num_samples": 256},
    )
    result = train_runs((config,)).results[0]
    unigram = best_unigram_accuracy(shards["train"])
    mlm_acc = result["eval_metrics"]["eval/mlm_acc"]
    print(f"Chinese whole-word masking: eval masked-token accuracy {mlm_acc:.3f}, most frequent token {unigram:.3f}")
    assert mlm_acc > max(2.5 * unigram, unigram + 0.15), (mlm_acc, unigram)  # measured: 0.319 vs 0.091
