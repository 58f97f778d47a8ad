"""Input discovery and document reading, cut into independent work units.

Every input is cut into *work units* in one fixed order that depends only on the inputs
(never on ``--workers`` or ``--num-shards``). Workers process units in parallel, the writer
appends their results in unit order, and SLURM array task ``i`` of ``n`` takes a
contiguous run of units. So 1 worker, 2 workers, and ``n`` shards merged in order all
produce the same bytes.

Plain text and plain JSONL are cut by byte ranges: a unit owns every document that
*starts* inside its range (a document that crosses the end is read to its end; the next
unit skips it). Compressed files, parquet row groups and Hugging Face dataset row ranges
are units of their own.

Hostile inputs stay linear and flat: a document (a line, where every line is one) longer
than ``max_document_bytes`` is skipped and counted (``ReadStats.too_long``), never held whole;
a unit looks for its first line only inside its own range and looks back at most one cap's
worth of bytes (to tell whether the line before it is blank), so a 1 GB line or a file
without blank lines is read about once, not once per unit.
"""

from __future__ import annotations

import glob
import gzip
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Nominal size of a text work unit: small enough to balance 2+ workers on a 10 MB corpus,
# large enough that per-unit overhead (a pickle round trip) is negligible.
# (BERT_DS_UNIT_BYTES overrides it: tests use tiny units to exercise unit boundaries)
UNIT_BYTES = int(os.environ.get("BERT_DS_UNIT_BYTES", 1 << 20))
HF_UNIT_ROWS = 10_000
# A document longer than this (in UTF-8 bytes; a line, where each line is a document) is skipped and counted:
# no real document comes near it, and one worker would hold it whole. `preprocess --max-document-bytes` sets it.
MAX_DOCUMENT_BYTES = 8 << 20
# bytes read at a time when looking for the end of a line
_SCAN_BYTES = 1 << 16
# at most this many skipped documents are named (file and byte offset or row) in the summary
_EXAMPLES = 5
# a NUL byte in the first block marks a binary file (the same heuristic as git and grep)
_BINARY_PROBE_BYTES = 8192


class InputError(ValueError):
    """An input cannot be read: the message names the file (and line) and the problem."""


@dataclass(frozen=True)
class WorkUnit:
    path: str
    kind: str  # text | lines | jsonl | text.gz | lines.gz | jsonl.gz | parquet | hf
    start: int  # byte offset, row group, or row
    stop: int
    size: int  # bytes (estimated for hf), for shard balancing and progress
    split: str = "auto"  # auto (by --valid-fraction) | valid (an explicit --valid-input)


@dataclass
class ReadStats:
    invalid_utf8: int = 0  # invalid byte sequences replaced by U+FFFD
    too_long: int = 0  # documents over the length cap, skipped
    too_long_at: list[str] = field(default_factory=list)  # where the first few of them start

    def skip_too_long(self, path: str, where: int | str) -> None:
        self.too_long += 1
        if len(self.too_long_at) < _EXAMPLES:
            self.too_long_at.append(f"{path} {where if isinstance(where, str) else f'byte {where}'}")


