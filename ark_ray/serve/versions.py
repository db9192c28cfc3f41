"""Model directories as a Serve config names them: the path (`resolve_model_dir`) and the version
label (`model_version`): what `GET /v1/models`, the `X-Ark-Model-Version` header, the
per-version metrics and the promotion history call a model.

Why a fingerprint and not the path: a promotion copies an export into place, a rollback names an
older directory again, and an s3:// candidate is downloaded under a new path; the label must stay
the same for the same weights and change when the weights change. Hashing every byte of a 0.6B
checkpoint (1.2 GB) on each build would cost seconds, so the fingerprint reads every file's name
and size, the config files whole, and the first and last MiB of each weight file (a retrained
model changes both ends of its safetensors: the header's data offsets and the tensors).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re

from ark_ray.config import ConfigError

_EDGE = 1 << 20
_UNSET_VAR = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")
_WHOLE = (".json", ".jinja", ".txt", ".model")


def resolve_model_dir(path: str) -> str:
    """Expand `$VAR` / `${VAR}`; a relative path that exists here becomes absolute (replicas'
    working directory differs from `serve run`'s)."""
    expanded = os.path.expandvars(path)
    missing = _UNSET_VAR.findall(expanded)
    if missing:
        raise ConfigError(f"model {path!r}: environment variable {missing[0]} is not set")
    if not os.path.isabs(expanded) and os.path.exists(expanded):
        expanded = os.path.abspath(expanded)
    return expanded


def fingerprint(model_dir: str | os.PathLike) -> str:
    """12 hex digits; equal for directories with the same files (names, sizes, configs, weight edges)."""
    root = pathlib.Path(model_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(root).as_posix()
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with path.open("rb") as f:
            if rel.endswith(_WHOLE) or size <= 2 * _EDGE:
                h.update(f.read())
            else:
                h.update(f.read(_EDGE))
                f.seek(size - _EDGE)
                h.update(f.read(_EDGE))
    return h.hexdigest()[:12]


def model_name(model_dir: str | os.PathLike) -> str:
    """A readable stem: the directory's name, or its run's name for a run's `final` export."""
    p = pathlib.Path(str(model_dir).rstrip("/"))
    name = p.name
    if name in ("final", "model", "export") and p.parent.name:
        name = f"{p.parent.name}-{name}"
    return name or "model"


def model_version(model_dir: str | os.PathLike) -> str:
    """`<name>-<fingerprint>`, e.g. `teacher-3fa2c1d09e4b`; just the name if the directory cannot be
    read here (the replicas, which must read it, report their own failure)."""
    try:
        return f"{model_name(model_dir)}-{fingerprint(model_dir)}"
    except OSError:
        return model_name(model_dir)
