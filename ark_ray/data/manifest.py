"""Manifests in open-audio-opd's format: one row per utterance with `audio`, `text`, `begin_time`,
`end_time`.

The conventions of open-audio-opd's OPD training and inference scripts (docs/architecture.md, "The
reference"), exactly: a negative `begin_time` or `end_time` (they write -1) means unset, and
`end_time` is ignored when `begin_time < 0`; so `-1/-1` is the whole file. Rows come back with the unset values as None.
`audio` may be absolute, relative to the manifest's folder, or an s3:// URI. Extra columns are
kept (outputs carry them through).

This is the one manifest reader (lines and Parquet rows come from `ark_ray.data.row_files`, the
reader of every row file). A row that cannot be used (not JSON, not an object, no `audio`, a
value of the wrong type, a segment that ends before it begins) is a *bad row*:
`parse_manifest` returns the bad rows beside the good ones (the batch job turns each into an
error row), `read_manifest` refuses the manifest listing every bad line, or skips them with a
count when asked. A missing audio *file* is not a manifest problem: it becomes an error row
(or a skipped sample) when the audio is loaded. The manifest itself may be local or on S3.

`ark_ray.data.manifest_dataset` is the same reader as a Ray Data dataset (read tasks on any
node, nothing held by the driver): it applies these rules through `checked_row`.
"""
from __future__ import annotations

import logging
import math
import os
import pathlib
import posixpath
from typing import Optional

import pyarrow.fs as pafs

from ark_ray.config import S3Config, UserError
from ark_ray.data.row_files import BadLine, RowFileError, is_parquet, parse_rows
from ark_ray.data.s3 import StorageError, is_s3, resolve

log = logging.getLogger(__name__)

#: Bad lines quoted in a ManifestError; the rest are counted.
MAX_LISTED = 50


class ManifestError(UserError):
    """A manifest that cannot be used, naming the file and every bad line."""


def _resolve(audio: str, base: str) -> str:
    """`audio` as an absolute path/URI: relative paths are relative to the manifest's folder
    (`base`, itself a local folder or an s3:// prefix)."""
    if "://" in audio or os.path.isabs(audio):
        return audio
    if is_s3(base):
        return "s3://" + posixpath.normpath(posixpath.join(base[len("s3://"):], audio))
    return str((pathlib.Path(base) / audio).resolve())


def audio_base(uri: str, fs_path: str) -> str:
    """The folder a manifest's relative audio paths are resolved against."""
    return "s3://" + posixpath.dirname(fs_path) if is_s3(uri) else os.path.dirname(fs_path)


