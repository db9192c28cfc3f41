"""What a batch job should transcribe: audio files under a folder / S3 prefix, or a manifest's rows.

Only paths and metadata live here (the driver never touches waveforms). Every input gets a
stable `key` (its URI, plus the segment when a manifest cuts one), which is how a rerun into
the same output recognises work already done.
"""
from __future__ import annotations

import os
import posixpath
import tempfile
from typing import Iterable, Optional, Sequence

import pyarrow.fs as pafs

from ark_ray.config import AUDIO_EXTENSIONS, S3Config, UserError
from ark_ray.data.manifest import manifest_rows
from ark_ray.data.s3 import is_s3, read_bytes, resolve, to_uri

MANIFEST_SUFFIXES = (".jsonl", ".json", ".parquet")
DEFAULT_EXTENSIONS = AUDIO_EXTENSIONS


class InputError(UserError):
    """The job's --input names nothing usable (missing, empty, or no audio under it)."""


def is_manifest(uri: str) -> bool:
    return str(uri).lower().endswith(MANIFEST_SUFFIXES)


def _norm_exts(extensions: Iterable[str]) -> tuple[str, ...]:
    exts = tuple(("." + e.lstrip(".")).lower() for e in extensions)
    if not exts:
        raise InputError("no audio extensions given")
    return exts


def list_audio(uri: str, extensions: Sequence[str] = DEFAULT_EXTENSIONS,
               s3: Optional[S3Config] = None) -> list[str]:
    """Audio files (by extension, case-insensitive, recursively; hidden files skipped) as sorted URIs."""
    exts = _norm_exts(extensions)
    fs, root = resolve(uri, s3)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        if info.path.lower().endswith(exts):
            return [to_uri(fs, info.path)]
        raise InputError(f"{uri} is neither a folder, an audio file ({', '.join(exts)}) nor a manifest")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:
        raise InputError(f"input not found: {uri}") from None
    out = []
    for fi in infos:
        if fi.type != pafs.FileType.File:
            continue
        rel = fi.path[len(root):].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if fi.path.lower().endswith(exts):
            out.append(to_uri(fs, fi.path))
    if not out:
        raise InputError(f"no audio files ({', '.join(exts)}) under {uri}")
    return sorted(out)


def _fetch_manifest(uri: str, s3: Optional[S3Config]) -> list[dict]:
    """manifest_rows on an s3:// manifest (good and bad rows): parsed from a temp copy, relative
    audio paths kept on S3."""
    fs, path = resolve(uri, s3)
    try:
        data = read_bytes(fs, path)
    except FileNotFoundError:
        raise InputError(f"manifest not found: {uri}") from None
    base = "s3://" + posixpath.dirname(path)
    with tempfile.TemporaryDirectory(prefix="ark-manifest-") as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        with open(local, "wb") as f:
            f.write(data)
        rows = manifest_rows(local, text_field=None)
        real_tmp = os.path.realpath(tmp)
        for r in rows:
            for prefix in (tmp, real_tmp):
                if r["audio"].startswith(prefix + os.sep):
                    r["audio"] = base + "/" + r["audio"][len(prefix) + 1:]
                    break
            for field in ("id", "_where"):
                if isinstance(r.get(field), str) and r[field].startswith(local + ":"):
                    r[field] = uri + r[field][len(local):]
    return rows


def item_key(audio: str, begin_time: Optional[float] = None, end_time: Optional[float] = None) -> str:
    """The stable id of one input: its URI, plus `#begin-end` when only a segment is transcribed."""
    if begin_time is None and end_time is None:
        return audio
    b = "" if begin_time is None else f"{float(begin_time):.3f}"
    e = "" if end_time is None else f"{float(end_time):.3f}"
    return f"{audio}#{b}-{e}"


def load_inputs(uri: str, extensions: Sequence[str] = DEFAULT_EXTENSIONS,
                s3: Optional[S3Config] = None) -> list[dict]:
    """One row per input: `key`, `audio` (URI), `begin_time`, `end_time`, plus a manifest's other columns.

    A manifest that lists the same audio and segment twice yields two inputs (`#2` appended to
    the second key), so every input row still gets exactly one output row. A manifest row that
    cannot be used keeps `_error`/`_error_detail` (the job writes it as an error row) and is keyed
    by its place in the manifest (`<manifest>:<line>`).
    """
    uri = str(uri)
    if is_manifest(uri):
        if is_s3(uri):
            rows = _fetch_manifest(uri, s3)
        else:
            if not os.path.isfile(uri):
                raise InputError(f"manifest not found: {uri}")
            rows = manifest_rows(uri, text_field=None)
    else:
        if not is_s3(uri) and not os.path.exists(uri):
            raise InputError(f"input not found: {uri}")
        rows = [{"audio": a, "begin_time": None, "end_time": None} for a in list_audio(uri, extensions, s3)]
    seen: dict[str, int] = {}
    for r in rows:
        if "_error" in r:
            where = r.pop("_where")
            key = where if is_s3(where) else os.path.abspath(where)
        else:
            key = item_key(r["audio"], r.get("begin_time"), r.get("end_time"))
        seen[key] = seen.get(key, 0) + 1
        r["key"] = key if seen[key] == 1 else f"{key}#{seen[key]}"
    return rows
