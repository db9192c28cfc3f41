"""The one manifest reader as a Ray Data dataset: for inputs too large for the driver to hold.

Why a datasource of our own instead of `ray.data.read_json`: Arrow's JSON reader fails the whole
file at the first line that is not JSON and knows no line numbers, while a manifest's bad rows
must be refused all at once, each named by `file:line`, or skipped and counted. So the read task
(Ray Data's file machinery: local paths or S3 through a pyarrow filesystem, retries) parses
with `ark_ray.data.row_files` and checks each row with `ark_ray.data.manifest.checked_row`: the
same rules, rows and ids as `read_manifest`, in a task that may run on any node.

`open_manifest` makes one streaming pass to count the rows and refuse (or count and skip) bad
ones, then hands back a lazy dataset of the good rows: each execution re-reads the file, so
nothing of the manifest stays in the driver or the object store between passes. Every good
row carries `_row`, its index among the good rows in file order (what `read_manifest`'s list
index is), so a consumer can address rows by number (OPD's data positions do).
"""
from __future__ import annotations

import json
import logging
from typing import Iterator, NamedTuple, Optional

import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data.datasource import FileBasedDatasource

from ark_ray.config import S3Config
from ark_ray.data.manifest import (MAX_LISTED, ManifestError, audio_base, bad_rows_error, checked_row,
                                   describe_bad_row, locate_manifest)
from ark_ray.data.row_files import RowFileError, is_parquet, parse_rows

log = logging.getLogger(__name__)

#: The column every good row gets: its index among the manifest's good rows, in file order.
ROW_INDEX = "_row"
_PRIVATE = ("_where", "_error", "_error_detail")
#: Rows per block out of a read task (bounds a read task's memory on a large manifest).
_BLOCK_ROWS = 50_000
_TYPES = {"audio": pa.string(), "id": pa.string(), "begin_time": pa.float64(), "end_time": pa.float64(),
          ROW_INDEX: pa.int64(), "_where": pa.string(), "_error": pa.string(), "_error_detail": pa.string()}


class Manifest(NamedTuple):
    dataset: "ray.data.Dataset"   # the good rows (lazy: each execution re-reads the manifest)
    rows: int                     # good rows
    skipped: int                  # bad rows left out (skip_bad_rows)


def _column(name: str, values: list) -> pa.Array:
    if name == "id":
        values = [None if v is None else str(v) for v in values]
    try:
        return pa.array(values, type=_TYPES.get(name))
    except (pa.ArrowException, TypeError, ValueError):
        # a column whose values share no Arrow type (hand-written manifests have them): JSON text
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def _table(rows: list[dict]) -> pa.Table:
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({k: _column(k, [r.get(k) for r in rows]) for k in names})


class ManifestDatasource(FileBasedDatasource):
    """One manifest file; rows checked by `checked_row`, the bad ones marked with `_error`."""

    def __init__(self, uri: str, text_field: Optional[str], s3: Optional[S3Config] = None):
        fs, path = locate_manifest(uri, s3)
        super().__init__(path, filesystem=fs)
        self._uri, self._text_field, self._base = str(uri), text_field, audio_base(str(uri), path)

    def _read_stream(self, f: "pa.NativeFile", path: str) -> Iterator["pa.Table"]:
        rows, good = [], 0
        try:
            for where, row in parse_rows(self._uri, f.readall(), is_parquet(path)):
                r = checked_row(where, row, self._base, self._text_field)
                r.setdefault("_where", None)
                if "_error" in r:
                    r[ROW_INDEX] = -1
                else:
                    r[ROW_INDEX], good = good, good + 1
                rows.append(r)
                if len(rows) == _BLOCK_ROWS:
                    yield _table(rows)
                    rows = []
        except RowFileError as e:   # an unreadable Parquet file
            raise ManifestError(str(e)) from None
        if rows:
            yield _table(rows)


