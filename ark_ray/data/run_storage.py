"""A run's output folder on any filesystem pyarrow knows: a local path, s3://bucket/prefix, gs://, ...

Why one object for it: a training job writes checkpoints (from every learner rank, on whichever
node each runs), metrics, a summary, plots and the final export, and a run must be able to go on
from them on another cluster. Everything that writes there goes through `RunStorage`, which
pickles (the driver resolves the endpoint and credentials once; Ray actors on other nodes get the
same settings, as `ark_ray.data.s3` explains), so a rank uploads its own shards.

What lives where:
- `uri` (the job's `output_dir`): the run's lasting record. Whole-file writes are atomic (a temp
  file and a rename locally; an object PUT on S3), so a reader never sees half a file.
- `local_dir`: a folder on the driver's disk for what has to be a local file while the job runs
  (the live `job.log` that the console moves stdout/stderr onto, the metrics buffer, the HF export
  before its upload). For a local `output_dir` it is `output_dir` itself, so nothing moves and a
  local run looks as it always did. For a remote one it is `local_dir` if given, else
  `<tmp>/ark-ray-runs/<scheme>/<bucket>/<prefix>`; `upload(rel)` copies a file or folder of it to
  the same place under `uri` (a no-op when the two are one folder).
- `metrics.jsonl` (`MetricsLog`): one JSON line per record, appended to the local buffer and
  uploaded as a whole object every `upload_every_s` seconds, at every checkpoint and at the end.
  Whole-object uploads keep it one file that any JSON-lines reader takes (one line per step: a
  long run's file is a few MB), at the price of losing at most `upload_every_s` of records should
  the driver's node vanish; the checkpoint records how many lines it covers, so a resumed run cuts
  the records of the steps it redoes (`truncate`), and nothing is logged twice.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import posixpath
import re
import sys
import tempfile
import time
from typing import Callable, Optional, Union

import pyarrow.fs as pafs

from ark_ray.config import S3Config
from ark_ray.data.s3 import StorageError, is_s3, resolve, write_bytes_atomic


def _open(uri: str, s3: Optional[S3Config]) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, root path inside it, the URI users see) for a local path or any pyarrow URI."""
    uri = str(uri).rstrip("/") or "/"
    if is_s3(uri) or "://" not in uri or uri.startswith("file://"):
        fs, root = resolve(uri, s3)
        return fs, root, (f"s3://{root}" if is_s3(uri) else root)
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid for unknown schemes, OSError for missing drivers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"cannot open {uri!r} as a run folder: {first} (use a local path, s3://, or "
                           "another URI pyarrow.fs.FileSystem.from_uri knows: gs://, abfs://, hdfs://)") from None
    return fs, root.rstrip("/"), uri


def _default_local_dir(uri: str) -> pathlib.Path:
    scheme, rest = uri.split("://", 1)
    safe = re.sub(r"[^A-Za-z0-9._/-]", "_", rest).strip("/")
    return pathlib.Path(tempfile.gettempdir()) / "ark-ray-runs" / scheme / safe


class RunStorage:
    """The output folder of one run (see the module docstring). Paths given to its methods are
    relative to the run folder, with `/` separators (`checkpoints/step_4/opd_state.json`)."""

    def __init__(self, uri: Union[str, os.PathLike], s3: Optional[S3Config] = None,
                 local_dir: Optional[Union[str, os.PathLike]] = None):
        self.fs, self.root, self.uri = _open(str(uri), s3)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        if self.is_local:
            if local_dir is not None and os.path.abspath(local_dir) != self.root:
                raise StorageError(f"local_dir={local_dir} is only for a remote output_dir; {self.uri} is local "
                                   "and is its own run folder")
            self.local_dir = pathlib.Path(self.root)
        else:
            self.local_dir = pathlib.Path(local_dir).resolve() if local_dir else _default_local_dir(self.uri)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        if self.is_local:
            self.fs.create_dir(self.root, recursive=True)
        else:
            self._check_reachable()

    def _check_reachable(self) -> None:
        """One request now, so a wrong endpoint, credentials or bucket fail the job before it starts
        its actors, not at its first checkpoint."""
        bucket = self.root.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket if is_s3(self.uri) else self.root)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StorageError(f"cannot reach the run folder {self.uri}: {first}") from None
        if is_s3(self.uri) and info.type == pafs.FileType.NotFound:
            raise StorageError(f"run folder {self.uri}: bucket {bucket!r} does not exist (create it first, or check "
                               "the endpoint: s3.endpoint_url / AWS_ENDPOINT_URL)")

    def __repr__(self) -> str:
        return f"RunStorage({self.uri!r}, local_dir={str(self.local_dir)!r})"

    # ------------------------------------------------------------------ names
    def path(self, rel: str = "") -> str:
        """`rel` as a path inside `fs`."""
        return posixpath.join(self.root, rel) if rel else self.root

    def uri_of(self, rel: str = "") -> str:
        """`rel` as the URI (or absolute local path) a user can open."""
        return f"{self.uri}/{rel}" if rel else self.uri

    def local(self, rel: str = "") -> pathlib.Path:
        """`rel` inside `local_dir` (the driver's local run folder)."""
        return self.local_dir / rel if rel else self.local_dir

    # ------------------------------------------------------------------ files
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write a whole file atomically; its URI."""
        write_bytes_atomic(self.fs, self.path(rel), data)
        return self.uri_of(rel)

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj, **kw) -> str:
        return self.write_text(rel, json.dumps(obj, **kw))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def read_json(self, rel: str):
        return json.loads(self.read_text(rel))

    def list_dir(self, rel: str = "") -> dict[str, bool]:
        """{name: is_folder} of `rel`'s direct children ({} when `rel` does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return {posixpath.basename(i.path.rstrip("/")): i.type == pafs.FileType.Directory for i in infos}

    def delete(self, rel: str) -> None:
        """Remove a file or a folder with everything in it (nothing if absent)."""
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    # ------------------------------------------------------------------ folders
    def upload_dir(self, local: Union[str, os.PathLike], rel: str) -> list[str]:
        """Copy every file under the local folder `local` to `rel` (relative names kept); the
        relative names copied. Each file lands whole (atomic per file, not per folder: a folder
        whose completeness matters gets a marker written after it, as checkpoints do)."""
        local = pathlib.Path(local)
        names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        for name in names:
            self._put_file(local / name, self.path(posixpath.join(rel, name)))
        return names

    def _put_file(self, src: pathlib.Path, dst: str) -> None:
        """One local file to `dst` in `fs`, streamed; locally a copy beside `dst`, then a rename."""
        if self.is_local:
            import shutil

            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = os.path.join(os.path.dirname(dst), f".tmp-{os.getpid()}-{os.path.basename(dst)}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
            return
        # no create_dir: on an object store it would add empty "folder/" marker objects
        pafs.copy_files(str(src), dst, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download_dir(self, rel: str, local: Union[str, os.PathLike],
                     keep: Optional[Callable[[str], bool]] = None) -> list[str]:
        """Copy the files under `rel` into the local folder `local` (relative names kept), only
        those `keep(name)` accepts if given; the relative names copied."""
        base = self.path(rel)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        names = sorted(posixpath.relpath(i.path, base) for i in infos if i.type == pafs.FileType.File)
        names = [n for n in names if keep is None or keep(n)]
        dst_fs = pafs.LocalFileSystem()
        for name in names:
            dst = pathlib.Path(local) / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(posixpath.join(base, name), str(dst), source_filesystem=self.fs,
                            destination_filesystem=dst_fs)
        return names

    def upload_after_failure(self, rel: str = "job.log") -> None:
        """A failed run's `rel` (its job.log) to the run folder too, unless the storage itself is what
        failed: then one line on stderr says so, and the run's own error stays the one shown."""
        try:
            self.upload(rel)
        except Exception as e:  # noqa: BLE001 - the run's own error is the one to show
            print(f"({rel} not copied to {self.uri}: {e})", file=sys.stderr)

    def upload(self, rel: str) -> Optional[str]:
        """Copy `local_dir/rel` (a file or a folder) to `rel` under the URI; its URI. A no-op for
        a local run folder (local_dir is the run folder); None if there is nothing to copy."""
        src = self.local(rel)
        if not src.exists():
            return None
        if not self.is_local:
            if src.is_dir():
                self.upload_dir(src, rel)
            else:
                self._put_file(src, self.path(rel))
        return self.uri_of(rel)

    # ------------------------------------------------------------------ helpers for the jobs
    def metrics_log(self, rel: str = "metrics.jsonl", upload_every_s: float = 30.0) -> "MetricsLog":
        return MetricsLog(self, rel, upload_every_s)

    def for_ray_train(self) -> tuple[str, pafs.FileSystem]:
        """(storage_path, storage_filesystem) for `ray.train.RunConfig`: Ray Train's checkpoints
        then go to this run folder with the same endpoint and credentials."""
        return self.root, self.fs


class MetricsLog:
    """`metrics.jsonl` as a file-like object (`write` a line, `flush`): appended to the local
    buffer `storage.local(rel)`; for a remote run folder the whole buffer is uploaded when
    `upload_every_s` has passed at a `flush`, at `flush(upload=True)` and at `close`.

    Opening continues the run's file: the remote copy, when there is one, replaces the local
    buffer first (the remote file is the run's record; a fresh node has no buffer at all).
    """

    def __init__(self, storage: RunStorage, rel: str = "metrics.jsonl", upload_every_s: float = 30.0):
        self.storage, self.rel, self.upload_every_s = storage, rel, upload_every_s
        self.local_path = storage.local(rel)
        self.local_path.parent.mkdir(parents=True, exist_ok=True)
        if not storage.is_local:
            self.local_path.write_bytes(storage.read_bytes(rel) if storage.exists(rel) else b"")
        self._f: io.TextIOBase = open(self.local_path, "a")
        self.lines = self._count()
        self._uploaded_at = time.monotonic()
        self._dirty = False

    def _count(self) -> int:
        with open(self.local_path, "rb") as f:
            return sum(1 for _ in f)

    def write(self, text: str) -> int:
        """Append `text` (whole lines, each ending in a newline)."""
        self.lines += text.count("\n")
        self._dirty = True
        return self._f.write(text)

    def append(self, record: dict) -> None:
        """One record as a JSON line."""
        self.write(json.dumps(record, default=str) + "\n")

    def flush(self, upload: bool = False) -> None:
        """Flush the local buffer; upload it if asked or if `upload_every_s` has passed."""
        self._f.flush()
        if self.storage.is_local or not self._dirty:
            return
        if upload or time.monotonic() - self._uploaded_at >= self.upload_every_s:
            self.storage.upload(self.rel)
            self._uploaded_at = time.monotonic()
            self._dirty = False

    def truncate(self, n_lines: int) -> int:
        """Keep the first `n_lines` records (what a checkpoint covers) and drop the rest, which a
        resumed run writes again; returns how many were dropped."""
        self._f.flush()
        with open(self.local_path, "rb") as f:
            kept = f.readlines()
        dropped = max(0, len(kept) - n_lines)
        if dropped:
            self._f.close()
            self.local_path.write_bytes(b"".join(kept[:n_lines]))
            self._f = open(self.local_path, "a")
            self.lines = n_lines
            self._dirty = True
            self.flush(upload=True)
        return dropped

    def close(self) -> None:
        if not self._f.closed:
            self.flush(upload=True)
            self._f.close()