# -- discovery -------------------------------------------------------------------------------


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (recursive, sorted, hidden files skipped) and globs, in order."""
    paths: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if _is_hf_dataset_dir(p):
            paths.append(p)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                if _is_hf_dataset_dir(Path(root)):
                    paths.append(Path(root))
                    dirs[:] = []
                    continue
                paths.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
        elif any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise InputError(f"{spec}: the pattern matches no file")
            paths.extend(Path(m) for m in matches if Path(m).is_file())
        elif p.exists():
            paths.append(p)
        else:
            raise InputError(f"{spec}: no such file or directory")
    return paths


def _is_hf_dataset_dir(p: Path) -> bool:
    return p.is_dir() and (p / "state.json").exists() and (p / "dataset_info.json").exists()


def input_kind(path: Path, one_doc_per_line: bool) -> str:
    if _is_hf_dataset_dir(path):
        return "hf"
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if name.endswith(".parquet"):
        if gz:
            raise InputError(f"{path}: gzip-compressed parquet is not supported (parquet compresses internally)")
        return "parquet"
    base = "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else ("lines" if one_doc_per_line else "text")
    return base + (".gz" if gz else "")


def plan_units(paths: list[Path], one_doc_per_line: bool, split: str = "auto") -> list[WorkUnit]:
    units: list[WorkUnit] = []
    for path in paths:
        kind = input_kind(path, one_doc_per_line)
        if kind == "hf":
            units.extend(_hf_units(path, split))
        elif kind == "parquet":
            units.extend(_parquet_units(path, split))
        else:
            size = path.stat().st_size
            if kind.endswith(".gz"):
                units.append(WorkUnit(str(path), kind, 0, -1, size, split))
            else:
                for start in range(0, max(size, 1), UNIT_BYTES):
                    units.append(WorkUnit(str(path), kind, start, min(start + UNIT_BYTES, size), min(UNIT_BYTES, size - start), split))
    return units


def check_readable(path: Path, kind: str) -> None:
    """Fail early, naming the file, for unreadable or binary inputs."""
    if kind == "hf":
        return
    try:
        with open(path, "rb") as f:
            head = f.read(_BINARY_PROBE_BYTES)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if kind == "parquet":
        if head[:4] != b"PAR1":
            raise InputError(f"{path}: not a parquet file (missing PAR1 magic)")
        return
    if kind.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(_BINARY_PROBE_BYTES)
        except (OSError, EOFError) as e:
            raise InputError(f"{path}: not a readable gzip file ({e})") from None
    nul = head.find(b"\x00")
    if nul >= 0:
        raise InputError(f"{path}: looks like a binary file (NUL byte at offset {nul}), not text")


def _hf_units(path: Path, split: str) -> list[WorkUnit]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise InputError(f"{path}: a DatasetDict; pass one split's directory (e.g. {path}/train)")
    rows = len(ds)
    bytes_per_row = max(1, (ds.data.nbytes if hasattr(ds, "data") else rows) // max(rows, 1))
    return [
        WorkUnit(str(path), "hf", start, min(start + HF_UNIT_ROWS, rows), bytes_per_row * (min(start + HF_UNIT_ROWS, rows) - start), split)
        for start in range(0, rows, HF_UNIT_ROWS)
    ]


def _parquet_units(path: Path, split: str) -> list[WorkUnit]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return [WorkUnit(str(path), "parquet", g, g + 1, meta.row_group(g).total_byte_size, split) for g in range(meta.num_row_groups)]


def shard_of_units(units: list[WorkUnit], shard_index: int, num_shards: int) -> list[WorkUnit]:
    """A contiguous run of units, balanced by size: unit u goes to shard floor(start_u * n / total)."""
    total = sum(u.size for u in units) or 1
    mine, offset = [], 0
    for u in units:
        if offset * num_shards // total == shard_index:
            mine.append(u)
        offset += u.size
    return mine


# -- reading ---------------------------------------------------------------------------------


class _Utf8Decoder:
    """Decodes bytes, replacing invalid sequences with U+FFFD and counting them."""

    def __init__(self, stats: ReadStats):
        self.stats = stats

    def __call__(self, data: bytes) -> tuple[str, int]:
        try:
            return data.decode("utf-8"), 0
        except UnicodeDecodeError:
            pass
        bad = 0
        pieces, pos = [], 0
        while pos < len(data):
            try:
                pieces.append(data[pos:].decode("utf-8"))
                break
            except UnicodeDecodeError as e:
                pieces.append(data[pos : pos + e.start].decode("utf-8"))
                pieces.append("\ufffd")
                bad += 1
                pos += e.end
        self.stats.invalid_utf8 += bad
        return "".join(pieces), bad


def read_unit(unit: WorkUnit, text_key: str, stats: ReadStats, max_document_bytes: int | None = None) -> Iterator[tuple[str, int]]:
    """Yield (document text, invalid UTF-8 sequences in it) for every document the unit owns.

    Documents longer than ``max_document_bytes`` (default :data:`MAX_DOCUMENT_BYTES`) are counted in
    ``stats.too_long`` instead; reading one never holds more than that many bytes of it."""
    limit = MAX_DOCUMENT_BYTES if max_document_bytes is None else max_document_bytes
    if limit < 1:
        raise ValueError(f"max_document_bytes must be >= 1, got {limit}")
    decode = _Utf8Decoder(stats)
    kind = unit.kind
    if kind == "hf":
        yield from _capped_rows(unit, _read_hf(unit, text_key), limit, stats)
    elif kind == "parquet":
        yield from _capped_rows(unit, _read_parquet(unit, text_key), limit, stats)
    elif kind in ("text", "text.gz"):
        for raw in _text_documents(unit, limit, stats):
            yield decode(raw)
    else:  # lines, jsonl (plain or gz): one document per line
        for line_start, raw in _lines(unit, limit, stats):
            if kind.startswith("jsonl"):
                text, bad = decode(raw)
                yield _json_text(unit, line_start, text, text_key), bad
            else:
                yield decode(raw)


def _capped_rows(unit: WorkUnit, rows: Iterator[tuple[str, int]], limit: int, stats: ReadStats) -> Iterator[tuple[str, int]]:
    for row, (text, bad) in enumerate(rows, start=unit.start if unit.kind == "hf" else 0):
        # a character is at most 4 bytes: only long texts are encoded to be measured
        if len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit:
            where = f"row {row}" if unit.kind == "hf" else f"row group {unit.start} row {row}"
            stats.skip_too_long(unit.path, where)
            continue
        yield text, bad


def _open(unit: WorkUnit):
    return gzip.open(unit.path, "rb") if unit.kind.endswith(".gz") else open(unit.path, "rb")


def _first_line_start(f, start: int, stop: float) -> int | None:
    """Position ``f`` at the first line that starts in [start, stop) and return its offset (None: no line does).

    Only the unit's own range is searched: a line that started in an earlier unit is never read to its end."""
    if start == 0:
        return 0
    f.seek(start - 1)
    if f.read(1) == b"\n":
        return start
    pos = start
    while pos < stop:
        block = f.read(int(min(_SCAN_BYTES, stop - pos)))
        if not block:
            return None
        nl = block.find(b"\n")
        if nl >= 0:
            pos += nl + 1
            if pos >= stop:
                return None
            f.seek(pos)
            return pos
        pos += len(block)
    return None


