"""A job's inputs, outputs and models checked before anything starts.

Why before: a missing manifest or a read-only output found by a Ray Data task or an engine actor
costs the user 20 s of start-up, 60 log lines and a traceback; found here it costs one line and a
second. Every check raises a `UserError` (InputError, StorageError, ...) whose text starts with
the config key at fault and says what to do, so `ark_ray.cli.run_job` prints it as the job's one
line and exits 2. Nothing here imports torch, Ray or vLLM: a job calls these right after parsing
its config.

- `check_input`: a manifest, folder or s3:// prefix exists and can be read (one GET of a byte).
- `open_output`: the run folder (`RunStorage`), writable: a probe file written and deleted.
- `check_model`: an HF-format model directory (config.json, weights).
- `check_part_format`: a batch output's part files are in the format asked for (a rerun skips
  the inputs they hold, so another `--format` would silently write nothing).
- `claim_run`: no silent overwrite. A run folder that already holds a run is continued only with
  `resume`, emptied of the job's artefacts only with `overwrite`, and otherwise refused, so one
  metrics.jsonl never mixes two runs.
"""
from __future__ import annotations

import os
import uuid
from typing import Iterable, Optional

import pyarrow.fs as pafs

from ark_ray.config import S3Config, UserError
from ark_ray.data.listing import InputError
from ark_ray.data.row_files import PART_SUFFIX, list_parts
from ark_ray.data.run_storage import RunStorage
from ark_ray.data.s3 import StorageError, is_s3, resolve

#: demo:// inputs are made on first use (ark_ray/demo); their names are checked here, not their files.
DEMO_INPUTS = ("demo://unlabelled", "demo://heldout")
DEMO_MODELS = ("demo://student",)
#: Weight files one of which an HF-format model directory holds.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _demo_name_ok(uri: str, names: Iterable[str]) -> bool:
    for name in names:
        rest = uri[len(name):] if uri.startswith(name) else None
        if rest == "" or (rest and rest[0] == "-" and rest[1:].isdigit() and int(rest[1:]) > 0):
            return True
    return False


def _check_demo(uri: str, key: str, names: tuple[str, ...]) -> None:
    if not _demo_name_ok(uri, names):
        raise InputError(f"{key}: {uri} is not a demo set; the demo's are "
                         f"{', '.join(n + ('[-N]' if n in DEMO_INPUTS else '') for n in names)}")


def check_input(uri: Optional[str], key: str, s3: Optional[S3Config] = None,
                demo: tuple[str, ...] = DEMO_INPUTS) -> None:
    """`uri` (a manifest file, a local folder or an s3:// prefix/object) exists and can be read.
    None passes (an optional input left unset); a `demo://` name passes if the demo knows it."""
    if uri is None:
        return
    uri = str(uri)
    if uri.startswith("demo://"):
        _check_demo(uri, key, demo)
        return
    try:
        fs, path = resolve(uri, s3)
    except StorageError as e:
        raise StorageError(f"{key}: {e}") from None
    if not is_s3(uri):
        _check_local_input(uri, path, key)
        return
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            with fs.open_input_file(path) as f:
                f.read_at(1, 0)
            return
        if info.type == pafs.FileType.Directory:
            return
        bucket = path.split("/", 1)[0]
        if bucket != path and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise InputError(f"{key}: {uri}: bucket {bucket!r} does not exist (check the name, or the endpoint: "
                             "s3.endpoint_url / AWS_ENDPOINT_URL)")
    except UserError:
        raise
    except OSError as e:
        raise StorageError(f"{key}: cannot read {uri}: {_first_line(e)} (check the endpoint and credentials: "
                           "s3.* keys or the AWS_* environment)") from None
    raise InputError(f"{key}: {uri} not found (no such object or prefix)")


