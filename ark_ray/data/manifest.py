"""Manifests in the seed's format: one row per utterance with `audio`, `text`, `begin_time`, `end_time`.

`audio` may be absolute, relative to the manifest's folder, or an s3:// URI. Extra columns are kept
(outputs carry them through). A malformed row is a ManifestError naming the file and line; a
missing audio *file* is not a manifest error: it becomes an error row when the audio is loaded.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Optional


class ManifestError(ValueError):
    """A manifest row that cannot be used, with the file and line it came from."""


def _resolve(audio: str, base: pathlib.Path) -> str:
    if "://" in audio or os.path.isabs(audio):
        return audio
    return str((base / audio).resolve())


def _check(row: dict, where: str, text_field: Optional[str]) -> dict:
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    audio = row.get("audio")
    if not isinstance(audio, str) or not audio:
        raise ManifestError(f"{where}: missing or empty 'audio' field")
    if text_field is not None:
        text = row.get(text_field)
        if not isinstance(text, str):
            raise ManifestError(f"{where}: missing text field {text_field!r}")
    for key in ("begin_time", "end_time"):
        v = row.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ManifestError(f"{where}: {key} must be a number or null, got {v!r}")
    b, e = row.get("begin_time"), row.get("end_time")
    if b is not None and e is not None and e <= b:
        raise ManifestError(f"{where}: begin_time {b} >= end_time {e}")
    return row


def read_manifest(path: str | os.PathLike, text_field: Optional[str] = "text") -> list[dict]:
    """Rows with `audio` resolved to an absolute path/URI and a stable `id` (file:line if absent)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    base = path.parent
    rows: list[dict] = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        raw = pq.read_table(path).to_pylist()
        items = [(f"{path}:row {i + 1}", r) for i, r in enumerate(raw)]
    else:
        items = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    for where, row in items:
        row = dict(_check(row, where, text_field))
        row["audio"] = _resolve(row["audio"], base)
        row.setdefault("id", where)
        row.setdefault("begin_time", None)
        row.setdefault("end_time", None)
        rows.append(row)
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows
