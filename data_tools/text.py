"""Text normalization and sentence splitting.

Why our own splitter: NLTK's punkt is not a dependency here and, like pysbd or spaCy,
runs well under 1 MB/s; the preprocessing target is several MB/s per core. This one is a
single compiled regex plus a few look-ups per candidate boundary (~50 MB/s), and handles
what matters for BERT's sentence pairs: abbreviations ("e.g.", "Dr.", "U.S."), initials,
decimals and version numbers, URLs and file names (no space after the dot), ellipses,
quotes and brackets after the full stop, and Chinese/Japanese 。！？ which need no space.

Conventions: every line of a document is a paragraph and ends a sentence (the
one-sentence-per-line format of Google's BERT data is a special case).
"""

from __future__ import annotations

import re
import unicodedata

# Words that end with a full stop without ending the sentence (compared lower-cased, without the dot).
ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al approx dept est fig figs eq eqs
    no nos vol vols p pp ch sec sect ed eds rev gen col lt sgt capt cmdr inc ltd co corp
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun
    u.s u.k u.n a.m p.m ph.d b.sc m.sc resp ref refs viz ca
    """.split()
)

# Terminal punctuation, optional closing quotes/brackets, then whitespace (Latin scripts),
# or a CJK full stop / exclamation / question mark, which needs no whitespace after it.
_CANDIDATE = re.compile(r"""([.!?…]+)(["'”’»)\]]*)(\s+)|([。！？]+[」』”’）]*)\s*""")
_NEXT_OPENERS = "\"'“‘«([¿¡"
# Python's whitespace that BERT's normalizer would delete or keep as a character rather
# than split on; mapped to a plain space so word splitting agrees with the tokenizer.
_ODD_WHITESPACE = re.compile(r"[^\S\n ]+")


def normalize_document(text: str) -> str:
    """NFC, unify line endings, map tabs and exotic spaces to ' '."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _ODD_WHITESPACE.sub(" ", text)


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph (no newlines) into sentences; whitespace inside is kept as is."""
    cuts = []
    for m in _CANDIDATE.finditer(paragraph):
        if m.group(4) is not None:  # CJK terminal punctuation
            cuts.append((m.start(4) + len(m.group(4)), m.end()))
            continue
        end = m.end()
        if end >= len(paragraph) or not _starts_sentence(paragraph, end):
            continue
        if m.group(1) == "." and _is_abbreviation(paragraph, m.start(1)):
            continue
        cuts.append((m.start(3), end))
    if not cuts:
        s = paragraph.strip()
        return [s] if s else []
    sentences, start = [], 0
    for cut_start, cut_end in cuts:
        s = paragraph[start:cut_start].strip()
        if s:
            sentences.append(s)
        start = cut_end
    s = paragraph[start:].strip()
    if s:
        sentences.append(s)
    return sentences


def _starts_sentence(text: str, i: int) -> bool:
    """A new sentence starts with an upper-case letter, a digit, or an uncased script."""
    c = text[i]
    if c in _NEXT_OPENERS and i + 1 < len(text):
        c = text[i + 1]
    if c.isupper() or c.isdigit():
        return True
    # letters of scripts without case (CJK, Arabic, Hebrew, ...) can start a sentence
    return c.isalpha() and not c.islower()


def _is_abbreviation(text: str, dot: int) -> bool:
    start = dot
    while start > 0 and not text[start - 1].isspace() and text[start - 1] not in "([\"'“‘":
        start -= 1
    word = text[start:dot]
    if not word:
        return False
    lower = word.lower()
    if lower in ABBREVIATIONS:
        return True
    # initials ("J. R. R. Tolkien") and dotted acronyms ("U.S.A.")
    if len(word) == 1 and word.isalpha():
        return True
    parts = [part for part in word.split(".") if part]
    return "." in word and all(part.isalpha() and len(part) <= 2 for part in parts)


def document_sentences(text: str) -> list[str]:
    """All sentences of a normalized document, in order: lines are paragraphs."""
    out: list[str] = []
    for line in text.split("\n"):
        if line and not line.isspace():
            out.extend(split_sentences(line))
    return out
