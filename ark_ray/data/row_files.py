"""The one reader of row files: JSON lines and Parquet, local or on S3 (any pyarrow filesystem).

Manifests (`ark_ray.data.manifest`), the batch job's part files (`ark_ray.data.part_files`) and
jobs/evaluate.py's predictions are all read here, so a file one of them accepts the others read
the same way: blank lines skipped, `.gz` JSON lines decompressed, every row's columns kept.
"""
from __future__ import annotations

import json
import os
import posixpath
from typing import Iterator, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.fs as pafs

from ark_ray.config import UserError

#: File names read as row files (folders of shards are filtered by these).
SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
#: The batch job's part files (`part-<hash><suffix>`, ark_ray/data/part_files.py) by --format.
PART_SUFFIX = {"jsonl": ".jsonl", "parquet": ".parquet"}


def list_parts(fs: pafs.FileSystem, root: str) -> list[str]:
    """The batch job's part files under `root` (not the label manifest, not temp files), sorted.
    Here, not in part_files, so the job's preflight lists them without importing Ray."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except FileNotFoundError:
        return []
    return sorted(fi.path for fi in infos if fi.type == pafs.FileType.File
                  and posixpath.basename(fi.path).startswith("part-")
                  and fi.path.endswith(tuple(PART_SUFFIX.values())))


class RowFileError(UserError):
    """A row file that cannot be read, naming the file (and line) at fault."""


class BadLine:
    """A JSON line that does not parse: `iter_rows` hands it back in the row's place."""

    def __init__(self, msg: str):
        self.msg = msg


def is_parquet(path: str) -> bool:
    return str(path).endswith(".parquet")


def _local(path: Union[str, os.PathLike], fs: Optional[pafs.FileSystem]) -> tuple[pafs.FileSystem, str]:
    return (fs, str(path)) if fs is not None else (pafs.LocalFileSystem(), os.path.abspath(path))


def _parquet_bytes(data: bytes, name: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(pa.BufferReader(data), columns=None if columns is None else list(columns))
    except (OSError, pa.ArrowException) as e:
        raise RowFileError(f"{name}: unreadable Parquet ({e})") from None


def _parquet(fs: pafs.FileSystem, path: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    with fs.open_input_stream(path) as f:   # one GET on S3; FileNotFoundError passes through
        return _parquet_bytes(f.read(), path, columns)


def parse_rows(name: str, data: bytes, parquet: bool) -> Iterator[tuple[str, object]]:
    """`iter_rows` on a file's bytes (already decompressed): what a Ray Data read task, which
    opens the file itself, hands over."""
    if parquet:
        for i, row in enumerate(_parquet_bytes(data, name).to_pylist()):
            yield f"{name}:row {i + 1}", row
        return
    for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{name}:{i}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{name}:{i}", BadLine(f"not valid JSON ({e.msg})")


def iter_rows(path: Union[str, os.PathLike], fs: Optional[pafs.FileSystem] = None
              ) -> Iterator[tuple[str, object]]:
    """(where, row) per Parquet row / non-blank JSON line, in file order; `where` is `file:line`
    (`file:row N` for Parquet). A line that is not JSON comes back as a `BadLine`, and a row is
    whatever the line holds (callers decide what a non-object means)."""
    name = str(path)    # `where` names the file as the caller did (manifest row ids are built from it)
    fs, path = _local(path, fs)
    # one GET on S3 (FileNotFoundError passes through); `.gz` JSON lines decompressed
    with fs.open_input_stream(path, compression="detect") as f:
        data = f.read()
    yield from parse_rows(name, data, is_parquet(path))


def read_rows(path: Union[str, os.PathLike], fs: Optional[pafs.FileSystem] = None) -> Iterator[dict]:
    """Every row as a dict; a line that is not a JSON object stops the read with a RowFileError."""
    for where, row in iter_rows(path, fs):
        if isinstance(row, BadLine):
            raise RowFileError(f"{where}: {row.msg}")
        if not isinstance(row, dict):
            raise RowFileError(f"{where}: a row must be a JSON object")
        yield row


def table_of(rows: list[dict]) -> pa.Table:
    """Rows -> a table with every row's columns (pa.Table.from_pylist keeps only the first row's)."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in names})


def read_table(path: Union[str, os.PathLike], fs: Optional[pafs.FileSystem] = None,
               columns: Optional[Sequence[str]] = None) -> pa.Table:
    """One file as a table: Parquet as stored (only `columns` when given), JSON lines via `table_of`."""
    fs, path = _local(path, fs)
    if is_parquet(path):
        return _parquet(fs, path, columns)
    table = table_of(list(read_rows(path, fs)))
    return table if columns is None else table.select([c for c in columns if c in table.column_names])


__all__ = ["SUFFIXES", "RowFileError", "BadLine", "is_parquet", "parse_rows", "iter_rows", "read_rows", "read_table",
           "table_of"]
