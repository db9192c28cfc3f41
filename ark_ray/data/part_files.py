"""Stage 3 of the batch job and its output folder: part files, what is done, the label manifest.

Why part files: each block is written as one file named by the hash of its input keys, so a
retried write task replaces its file instead of adding a second copy; a rerun into the same
output reads the keys already written (`done_keys`) and skips them, dropping any duplicate first.
Files are read back through the shared reader, `ark_ray.data.row_files`.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import posixpath
from collections import Counter
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from ark_ray.config import S3Config
from ark_ray.data.listing import InputError
from ark_ray.data.row_files import read_table
from ark_ray.data.s3 import resolve, to_uri, write_bytes_atomic

OUTPUT_FIELDS = [pa.field("key", pa.string()), pa.field("pred_text", pa.string()),
                 pa.field("pred_text_raw", pa.string()), pa.field("duration_s", pa.float64()),
                 pa.field("silent", pa.bool_()), pa.field("error", pa.string()),
                 pa.field("error_detail", pa.string())]
PART_SUFFIX = {"jsonl": ".jsonl", "parquet": ".parquet"}


def part_name(keys: Iterable[str], fmt: str) -> str:
    """Same inputs -> same file name, so a retried write replaces rather than duplicates."""
    h = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]
    return f"part-{h}{PART_SUFFIX[fmt]}"


def output_rows(batch: dict, label_field: Optional[str] = None) -> list[dict]:
    """Input metadata + key + pred_text, pred_text_raw, duration_s, silent, error, error_detail."""
    rows = []
    for i in range(len(batch["key"])):
        row = pickle.loads(batch["meta"][i])
        failed = bool(batch["error"][i])
        row.update(key=str(batch["key"][i]),
                   pred_text=None if failed else str(batch["pred_text"][i]),
                   pred_text_raw=None if failed else str(batch["pred_text_raw"][i]),
                   duration_s=float(batch["duration_s"][i]),
                   silent=None if failed else bool(batch["silent"][i]),
                   error=str(batch["error"][i]) if failed else None,
                   error_detail=str(batch["error_detail"][i]) if failed else None)
        if label_field:
            if label_field in row and label_field not in {f.name for f in OUTPUT_FIELDS}:
                row[f"reference_{label_field}"] = row.pop(label_field)
            row[label_field] = row["pred_text"] or ""
        rows.append(row)
    return rows


def encode_rows(rows: list[dict], fmt: str, schema: pa.Schema) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows).encode()
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def write_batch(batch: dict, *, output: str, fmt: str, schema: pa.Schema, label_field: Optional[str],
                s3: Optional[S3Config] = None) -> dict:
    """Remote task: writes the block's rows as one part file; returns its counts (all the driver sees)."""
    rows = output_rows(batch, label_field)
    fs, root = resolve(output, s3)
    write_bytes_atomic(fs, posixpath.join(root, part_name((r["key"] for r in rows), fmt)),
                       encode_rows(rows, fmt, schema))
    reasons = Counter(r["error"] for r in rows if r["error"] is not None)
    return {"rows": len(rows), "audio_s": float(sum(r["duration_s"] for r in rows)),
            "errors": sum(reasons.values()), "reasons": json.dumps(reasons)}



# --------------------------------------------------------------------------------------------
# The output folder: what is done, duplicates, overwrite, the label manifest
# --------------------------------------------------------------------------------------------


def list_parts(fs: pafs.FileSystem, root: str) -> list[str]:
    """The part files under `root` (not the label manifest, not temp files), sorted."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except FileNotFoundError:
        return []
    return sorted(fi.path for fi in infos if fi.type == pafs.FileType.File
                  and posixpath.basename(fi.path).startswith("part-")
                  and fi.path.endswith(tuple(PART_SUFFIX.values())))


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
    fs, root = resolve(output, s3)
    seen: set[str] = set()
    for path in list_parts(fs, root):
        keys, failed = _part_keys(fs, path)
        keep = []
        for i, k in enumerate(keys):
            if k not in seen and not (retry_errors and failed[i]):
                seen.add(k)
                keep.append(i)
        if len(keep) == len(keys):
            continue
        if not keep:
            fs.delete_file(path)
            continue
        fmt = "parquet" if path.endswith(".parquet") else "jsonl"
        kept = read_table(path, fs).take(keep)
        write_bytes_atomic(fs, path, encode_rows(kept.to_pylist(), fmt, kept.schema))
    return seen


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
    path = posixpath.join(root, f"manifest{PART_SUFFIX[fmt]}")
    write_bytes_atomic(fs, path, encode_rows(table.to_pylist(), fmt, table.schema))
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