def _summary(block: pa.Table) -> pa.Table:
    """One row per block: good and bad counts, and the first bad rows described."""
    bad = block.filter(pc.is_valid(block["_error"])) if "_error" in block.column_names else block.slice(0, 0)
    listed = [describe_bad_row(r) for r in bad.slice(0, MAX_LISTED).to_pylist()]
    return pa.table({"good": [block.num_rows - bad.num_rows], "bad": [bad.num_rows], "listed": [listed]})


def _good_rows(block: pa.Table) -> pa.Table:
    if "_error" in block.column_names:
        block = block.filter(pc.is_null(block["_error"]))
    return block.drop_columns([c for c in _PRIVATE if c in block.column_names])


def manifest_rows_dataset(uri: str, text_field: Optional[str] = "text", s3: Optional[S3Config] = None,
                          num_cpus: Optional[float] = None) -> "ray.data.Dataset":
    """Every row, the bad ones marked with `_where`, `_error` and `_error_detail` (as
    `manifest_rows` does), plus `_row` (-1 on bad rows). Lazy; a missing file raises at once.
    `num_cpus`: per read task (Ray Data's default: 1).

    One read task, its output unsplit: a manifest is one file, read in blocks of up to _BLOCK_ROWS
    rows. Ray Data would otherwise split the read's output towards its default parallelism (a
    40-row manifest came out as 28 blocks), and every later pass (the check, OPD's placement and
    sort, SFT's positions) ran one task, often a freshly started worker process, per block. The
    consumers cut their own blocks where they need parallelism (OPD decodes in `block_rows`)."""
    return ray.data.read_datasource(ManifestDatasource(uri, text_field, s3), num_cpus=num_cpus, override_num_blocks=1)


def open_manifest(uri: str, text_field: Optional[str] = "text", *, skip_bad_rows: bool = False,
                  s3: Optional[S3Config] = None, num_cpus: Optional[float] = None) -> Manifest:
    """Check a manifest in one streaming pass and return its good rows as a lazy dataset.

    Bad rows refuse the manifest with one ManifestError listing them (as `read_manifest` does);
    with `skip_bad_rows` they are left out and counted in a warning."""
    rows = manifest_rows_dataset(uri, text_field, s3, num_cpus)
    try:
        parts = rows.map_batches(_summary, batch_format="pyarrow", batch_size=None, num_cpus=num_cpus).take_all()
    except ManifestError as e:          # Ray re-raises the read task's error as a subclass of it
        raise ManifestError(str(getattr(e, "cause", None) or e)) from None
    good, bad = sum(p["good"] for p in parts), sum(p["bad"] for p in parts)
    listed = [line for p in parts for line in p["listed"]][:MAX_LISTED]
    if bad > len(listed):
        listed.append(f"... and {bad - len(listed)} more")
    if good + bad == 0:
        raise ManifestError(f"{uri}: no rows")
    if bad and not skip_bad_rows:
        raise bad_rows_error(uri, bad, "\n".join(listed))
    if bad:
        log.warning("%s: skipped %d bad row(s) of %d:\n%s", uri, bad, good + bad, "\n".join(listed))
    if not good:
        raise ManifestError(f"{uri}: no usable rows")
    return Manifest(rows.map_batches(_good_rows, batch_format="pyarrow", batch_size=None, num_cpus=num_cpus),
                    good, bad)


def manifest_dataset(uri: str, text_field: Optional[str] = "text", *, skip_bad_rows: bool = False,
                     s3: Optional[S3Config] = None, num_cpus: Optional[float] = None) -> "ray.data.Dataset":
    """The good rows of a manifest as a Ray Data dataset (see `open_manifest`)."""
    return open_manifest(uri, text_field, skip_bad_rows=skip_bad_rows, s3=s3, num_cpus=num_cpus).dataset


__all__ = ["ROW_INDEX", "Manifest", "ManifestDatasource", "manifest_rows_dataset", "open_manifest",
           "manifest_dataset"]
