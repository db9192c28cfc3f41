"""Stage 1 of the batch job (CPU tasks): an input's bytes -> 16 kHz mono float32, or an error row.

Why its own module: a batch input may be anything a folder or a bucket holds, so decoding sniffs
the container first (an MP4/M4A, WMA, WebM, AMR or RealAudio file is an `unsupported_format` to
convert, not a corrupt file), cuts the manifest's segment and flags silence, and every failure
becomes the row's `error` reason instead of stopping the job.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ark_ray.audio import HOP_LENGTH, SAMPLE_RATE, AudioError, check_not_silent, is_silent, load_audio
from ark_ray.config import S3Config
from ark_ray.data.s3 import is_s3, read_bytes, resolve


def _opt_float(v) -> Optional[float]:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


#: Leading bytes of audio containers libsndfile cannot open: such a file is an unsupported
#: format (a codec to convert first), not a corrupt one.
_FOREIGN_CONTAINERS = {b"ftyp": "MP4/M4A", b"\x30\x26\xb2\x75": "ASF/WMA", b"\x1a\x45\xdf\xa3": "Matroska/WebM",
                       b"#!AMR": "AMR", b".ra\xfd": "RealAudio"}


def _foreign_container(head: bytes) -> Optional[str]:
    for magic, name in _FOREIGN_CONTAINERS.items():
        if head.startswith(magic) or head[4:8] == magic:
            return name
    return None


def _head(src) -> bytes:
    if isinstance(src, bytes):
        return src[:16]
    try:
        with open(src, "rb") as f:
            return f.read(16)
    except OSError:
        return b""


def decode_one(audio: str, begin_time=None, end_time=None, *, s3: Optional[S3Config] = None,
               max_audio_s: Optional[float] = None, silence_dbfs: float = -60.0,
               silent_is_error: bool = False) -> np.ndarray:
    """One input to a waveform; raises AudioError (the reason becomes the error row's `error`).

    Silent input is returned like any other (decode_batch flags it) unless `silent_is_error`."""
    b, e = _opt_float(begin_time), _opt_float(end_time)
    if is_s3(audio):
        fs, path = resolve(audio, s3)
        try:
            src = read_bytes(fs, path)
        except OSError as err:  # missing object, access denied, network gave up after retries
            raise AudioError("unreadable", f"{audio}: {err}") from None
    else:
        src = audio
    try:
        wave = load_audio(src, begin_time=b, end_time=e, max_duration_s=max_audio_s)
    except AudioError as ex:
        codec = _foreign_container(_head(src)) if ex.reason == "unreadable" else None
        if codec or "unimplemented format" in ex.message:
            raise AudioError("unsupported_format", f"{codec or 'codec'} not decodable here: {ex.message}") from None
        raise
    if len(wave) < HOP_LENGTH:
        raise AudioError("empty", f"{len(wave)} samples: shorter than one 10 ms frame")
    return check_not_silent(wave, silence_dbfs) if silent_is_error else wave


def decode_batch(batch: dict, *, s3: Optional[S3Config] = None, max_audio_s: Optional[float] = None,
                 silence_dbfs: float = -60.0, silent_is_error: bool = False) -> dict:
    """map_batches fn (numpy format): adds `wave`, `duration_s`, `silent`, `error` and `error_detail`
    ("" when fine). A row whose manifest line was unusable (`row_error` set) keeps that error."""
    n = len(batch["key"])
    waves = np.empty(n, dtype=object)
    dur = np.zeros(n, np.float64)
    silent = np.zeros(n, bool)
    err = np.full(n, "", dtype=object)        # "" = fine (Arrow keeps strings as strings;
    detail = np.full(n, "", dtype=object)     # an all-None column comes back as NaN)
    row_err = batch.get("row_error", np.full(n, "", dtype=object))
    for i in range(n):
        w = np.zeros(0, np.float32)
        if row_err[i]:
            err[i], detail[i] = row_err[i], batch["row_error_detail"][i]
        else:
            try:
                w = decode_one(str(batch["audio"][i]), batch["begin_time"][i], batch["end_time"][i], s3=s3,
                               max_audio_s=max_audio_s, silence_dbfs=silence_dbfs, silent_is_error=silent_is_error)
                dur[i] = len(w) / SAMPLE_RATE
                silent[i] = is_silent(w, silence_dbfs)
            except AudioError as ex:
                err[i], detail[i] = ex.reason, ex.message
        waves[i] = w
    out = dict(batch)
    out.update(wave=waves, duration_s=dur, silent=silent, error=err, error_detail=detail)
    return out


def decode_block(block: dict, s3: Optional[S3Config], max_audio_s: Optional[float],
                 silence_dbfs: float, silent_is_error: bool = False) -> tuple[dict, dict]:
    """Remote task: (small info the driver reads, the decoded block that goes to an engine)."""
    out = decode_batch(block, s3=s3, max_audio_s=max_audio_s, silence_dbfs=silence_dbfs,
                       silent_is_error=silent_is_error)
    return {"rows": len(block["key"]), "audio_s": float(np.sum(out["duration_s"]))}, out
