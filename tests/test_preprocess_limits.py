"""Inputs that used to blow up preprocessing: one long line, a file without blank lines, a bad line deep in a file.

Reading stays linear in the input and its memory flat: every work unit reads its own byte range plus a bounded
overhang, documents (and lines, in one-document-per-line inputs) longer than ``--max-document-bytes`` are skipped
and counted, never held whole. Time and memory are compared as ratios measured in the same run (8 MB vs 64 MB), so
a busy machine does not fail them; absolute numbers for a 1 GB line are in ``bench/preprocess_limits.py``.
"""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc
from pathlib import Path

import pytest

from data_tools import sources
from tests.conftest import last_json, run_module

MB = 1_000_000
SENTENCE = b"The quick brown fox jumps over the lazy dog near the river bank. "


def single_line(path: Path, size: int) -> Path:
    path.write_bytes((SENTENCE * (size // len(SENTENCE) + 1))[:size])
    return path


def no_blank_line(path: Path, size: int) -> Path:
    """One sentence per line and no blank line: in plain-text mode, one document the size of the file."""
    line = SENTENCE.rstrip() + b"\n"
    path.write_bytes((line * (size // len(line) + 1))[:size])
    return path


def read_all(path: Path, one_doc_per_line: bool = False) -> tuple[int, sources.ReadStats]:
    """Every unit of ``path`` read as preprocess reads it; (documents yielded, stats)."""
    stats, docs = sources.ReadStats(), 0
    for unit in sources.plan_units([path], one_doc_per_line):
        for _ in sources.read_unit(unit, "text", stats):
            docs += 1
    return docs, stats


def seconds(fn, budget_s: float = 0.3) -> float:
    """The fastest of as many calls as fit in ``budget_s`` (at least 3): robust to a busy machine."""
    best, calls, t_end = float("inf"), 0, time.perf_counter() + budget_s
    while calls < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("make", [single_line, no_blank_line], ids=["single-line", "no-blank-line"])
def test_reading_a_long_line_or_a_file_without_blank_lines_is_linear_in_time_and_flat_in_memory(make, tmp_path, monkeypatch):
    # both files hold one document far over the cap: it is skipped and counted, not read whole
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 1 << 20, raising=False)
    small, big = make(tmp_path / "small.txt", 8 * MB), make(tmp_path / "big.txt", 64 * MB)
    t_small, t_big = seconds(lambda: read_all(small)), seconds(lambda: read_all(big))
    m_small, m_big = peak_bytes(lambda: read_all(small)), peak_bytes(lambda: read_all(big))
    print(f"\n{make.__name__}: 8 MB {t_small:.3f} s {m_small / MB:.1f} MB peak, 64 MB {t_big:.3f} s {m_big / MB:.1f} MB peak")
    # linear would be 8x; quadratic (every unit re-reading the line to its end) was ~64x
    assert t_big / t_small < 20, (t_small, t_big)
    # flat: the big file's peak is about the small file's (it was 8x: the whole document in memory)
    assert m_big / m_small < 2, (m_small, m_big)
    assert m_big < 8 * MB, m_big
    docs, stats = read_all(big)
    assert docs == 0 and stats.too_long == 1, (docs, stats)


def preprocess(inputs: list[Path], vocab_dir: Path, prefix: Path, *extra: str, env: dict | None = None):
    proc = run_module("data_tools.preprocess", "--input", *inputs, "--tokenizer", vocab_dir, "--output-prefix", prefix, "--workers", "1",
                      *extra, env=env)
    return last_json(proc.stdout), proc


def documents_of(path: Path) -> list[bytes]:
    return [d for d in path.read_bytes().split(b"\n\n") if d.strip()]


@pytest.mark.parametrize("units", [None, "3000"], ids=["1MiB-units", "3000-byte-units"])
def test_documents_over_the_cap_are_skipped_and_counted_and_every_other_document_is_written(corpus_dir, vocab_dir, tmp_path, units):
    docs = documents_of(corpus_dir / "a.txt")[:60]
    no_blank = (SENTENCE.rstrip() + b"\n") * 500  # 32,500 bytes of lines with no blank line between them
    one_line = SENTENCE * 800 + b"\n"  # one 51,201-byte line
    pieces = docs[:20] + [no_blank] + docs[20:40] + [one_line] + docs[40:]
    text = b"\n\n".join(p.rstrip(b"\n") for p in pieces) + b"\n"
    (tmp_path / "mixed.txt").write_bytes(text)
    (tmp_path / "clean.txt").write_bytes(b"\n\n".join(p.rstrip(b"\n") for p in docs) + b"\n")
    env = {"BERT_DS_UNIT_BYTES": units} if units else None
    cap = ["--max-document-bytes", "20000"]
    summary, proc = preprocess([tmp_path / "mixed.txt"], vocab_dir, tmp_path / "mixed", *cap, env=env)
    two, _ = preprocess([tmp_path / "mixed.txt"], vocab_dir, tmp_path / "two", *cap, "--workers", "2", env=env)
    clean, _ = preprocess([tmp_path / "clean.txt"], vocab_dir, tmp_path / "clean", *cap, env=env)

    assert summary["docs_skipped"]["too_long"] == 2 and summary["docs_in"] == 62, summary
    assert summary["docs_in"] == summary["docs_written"] + sum(summary["docs_skipped"].values())
    offsets = [text.index(no_blank.rstrip(b"\n")), text.index(one_line.rstrip(b"\n"))]
    assert summary["too_long_examples"] == [f"{tmp_path / 'mixed.txt'} byte {o}" for o in offsets]
    assert "skipped 2 document(s) longer than --max-document-bytes 20,000" in proc.stderr and "--one-doc-per-line" in proc.stderr
    # nothing around them is lost: the same shard as the corpus without them, with 1 or 2 workers
    for ext in ("bin", "idx"):
        assert (tmp_path / f"mixed.{ext}").read_bytes() == (tmp_path / f"clean.{ext}").read_bytes() == (tmp_path / f"two.{ext}").read_bytes()
    assert two["docs_skipped"] == summary["docs_skipped"] and clean["docs_skipped"]["too_long"] == 0
    assert json.loads((tmp_path / "mixed.json").read_text())["options"]["max_document_bytes"] == 20000


def test_jsonl_and_gzip_lines_over_the_cap_are_skipped_and_counted(vocab_dir, tmp_path):
    records = [json.dumps({"text": f"Document number {i}. It has two sentences."}) for i in range(50)]
    huge = json.dumps({"text": "Words without end. " * 3000})
    lines = records[:25] + [huge] + records[25:]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    (tmp_path / "clean.jsonl").write_text("\n".join(records) + "\n")
    clean, _ = preprocess([tmp_path / "clean.jsonl"], vocab_dir, tmp_path / "clean")
    for name in ("d.jsonl", "g.jsonl.gz"):
        summary, _ = preprocess([tmp_path / name], vocab_dir, tmp_path / name, "--max-document-bytes", "10000")
        assert summary["docs_in"] == 51 and summary["docs_skipped"]["too_long"] == 1 and summary["docs_written"] == 50, summary
        offset = len("\n".join(records[:25])) + 1
        assert summary["too_long_examples"] == [f"{tmp_path / name} byte {offset}"]
        assert (tmp_path / f"{name}.bin").read_bytes() == (tmp_path / "clean.bin").read_bytes()


def test_a_bad_json_line_deep_in_a_file_is_reported_without_reading_the_file_into_memory(tmp_path):
    good = (json.dumps({"text": "A fine line of text. Another sentence."}) + "\n").encode()
    path = tmp_path / "deep.jsonl"
    path.write_bytes(good * (24 * MB // len(good)) + b'{"text": broken\n')
    bad_line = 24 * MB // len(good) + 1
    unit = sources.plan_units([path], False)[-1]  # the unit holding the bad line
    stats = sources.ReadStats()

    def read() -> None:
        with pytest.raises(sources.InputError, match=rf"{path}:{bad_line}: invalid JSON"):
            for _ in sources.read_unit(unit, "text", stats):
                pass

    # the old error path read the 24 MB before the line into memory to count its newlines
    assert peak_bytes(read) < 4 * MB


def oracle_documents(data: bytes, limit: int, one_doc_per_line: bool) -> tuple[list[bytes], list[int]]:
    """What the readers must return, from the whole file at once: (documents kept, start offsets of those over the cap)."""
    kept, too_long, pos = [], [], 0
    current, start = [], -1
    for line in data.splitlines(keepends=True):
        blank = len(line) <= limit and not line.strip()
        if one_doc_per_line:
            if len(line) > limit:
                too_long.append(pos)
            elif not blank:
                kept.append(line.rstrip(b"\r\n"))
        elif blank:
            if current:
                kept.append(b"".join(current)) if sum(map(len, current)) <= limit else too_long.append(start)
            current = []
        else:
            if not current:
                start = pos
            current.append(line)
        pos += len(line)
    if current:
        kept.append(b"".join(current)) if sum(map(len, current)) <= limit else too_long.append(start)
    return kept, too_long


def random_text(rng, size: int) -> bytes:
    pieces = [b"word " * 3 + b"\n", b"\n", b"  \t\n", b"\r\n", b" " * 70 + b"\n", b"x" * 90 + b"\n", b"long " * 40, b"y" * 300 + b"\n", b" " * 200]
    out = bytearray()
    while len(out) < size:
        out += pieces[rng.integers(len(pieces))]
    return bytes(out)


@pytest.mark.parametrize("seed", range(6))
def test_readers_agree_with_reading_the_whole_file_at_once_for_any_unit_size_and_cap(tmp_path, monkeypatch, seed):
    """Blank lines, whitespace lines longer than the cap, long lines, CRLF, no final newline: every unit size gives the documents
    (and the skipped ones, in order) that one pass over the whole file gives."""
    import numpy as np

    rng = np.random.default_rng(seed)
    data = (b" " * 150 + b"\n" if seed % 2 else b"") + random_text(rng, 6000)  # odd seeds: a first line one byte over the 150 cap
    path = tmp_path / "t.txt"
    path.write_bytes(data)
    for one_doc_per_line in (False, True):
        for limit in (1, 64, 150, 400, 100_000):
            expected = oracle_documents(data, limit, one_doc_per_line)
            for unit_bytes in (1, 7, 64, 333, 10_000):
                monkeypatch.setattr(sources, "UNIT_BYTES", unit_bytes)
                stats, docs = sources.ReadStats(), []
                for unit in sources.plan_units([path], one_doc_per_line):
                    docs += [text.encode() for text, _ in sources.read_unit(unit, "text", stats, limit)]
                where = [int(w.rsplit(" ", 1)[1]) for w in stats.too_long_at]
                assert (docs, stats.too_long, where) == (expected[0], len(expected[1]), expected[1][:5]), (one_doc_per_line, limit, unit_bytes)