def _check_local_input(uri: str, path: str, key: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{key}: {uri} not found (check the path; a relative one is read from {os.getcwd()})")
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as e:
        raise InputError(f"{key}: cannot read {uri}: {e.strerror or _first_line(e)}") from None


def open_output(uri: str, key: str, s3: Optional[S3Config] = None,
                local_dir: Optional[str] = None) -> RunStorage:
    """The run folder at `uri` (made if missing), proven writable: a probe file is written and
    deleted (on S3 a PUT and a DELETE), so a read-only folder, a missing bucket or write-less
    credentials fail now."""
    try:
        storage = RunStorage(uri, s3, local_dir)
    except UserError as e:
        raise StorageError(f"{key}: {e}") from None
    except OSError as e:
        raise StorageError(f"{key}: cannot create {uri}: {e.strerror or _first_line(e)} (choose a folder you can "
                           "write to)") from None
    probe = f".ark-ray-write-probe-{uuid.uuid4().hex[:12]}"
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
        if not storage.is_local and not storage.fs.get_file_info(
                pafs.FileSelector(storage.root, recursive=True, allow_not_found=True)):
            # pyarrow leaves an empty "folder/" marker object after deleting an object store
            # prefix's last object; the run folder was empty, so it goes too
            storage.fs.delete_dir(storage.root)
    except OSError as e:
        raise StorageError(f"{key}: cannot write to {storage.uri}: {e.strerror or _first_line(e)} (choose a "
                           "folder you can write to, or check the credentials' rights)") from None
    return storage


def check_model(path: Optional[str], key: str, demo: tuple[str, ...] = DEMO_MODELS) -> None:
    """`path` is an HF-format model directory: config.json and a weights file (or a demo:// model)."""
    if path is None:
        return
    path = str(path)
    if path.startswith("demo://"):
        _check_demo(path, key, demo)
        return
    if not os.path.isdir(path):
        raise InputError(f"{key}: {path} is not a folder (give an HF-format model directory: config.json and "
                         "model.safetensors)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"{key}: {path} has no config.json (not an HF-format model directory)")
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES):
        raise InputError(f"{key}: {path} has no weights (model.safetensors or pytorch_model.bin)")


def check_part_format(storage: RunStorage, fmt: str, overwrite: bool, key: str = "output") -> None:
    """The batch job's output holds no part files of a format other than `fmt` (unless `overwrite`
    deletes them): a rerun counts their inputs as done, so `--format parquet` into a folder of JSONL
    parts would write nothing new and mix two formats in one output."""
    if overwrite:
        return
    parts = list_parts(storage.fs, storage.root)
    for found, suffix in PART_SUFFIX.items():
        n = sum(p.endswith(suffix) for p in parts)
        if found != fmt and n:
            raise UserError(f"{key}: {storage.uri} holds {n} {found} part file(s) of an earlier run, and a rerun "
                            f"skips their inputs, so --format {fmt} would write nothing new; pass --format {found} to "
                            f"continue that run, --overwrite to redo it as {fmt}, or choose another output folder")


def _is_folder(storage: RunStorage, rel: str) -> bool:
    return storage.fs.get_file_info(storage.path(rel)).type == pafs.FileType.Directory


def claim_run(storage: RunStorage, *, resume: bool, overwrite: bool, artefacts: Iterable[str],
              key: str = "output_dir") -> str:
    """Decide what this job does with its run folder: 'new' (no run there, with or without
    `resume`: a job submitted with --resume on every try starts the first one fresh), 'resume'
    (continue the run there), 'overwrite' (the job's `artefacts`, the files and folders a run of it
    writes, are deleted now; nothing else in the folder is touched). A run folder that holds any
    artefact, without `resume` or `overwrite`, is refused."""
    artefacts = list(artefacts)
    if resume and overwrite:
        raise UserError("resume and overwrite exclude each other: --resume continues the run in "
                        f"{storage.uri}, --overwrite deletes it")
    present = [a for a in artefacts if storage.exists(a)]
    if not present:
        return "new"     # also with resume: a job resubmitted with --resume on every try starts its first
    if resume:
        return "resume"
    if overwrite:
        for a in present:
            storage.delete(a)
            local = storage.local(a)
            if not storage.is_local and local.exists():   # the remote run's local buffers too
                import shutil

                shutil.rmtree(local) if local.is_dir() else local.unlink()
        return "overwrite"
    shown = ", ".join(a.rstrip("/") + ("/" if _is_folder(storage, a) else "") for a in present[:3])
    raise UserError(f"{key}: {storage.uri} already holds a run ({shown}); pass --resume to continue it, "
                    "--overwrite to replace it, or choose another output folder")
