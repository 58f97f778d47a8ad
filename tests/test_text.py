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


def test_lines_are_paragraphs_and_end_sentences():
    assert document_sentences("First line\nSecond one. Third.\n\n  \nLast") == ["First line", "Second one.", "Third.", "Last"]


def test_normalize_maps_odd_whitespace_to_space_and_composes_unicode():
    text = "a\tb\x0bc\u00a0d\u2028e\r\nf\u3000g" + "e\u0301"
    out = normalize_document(text)
    assert out == "a b c d e\nf g" + "\u00e9"
