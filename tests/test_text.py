"""Sentence splitting and normalization."""

from __future__ import annotations

import pytest

from data_tools.text import document_sentences, normalize_document, split_sentences


@pytest.mark.parametrize(
    "paragraph, expected",
    [
        ("It rains. We stay in.", ["It rains.", "We stay in."]),
        ("Dr. Smith met Mr. Jones. They talked.", ["Dr. Smith met Mr. Jones.", "They talked."]),
        ("Use a list, e.g. Python lists. Or tuples.", ["Use a list, e.g. Python lists.", "Or tuples."]),
        ("Pi is 3.14 roughly. Version 3.11. Then more.", ["Pi is 3.14 roughly.", "Version 3.11.", "Then more."]),
        ("See https://example.com/a.html today. Done.", ["See https://example.com/a.html today.", "Done."]),
        ("J. R. R. Tolkien wrote it. Fine.", ["J. R. R. Tolkien wrote it.", "Fine."]),
        ("The U.S. Army left. Then peace.", ["The U.S. Army left.", "Then peace."]),
        ('He said "Stop." Then left.', ['He said "Stop."', "Then left."]),
        ("Really?! Yes. (Maybe.) No.", ["Really?!", "Yes.", "(Maybe.)", "No."]),
        ("Wait... Now go.", ["Wait...", "Now go."]),
        ("lower case after a dot. does not split", ["lower case after a dot. does not split"]),
        ("机器学习很有趣。我们今天训练模型！你准备好了吗？", ["机器学习很有趣。", "我们今天训练模型！", "你准备好了吗？"]),
        ("「你好。」他说。", ["「你好。」", "他说。"]),
        ("", []),
    ],
)
def test_split_sentences(paragraph, expected):
    assert split_sentences(paragraph) == expected


# Shapes found in zh-fortunes and zh-debian-reference (reworded here): each of the first five was cut wrongly before
@pytest.mark.parametrize(
    "paragraph, expected",
    [
        # ASCII closing bracket after 。 (zh-debian-reference: 13 sentences that were a lone ")")
        ("(发布时会省略部分格式。)然后继续阅读。", ["(发布时会省略部分格式。)", "然后继续阅读。"]),
        # closing title mark and a space before the closing quote
        ("殊異乎公路。》 《詩經》彼汾一方。", ["殊異乎公路。》", "《詩經》彼汾一方。"]),
        ("连续发生的奇迹。 」 -- 《日常》", ["连续发生的奇迹。 」", "-- 《日常》"]),
        # what follows cannot start a sentence: the mark ended a parenthesis or a quote, not the sentence
        ("设置 “multiple”（危险！），从而加速硬盘访问。", ["设置 “multiple”（危险！），从而加速硬盘访问。"]),
        ("请在这种前提下阅读下列内容。）。下一句。", ["请在这种前提下阅读下列内容。）。", "下一句。"]),
        # an ASCII quote closes when one is open in the line, and opens the next sentence otherwise
        ('言："李君令我目愈，谢以一豚。" 目痛小疾。', ['言："李君令我目愈，谢以一豚。"', "目痛小疾。"]),
        ('挂载位置。"/dev/sda" 指向设备。', ["挂载位置。", '"/dev/sda" 指向设备。']),
        # full-width quotes and brackets after the mark, Latin text after it
        ("他问：“几点开始？”秘书回答。Debian 很稳定。", ["他问：“几点开始？”", "秘书回答。", "Debian 很稳定。"]),
        # ；joins the halves of a parallel sentence, … is a pause: neither ends a sentence inside a line
        ("欲做精金美玉的人品，定从烈火中煅来； 思立掀天揭地的事功，须向薄冰上履过。",
         ["欲做精金美玉的人品，定从烈火中煅来； 思立掀天揭地的事功，须向薄冰上履过。"]),
        ("这个…我们研究的是原理……我的计算机没有问题。", ["这个…我们研究的是原理……我的计算机没有问题。"]),
    ],
)
def test_split_chinese_sentences(paragraph, expected):
    assert split_sentences(paragraph) == expected


def test_an_ascii_quote_count_restarts_on_every_line():
    # the odd quote of line 1 must not make line 2's quote a closing one
    assert document_sentences('他说"好\n结束。"下一句" 在这里。') == ['他说"好', "结束。", '"下一句" 在这里。']


def test_lines_are_paragraphs_and_end_sentences():
    assert document_sentences("First line\nSecond one. Third.\n\n  \nLast") == ["First line", "Second one.", "Third.", "Last"]


def test_normalize_maps_odd_whitespace_to_space_and_composes_unicode():
    text = "a\tb\x0bc\u00a0d\u2028e\r\nf\u3000g" + "e\u0301"
    out = normalize_document(text)
    assert out == "a b c d e\nf g" + "\u00e9"
