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
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Nominal size of a text work unit: small enough to balance 2+ workers on a 10 MB corpus,
# large enough that per-unit overhead (a pickle round trip) is negligible.
# (BERT_DS_UNIT_BYTES overrides it: tests use tiny units to exercise unit boundaries)
UNIT_BYTES = int(os.environ.get("BERT_DS_UNIT_BYTES", 1 << 20))
HF_UNIT_ROWS = 10_000
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


def read_unit(unit: WorkUnit, text_key: str, stats: ReadStats) -> Iterator[tuple[str, int]]:
    """Yield (document text, invalid UTF-8 sequences in it) for every document the unit owns."""
    decode = _Utf8Decoder(stats)
    kind = unit.kind
    if kind == "hf":
        yield from _read_hf(unit, text_key)
    elif kind == "parquet":
        yield from _read_parquet(unit, text_key)
    elif kind in ("text", "text.gz"):
        for raw in _text_documents(unit):
            yield decode(raw)
    else:  # lines, jsonl (plain or gz): one document per line
        for line_start, raw in _lines(unit):
            if kind.startswith("jsonl"):
                text, bad = decode(raw)
                yield _json_text(unit, line_start, text, text_key), bad
            else:
                yield decode(raw)


def _open(unit: WorkUnit):
    return gzip.open(unit.path, "rb") if unit.kind.endswith(".gz") else open(unit.path, "rb")


def _at_line_start(f, start: int) -> None:
    """Position ``f`` at the first line that starts at or after ``start``."""
    if start > 0:
        f.seek(start - 1)
        if f.read(1) != b"\n":
            f.readline()  # the rest of a line that started in the previous unit


def _lines(unit: WorkUnit) -> Iterator[tuple[int, bytes]]:
    """(start offset, line) of the non-blank lines starting in [start, stop)."""
    stop = unit.stop if unit.stop >= 0 else float("inf")
    with _open(unit) as f:
        _at_line_start(f, unit.start)
        pos = f.tell() if unit.start > 0 else 0
        for line in f:
            if pos >= stop:
                break
            if line.strip():
                yield pos, line.rstrip(b"\r\n")
            pos += len(line)


def _text_documents(unit: WorkUnit) -> Iterator[bytes]:
    """Documents separated by blank lines that start in [start, stop)."""
    stop = unit.stop if unit.stop >= 0 else float("inf")
    with _open(unit) as f:
        _at_line_start(f, unit.start)
        pos = f.tell() if unit.start > 0 else 0
        # a non-blank line right after a non-blank line continues a document that
        # started before this unit: skip to the next blank line
        skipping = pos > 0 and not _previous_line_blank(f, pos)
        lines: list[bytes] = []
        for line in f:
            blank = not line.strip()
            if skipping:
                skipping = not blank
            elif blank:
                if lines:
                    yield b"".join(lines)
                    lines = []
            else:
                if not lines and pos >= stop:
                    return
                lines.append(line)
            pos += len(line)
        if lines:
            yield b"".join(lines)


def _previous_line_blank(f, line_start: int) -> bool:
    """Whether the line ending just before ``line_start`` is blank (ASCII whitespace only)."""
    here = f.tell()
    end = line_start - 1  # the newline that ends the previous line
    blank = True
    while end > 0:
        begin = max(0, end - 4096)
        f.seek(begin)
        block = f.read(end - begin)
        nl = block.rfind(b"\n")
        tail = block[nl + 1 :] if nl >= 0 else block
        if tail.strip():
            blank = False
            break
        if nl >= 0:
            break
        end = begin
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
    """1-based line number of a byte offset; counted only on the error path."""
    with _open(unit) as f:
        data = f.read(offset)
    return data.count(b"\n") + 1


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
