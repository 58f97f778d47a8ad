"""Writing files that are never seen half-written: one file, a unit of files, or a whole directory.

Every writer in bert-ds that leaves a file for someone else to read (a run's ``config.yaml`` and
``ds_config.json``, a checkpoint's completion marker and ``latest``, a shard's ``.bin/.idx/.json``,
an export directory) goes through here, so "a crash leaves either the old file or the new one"
is written once:

* :func:`atomic_write` / :func:`atomic_open`: write to a temporary name in the same directory,
  flush and fsync, then ``os.replace`` onto the final name (atomic on POSIX file systems).
* :class:`FileUnit`: several files that belong together. Each is written under a temporary name;
  ``commit`` first removes the unit's *marker* (its last file, e.g. a shard's ``.json``), then
  renames the others, then the marker. A reader that trusts the marker (the trainer trusts a shard's
  vocabulary hash in its ``.json``) never pairs a new marker with old data or an old marker with new data.
* :func:`atomic_directory`: a whole directory built under a temporary name beside it, then swapped in
  (the old one, when replacing, is moved aside first and deleted last).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

PARTIAL_SUFFIX = ".partial"
"""Temporary names end with this; a crash leaves only such files behind, never a file under its final name."""


def _fsync_dir(path: Path) -> None:
    # the rename itself must reach the disk, or a power loss can undo it
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open ``path`` for writing under a temporary name; it appears under its own name only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


class FileUnit:
    """Files that must appear together, committed with the last one (the marker) renamed last.

    e.g. a shard: ``FileUnit([prefix.bin, prefix.idx, prefix.json])``; write each to ``unit.temp(path)``,
    then ``unit.commit()``. Used as a context manager, a failure removes every temporary file and
    leaves the previous files untouched.
    """

    def __init__(self, paths: list[str | os.PathLike]):
        if not paths:
            raise ValueError("a FileUnit needs at least one file")
        self.paths = [Path(p) for p in paths]
        if len(set(self.paths)) != len(self.paths):
            raise ValueError(f"a FileUnit names a file twice: {self.paths}")
        for p in self.paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        self._temps = {p: p.with_name(p.name + PARTIAL_SUFFIX) for p in self.paths}
        self.committed = False

    @property
    def marker(self) -> Path:
        return self.paths[-1]

    def temp(self, path: str | os.PathLike) -> Path:
        """The temporary name to write ``path`` under until :meth:`commit`."""
        return self._temps[Path(path)]

    def commit(self) -> None:
        missing = [str(t) for t in self._temps.values() if not t.exists()]
        if missing:
            raise FileNotFoundError(f"cannot commit {self.marker.name}'s unit: {', '.join(missing)} were never written")
        for t in self._temps.values():
            with open(t, "rb") as f:
                os.fsync(f.fileno())
        self.marker.unlink(missing_ok=True)  # from here until the last rename, no marker vouches for the others
        for p in self.paths:
            os.replace(self._temps[p], p)
        for parent in {p.parent for p in self.paths}:
            _fsync_dir(parent)
        self.committed = True

    def abort(self) -> None:
        for t in self._temps.values():
            t.unlink(missing_ok=True)

    def __enter__(self) -> FileUnit:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.committed:
            self.commit()
        elif exc_type is not None:
            self.abort()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``path``; swap it in if the block succeeds.

    With ``replace``, an existing ``path`` is moved aside just before the swap and deleted after it,
    so at every moment ``path`` is either the complete old directory or the complete new one (or,
    for the instant between two renames, absent). Without it, an existing ``path`` is an error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