def _number(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


def normalize_segment(begin, end) -> tuple[Optional[float], Optional[float]]:
    """open-audio-opd's rule: negative means unset; `end` is ignored when `begin < 0`."""
    if begin is not None and begin < 0:
        return None, None
    if end is not None and end < 0:
        end = None
    return (None if begin is None else float(begin)), (None if end is None else float(end))


def check_row(row, text_field: Optional[str]) -> tuple[Optional[str], str]:
    """(reason, detail) of why `row` cannot be used, or (None, "") when it can."""
    if not isinstance(row, dict):
        return "bad_row", f"a row must be a JSON object, got {type(row).__name__}"
    audio = row.get("audio")
    if not isinstance(audio, str) or not audio:
        return "bad_row", "missing or empty 'audio' field"
    if text_field is not None and not isinstance(row.get(text_field), str):
        return "bad_row", f"missing text field {text_field!r}"
    for key in ("begin_time", "end_time"):
        if not _number(row.get(key)):
            return "bad_row", f"{key} must be a number or null, got {row.get(key)!r}"
    b, e = normalize_segment(row.get("begin_time"), row.get("end_time"))
    if e is not None and e == (b or 0.0):
        return "zero_length_segment", f"begin_time {b or 0.0:g} == end_time {e:g}"
    if e is not None and e < (b or 0.0):
        return "bad_segment", f"begin_time {b or 0.0:g} > end_time {e:g}"
    return None, ""


def parse_manifest(path: str | os.PathLike, text_field: Optional[str] = "text",
                   s3: Optional[S3Config] = None) -> tuple[list[dict], list[dict]]:
    """(good rows, bad rows), both in file order (see manifest_rows)."""
    rows = manifest_rows(path, text_field, s3)
    return [r for r in rows if "_error" not in r], [r for r in rows if "_error" in r]


def checked_row(where: str, row, base: str, text_field: Optional[str]) -> dict:
    """One manifest row, checked: normalised when good, marked when bad (see manifest_rows).

    Both readers (`manifest_rows` here and the Ray Data read tasks of `manifest_dataset`) apply
    the rules through this one function."""
    if isinstance(row, BadLine):
        reason, detail = "bad_row", row.msg
    else:
        reason, detail = check_row(row, text_field)
    if reason is None:
        row = dict(row)
        row["audio"] = _resolve(row["audio"], base)
        row.setdefault("id", where)
        row["begin_time"], row["end_time"] = normalize_segment(row.get("begin_time"), row.get("end_time"))
        return row
    kept = dict(row) if isinstance(row, dict) else {}
    if isinstance(kept.get("audio"), str) and kept["audio"]:
        kept["audio"] = _resolve(kept["audio"], base)
    else:
        kept["audio"] = ""
    b, e = kept.get("begin_time"), kept.get("end_time")
    kept["begin_time"], kept["end_time"] = normalize_segment(b, e) if _number(b) and _number(e) else (None, None)
    kept.setdefault("id", where)
    kept.update(_where=where, _error=reason, _error_detail=detail)
    return kept


def locate_manifest(uri: str | os.PathLike, s3: Optional[S3Config]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a manifest file, or ManifestError when there is none."""
    try:
        fs, path = resolve(str(uri), s3)
    except StorageError as e:
        raise ManifestError(str(e)) from None
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ManifestError(f"manifest not found: {uri}")
    return fs, path


def manifest_rows(path: str | os.PathLike, text_field: Optional[str] = "text",
                  s3: Optional[S3Config] = None) -> list[dict]:
    """Every row in file order, the bad ones marked with `_error`; `path` is a local file or an
    s3:// URI (credentials from `s3`, else the AWS_* environment).

    Good rows: `audio` resolved to an absolute path/URI, a stable `id` (file:line if absent),
    `begin_time`/`end_time` as floats or None (open-audio-opd's -1 is None). Bad rows: what could be
    kept of the row (`audio` resolved when it is a string; wrong-typed segment values as None)
    plus `id`, `_where` (file:line), `_error` (the reason) and `_error_detail`.
    """
    fs, fs_path = locate_manifest(path, s3)
    base = audio_base(str(path), fs_path)
    with fs.open_input_stream(fs_path, compression="detect") as f:
        data = f.read()
    try:
        rows = [checked_row(where, row, base, text_field)
                for where, row in parse_rows(str(path), data, is_parquet(fs_path))]
    except RowFileError as e:   # an unreadable Parquet file
        raise ManifestError(str(e)) from None
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows


def describe_bad_row(r: dict) -> str:
    return f"{r['_where']}: {r['_error']}: {r['_error_detail']}"


def describe_bad_rows(bad: list[dict]) -> str:
    lines = [describe_bad_row(r) for r in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"... and {len(bad) - MAX_LISTED} more")
    return "\n".join(lines)


def bad_rows_error(uri, bad: int, listed: str) -> ManifestError:
    """The refusal of a manifest with bad rows (both readers word it alike)."""
    return ManifestError(f"{uri}: {bad} bad row(s) (skip_bad_rows=true skips them):\n{listed}")


def read_manifest(path: str | os.PathLike, text_field: Optional[str] = "text",
                  skip_bad_rows: bool = False, s3: Optional[S3Config] = None) -> list[dict]:
    """The good rows of a manifest (see parse_manifest), for jobs that need every row usable.

    Bad rows refuse the whole manifest with one ManifestError listing every bad line; with
    `skip_bad_rows` they are left out and counted in a warning instead.
    """
    good, bad = parse_manifest(path, text_field, s3)
    if bad and not skip_bad_rows:
        raise bad_rows_error(path, len(bad), describe_bad_rows(bad))
    if bad:
        log.warning("%s: skipped %d bad row(s) of %d:\n%s", path, len(bad), len(good) + len(bad),
                    describe_bad_rows(bad))
    if not good:
        raise ManifestError(f"{path}: no usable rows")
    return good
