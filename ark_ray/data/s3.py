"""Local paths and s3:// URIs behind one pyarrow filesystem interface.

Why pyarrow's S3FileSystem: Ray Data reads and writes through it, it streams (no temp files),
and it pickles, so the driver resolves endpoint and credentials once (flags first, then the
standard AWS environment variables) and every worker gets the same settings, also on a
cluster whose nodes do not share the driver's environment.
"""
from __future__ import annotations

import os
import posixpath
from typing import Mapping, Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs

from ark_ray.config import S3Config, UserError


class StorageError(UserError):
    """A URI or storage setting that cannot be used (bad scheme, bad endpoint, missing bucket)."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def _first(env: Mapping[str, str], *names: str) -> Optional[str]:
    for n in names:
        if env.get(n):
            return env[n]
    return None


def s3_options(cfg: Optional[S3Config] = None, env: Optional[Mapping[str, str]] = None) -> dict:
    """S3FileSystem keyword arguments: explicit settings win, then AWS_* environment variables.

    With no key anywhere, credentials are left to the AWS default chain (config files,
    instance role) of each process that opens the filesystem.
    """
    cfg = cfg or S3Config()
    env = os.environ if env is None else env
    endpoint = cfg.endpoint_url or _first(env, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    opts: dict = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else "https://" + endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"S3 endpoint must look like http(s)://host[:port], got {endpoint!r}")
        opts["endpoint_override"] = parsed.netloc
        opts["scheme"] = parsed.scheme
    region = cfg.region or _first(env, "AWS_REGION", "AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    if cfg.anonymous:
        opts["anonymous"] = True
        return opts
    key = cfg.access_key_id or _first(env, "AWS_ACCESS_KEY_ID")
    secret = cfg.secret_access_key or _first(env, "AWS_SECRET_ACCESS_KEY")
    if bool(key) != bool(secret):
        raise StorageError("S3 credentials need both an access key id and a secret access key")
    if key:
        opts["access_key"], opts["secret_key"] = key, secret
        token = cfg.session_token or _first(env, "AWS_SESSION_TOKEN")
        if token:
            opts["session_token"] = token
    return opts


def s3_filesystem(cfg: Optional[S3Config] = None, env: Optional[Mapping[str, str]] = None) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(**s3_options(cfg, env))


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    parsed = urlparse(str(uri))
    if parsed.scheme not in ("s3", "s3a") or not parsed.netloc:
        raise StorageError(f"not an s3://bucket/key URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def resolve(uri: str, s3: Optional[S3Config] = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for an s3:// URI or a local path (made absolute)."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_filesystem(s3), posixpath.join(bucket, key) if key else bucket
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r} (use s3:// or a local path)")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of `resolve`: a filesystem path back to the URI users see (s3://... or /abs/path)."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write so a reader never sees half a file: S3 PUTs are atomic; locally, temp file + rename."""
    if isinstance(fs, pafs.LocalFileSystem):
        parent, name = posixpath.split(path)
        fs.create_dir(parent, recursive=True)
        tmp = posixpath.join(parent, f".tmp-{os.getpid()}-{name}")
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)
