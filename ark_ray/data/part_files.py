"""The batch job's writes and its output folder: part files, what is done, the label manifest.

Why part files: each block is written as one file named by the hash of its input keys, so a
retried write task replaces its file instead of adding a second copy; a rerun into the same
output reads the keys already written (`done_keys`) and skips them, dropping any duplicate first.
The job writes through `write_part` as a Ray Data stage (its counts stream back to the driver's
progress bar); `PartFileSink` is the same write as a Ray Data Datasink for users' pipelines.
Files are read back through the shared reader, `ark_ray.data.row_files`.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections import Counter
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from ray.data import Datasink

from ark_ray.config import S3Config
from ark_ray.data.listing import InputError
from ark_ray.data.row_files import PART_SUFFIX, list_parts, read_table  # noqa: F401 - re-exported
from ark_ray.data.s3 import resolve, to_uri, write_bytes_atomic

#: Columns the transcriber adds to every row (a label field never takes one of these names).
OUTPUT_COLUMNS = ("pred_text", "pred_text_raw", "segments", "duration_s", "silent", "error", "error_detail")


def part_name(keys: Iterable[str], fmt: str) -> str:
    """Same inputs -> same file name, so a retried write replaces rather than duplicates."""
    h = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]
    return f"part-{h}{PART_SUFFIX[fmt]}"


def with_label(table: pa.Table, label_field: Optional[str]) -> pa.Table:
    """`label_field` = the transcript ("" for error rows); an input column of that name is kept as
    `reference_<name>` (teacher labelling keeps the original text beside the teacher's)."""
    if not label_field or label_field in OUTPUT_COLUMNS:
        return table
    if label_field in table.column_names:
        i = table.column_names.index(label_field)
        table = table.rename_columns([f"reference_{label_field}" if j == i else c
                                      for j, c in enumerate(table.column_names)])
    return table.append_column(label_field, pc.fill_null(table.column("pred_text"), ""))


def encode_table(table: pa.Table, fmt: str) -> bytes:
    """A part file's bytes: JSON lines (one object per row) or Parquet (the table's own schema)."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in table.to_pylist()).encode()
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_part(table: pa.Table, *, output: str, fmt: str, label_field: Optional[str] = None,
               s3: Optional[S3Config] = None, key_column: str = "key") -> pa.Table:
    """map_batches fn (pyarrow): the block's rows as one part file, named by its keys and written
    atomically; returns one row of counts (rows, audio_s, errors, reasons as JSON), all the driver sees."""
    if key_column not in table.column_names:
        raise KeyError(f"no key column {key_column!r} to name the part file by (columns: {table.column_names})")
    table = with_label(table, label_field)
    fs, root = resolve(output, s3)
    write_bytes_atomic(fs, posixpath.join(root, part_name(map(str, table.column(key_column).to_pylist()), fmt)),
                       encode_table(table, fmt))
    reasons = Counter(e for e in table.column("error").to_pylist() if e)
    return pa.table({"rows": [table.num_rows], "audio_s": [float(pc.sum(table.column("duration_s")).as_py() or 0.0)],
                     "errors": [sum(reasons.values())], "reasons": [json.dumps(reasons)]})


class PartFileSink(Datasink):
    """`ds.write_datasink(PartFileSink(output, "parquet"))`: the job's part files for any Dataset with
    a key column (one file per block, named by its keys, written atomically, so a retried write
    replaces its file and `done_keys` can resume the work later)."""

    def __init__(self, output: str, fmt: str = "parquet", *, label_field: Optional[str] = None,
                 s3: Optional[S3Config] = None, key_column: str = "key"):
        self.output, self.fmt, self.label_field, self.s3, self.key_column = output, fmt, label_field, s3, key_column

    def on_write_start(self, schema=None) -> None:
        prepare_output(self.output, self.s3)

    def write(self, blocks, ctx) -> list[dict]:
        from ray.data.block import BlockAccessor

        return [write_part(BlockAccessor.for_block(b).to_arrow(), output=self.output, fmt=self.fmt,
                           label_field=self.label_field, s3=self.s3, key_column=self.key_column).to_pylist()[0]
                for b in blocks if BlockAccessor.for_block(b).num_rows()]


# --------------------------------------------------------------------------------------------
# The output folder: what is done, duplicates, overwrite, the label manifest
# --------------------------------------------------------------------------------------------


def read_output(output: str, s3: Optional[S3Config] = None) -> list[dict]:
    """Every row of a transcribe output (tests, small outputs; large ones: ray.data.read_*)."""
    fs, root = resolve(output, s3)
    return [r for p in list_parts(fs, root) for r in read_table(p, fs).to_pylist()]


def _part_keys(fs: pafs.FileSystem, path: str) -> tuple[list[str], list[bool]]:
    """(keys, is_error) of one part file; Parquet reads only those two columns."""
    t = read_table(path, fs, columns=["key", "error"])
    if not t.num_rows:
        return [], []
    return t.column("key").to_pylist(), [e is not None for e in t.column("error").to_pylist()]


def done_keys(output: str, s3: Optional[S3Config] = None, retry_errors: bool = False) -> set[str]:
    """Keys already written to `output`; a key found in two part files is removed from the later one.

    Duplicates arise only if a write died after its file landed and the retry grouped rows
    differently; this makes a rerun leave exactly one row per key. With `retry_errors`, error
    rows are removed too, so their inputs are tried again (e.g. after a transient engine failure).
    """
    return clean_output(output, s3, retry_errors)[0]


def clean_output(output: str, s3: Optional[S3Config] = None, retry_errors: bool = False) -> tuple[set[str], int]:
    """(done_keys, rows removed): every key left in exactly one part file (see done_keys)."""
    fs, root = resolve(output, s3)
    seen: set[str] = set()
    removed = 0
    for path in list_parts(fs, root):
        keys, failed = _part_keys(fs, path)
        keep = []
        for i, k in enumerate(keys):
            if k not in seen and not (retry_errors and failed[i]):
                seen.add(k)
                keep.append(i)
        if len(keep) == len(keys):
            continue
        removed += len(keys) - len(keep)
        if not keep:
            fs.delete_file(path)
            continue
        fmt = "parquet" if path.endswith(".parquet") else "jsonl"
        write_bytes_atomic(fs, path, encode_table(read_table(path, fs).take(keep), fmt))
    return seen, removed


def write_manifest(output: str, fmt: str, label_field: str, s3: Optional[S3Config] = None) -> tuple[str, int]:
    """`manifest.<fmt>` in the output: every successful row, `label_field` = the transcript.

    The part files keep error rows (nothing lost); the manifest holds only what a training job
    should learn from, in the one file jobs/sft.py reads (teacher labelling).
    """
    fs, root = resolve(output, s3)
    tables = [t.filter(pc.is_null(t.column("error"))) for t in (read_table(p, fs) for p in list_parts(fs, root))
              if t.num_rows]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({label_field: []})
    table = table.drop_columns([c for c in ("silent", "error", "error_detail") if c in table.column_names])
    table = table.drop_columns([c for c in ("segments",) if c in table.column_names])
    path = posixpath.join(root, f"manifest{PART_SUFFIX[fmt]}")
    write_bytes_atomic(fs, path, encode_table(table, fmt))
    return to_uri(fs, path), table.num_rows


def prepare_output(output: str, s3: Optional[S3Config] = None, overwrite: bool = False) -> None:
    """Create the output folder; drop leftovers of interrupted local writes; with `overwrite`, old parts."""
    fs, root = resolve(output, s3)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise InputError(f"output {output} is a file; it must be a folder or an S3 prefix")
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(root, recursive=True)
        for fi in fs.get_file_info(pafs.FileSelector(root)):
            if posixpath.basename(fi.path).startswith(".tmp-"):
                fs.delete_file(fi.path)
    if overwrite:
        for p in list_parts(fs, root):
            fs.delete_file(p)