def _lines_from(f, pos: int, limit: int, horizon: float) -> Iterator[tuple[int, bytes | None]]:
    """(start offset, line) for every line from ``pos`` (the offset ``f`` is at); None for a line longer than ``limit``.

    At most ``limit + 1`` bytes of a line are held. The rest of an over-long line is skipped in blocks when the
    next line is asked for, but never past ``horizon``: every caller wants nothing that starts beyond it."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        start = pos
        pos += len(line)
        if len(line) <= limit:
            yield start, line
            continue
        yield start, None
        while not line.endswith(b"\n"):
            if pos >= horizon:
                return
            line = f.readline(_SCAN_BYTES)
            if not line:
                return
            pos += len(line)


def _lines(unit: WorkUnit, limit: int, stats: ReadStats) -> Iterator[tuple[int, bytes]]:
    """(start offset, line) of the non-blank lines starting in [start, stop); longer lines are skipped and counted."""
    stop = unit.stop if unit.stop >= 0 else math.inf
    with _open(unit) as f:
        pos = _first_line_start(f, unit.start, stop)
        if pos is None:
            return
        for start, line in _lines_from(f, pos, limit, stop):
            if start >= stop:
                return
            if line is None:
                stats.skip_too_long(unit.path, start)
            elif line.strip():
                yield start, line.rstrip(b"\r\n")


def _text_documents(unit: WorkUnit, limit: int, stats: ReadStats) -> Iterator[bytes]:
    """Documents separated by blank lines that start in [start, stop); longer ones are skipped and counted.

    A blank line is at most ``limit`` bytes of ASCII whitespace (a longer one is content: the document holding
    it is over the cap anyway), so whether a unit starts inside a document is known from a bounded look back."""
    stop = unit.stop if unit.stop >= 0 else math.inf
    with _open(unit) as f:
        pos = _first_line_start(f, unit.start, stop)
        if pos is None:
            return
        # a non-blank line right after a non-blank line continues a document that started before this unit:
        # skip to the next blank line (but no further than this unit's end: no document of ours starts later)
        skipping = pos > 0 and not _previous_line_blank(f, pos, limit)
        doc_start, parts, size = -1, [], 0  # doc_start -1: between documents
        for start, line in _lines_from(f, pos, limit, stop):
            blank = line is not None and not line.strip()
            if skipping:
                if blank:
                    skipping = False
                elif start >= stop:
                    return
                continue
            if blank:
                if doc_start >= 0:
                    yield b"".join(parts)
                    doc_start, parts = -1, []
                continue
            if doc_start < 0:
                if start >= stop:
                    return
                doc_start, parts, size = start, [], 0
            size += len(line) if line is not None else limit + 1
            if size > limit:
                stats.skip_too_long(unit.path, doc_start)
                doc_start, parts, skipping = -1, [], True  # the rest of it, up to a blank line
                continue
            parts.append(line)
        if doc_start >= 0:
            yield b"".join(parts)


def _previous_line_blank(f, line_start: int, limit: int) -> bool:
    """Whether the line ending just before ``line_start`` is blank: ASCII whitespace, at most ``limit`` bytes with
    its newline (as ``_lines_from`` sees lines). Reads back at most ``limit`` bytes, and stops at the first
    non-whitespace byte."""
    here = f.tell()
    end = line_start - 1  # the newline that ends the previous line
    window = max(0, end - limit)  # a newline before this would make the line longer than the limit
    blank = False
    while end > window:
        begin = max(window, end - 4096)
        f.seek(begin)
        block = f.read(end - begin)
        nl = block.rfind(b"\n")
        if block[nl + 1 :].strip():
            break  # a non-whitespace byte
        if nl >= 0:
            blank = True
            break
        end = begin
    else:
        # no newline in the window: the line is blank only if it starts the file within the limit
        blank = window == 0 and line_start <= limit
    f.seek(here)
    return blank


def _json_text(unit: WorkUnit, line_start: int, line: str, text_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{unit.path}:{_line_number(unit, line_start)}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or text_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise InputError(f"{unit.path}:{_line_number(unit, line_start)}: no text key {text_key!r} (found {keys}); set --text-key")
    text = record[text_key]
    if not isinstance(text, str):
        raise InputError(f"{unit.path}:{_line_number(unit, line_start)}: {text_key!r} is a {type(text).__name__}, not a string")
    return text


def _line_number(unit: WorkUnit, offset: int) -> int:
    """1-based line number of a byte offset; counted only on the error path, a block at a time."""
    newlines = 0
    with _open(unit) as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 20))
            if not block:
                break
            newlines += block.count(b"\n")
            offset -= len(block)
    return newlines + 1


def _read_parquet(unit: WorkUnit, text_key: str) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    if text_key not in pf.schema_arrow.names:
        raise InputError(f"{unit.path}: no column {text_key!r} (columns: {pf.schema_arrow.names}); set --text-key")
    for text in pf.read_row_group(unit.start, columns=[text_key]).column(0).to_pylist():
        yield (text or ""), 0


def _read_hf(unit: WorkUnit, text_key: str) -> Iterator[tuple[str, int]]:
    import datasets

    ds = datasets.load_from_disk(unit.path)
    if text_key not in ds.column_names:
        raise InputError(f"{unit.path}: no column {text_key!r} (columns: {ds.column_names}); set --text-key")
    for text in ds.select_columns([text_key])[unit.start : unit.stop][text_key]:
        yield (text or ""), 0
