"""The transcriber's CPU stage (Ray Data map_batches tasks): an audio column -> 16 kHz mono waves,
or error rows.

Why its own module: a batch input may be anything a folder, a bucket or a user's Dataset holds.
The audio column may carry a path or URI (local, s3://), the file's bytes, an array with its
sample rate, or Hugging Face's audio struct ({bytes, path} as stored in Parquet, {array,
sampling_rate} as decoded). Decoding sniffs the container first (an MP4/M4A, WMA, WebM, AMR or
RealAudio file is an `unsupported_format` to convert, not a corrupt file), cuts the row's segment,
flags silence, and every failure becomes the row's `error` reason instead of stopping the job.
Every input column is kept as it is (the batches are Arrow tables, so types and nulls survive).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from ark_ray.audio import (HOP_LENGTH, SAMPLE_RATE, AudioError, check_not_silent, check_waveform, is_silent,
                           load_audio, resample)
from ark_ray.config import S3Config
from ark_ray.data.manifest import normalize_segment
from ark_ray.data.s3 import is_s3, read_bytes, resolve

#: Columns the stage adds (or replaces); `wave` only travels to the engine stage, which drops it.
WAVE = "wave"
ADDED = {WAVE: pa.large_list(pa.float32()), "duration_s": pa.float64(), "silent": pa.bool_(),
         "error": pa.string(), "error_detail": pa.string()}


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
    if isinstance(src, (bytes, bytearray)):
        return bytes(src[:16])
    try:
        with open(src, "rb") as f:
            return f.read(16)
    except OSError:
        return b""


def decode_one(audio, begin_time=None, end_time=None, *, sample_rate: Optional[int] = None,
               s3: Optional[S3Config] = None, max_audio_s: Optional[float] = None, silence_dbfs: float = -60.0,
               silent_is_error: bool = False) -> np.ndarray:
    """One input (a path/URI, a file's bytes, or samples at `sample_rate`) to a 16 kHz wave;
    raises AudioError (its reason becomes the error row's `error`).

    Silent input is returned like any other (decode_batch flags it) unless `silent_is_error`."""
    b, e = normalize_segment(_opt_float(begin_time), _opt_float(end_time))   # open-audio-opd's -1 = unset
    if isinstance(audio, np.ndarray):
        wave = _cut_array(audio, sample_rate or SAMPLE_RATE, b, e, max_audio_s)
    else:
        src = audio
        if isinstance(audio, str) and is_s3(audio):
            fs, path = resolve(audio, s3)
            try:
                src = read_bytes(fs, path)
            except OSError as err:  # missing object, access denied, network gave up after retries
                raise AudioError("unreadable", f"{audio}: {err}") from None
        elif isinstance(audio, str) and audio.startswith("file://"):
            src = audio[len("file://"):]
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


def _cut_array(samples: np.ndarray, sr: int, b: Optional[float], e: Optional[float],
               max_audio_s: Optional[float]) -> np.ndarray:
    """An in-memory clip: the same segment and length rules as a decoded file, then 16 kHz."""
    wave = np.asarray(samples, dtype=np.float32)
    if wave.ndim == 2 and wave.shape[0] < wave.shape[1]:
        wave = wave.T                       # [channels, n] as torchaudio and HF hold it
    if b is not None or e is not None:
        if e is not None and e <= (b or 0.0):
            raise AudioError("zero_length_segment" if e == (b or 0.0) else "bad_segment",
                             f"begin_time {b or 0.0:g} >= end_time {e:g}")
        start = int(round((b or 0.0) * sr))
        if start >= len(wave):
            raise AudioError("bad_segment", f"begin_time {b} s is past the end ({len(wave) / sr:.3f} s)")
        wave = wave[start:None if e is None else int(round(e * sr))]
    wave = check_waveform(wave, max_duration_s=max_audio_s, sample_rate=sr)
    return resample(wave, int(sr))


# --------------------------------------------------------------------------------------------
# the audio column, whatever it holds
# --------------------------------------------------------------------------------------------


def _list_rows(arr: pa.Array) -> Iterator[Optional[np.ndarray]]:
    """Rows of a list-of-numbers array as float32 numpy arrays (no Python float per sample)."""
    arr = arr.cast(pa.large_list(pa.float32())) if not pa.types.is_large_list(arr.type) else arr
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    for i in range(len(arr)):
        yield None if not arr[i].is_valid else values[offsets[i]:offsets[i + 1]]


def audio_values(column: pa.ChunkedArray, sample_rates: Optional[list] = None) -> list[tuple]:
    """(source, sample rate or None) per row: source is a str (path/URI), bytes or a float32 array.

    `sample_rates` (a column named by the caller) gives arrays their rate; an array without
    one is taken as 16 kHz. A null cell comes back as (None, None) (an `empty` error row)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    t = arr.type
    n = len(arr)
    rates = list(sample_rates) if sample_rates is not None else [None] * n
    if isinstance(t, pa.ExtensionType):     # Ray's tensor columns (from_numpy, from_items of arrays)
        return [(None if x is None else np.asarray(x, np.float32), r)
                for x, r in zip(arr.to_numpy(zero_copy_only=False), rates)]
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return [(x, None) for x in arr.to_pylist()]
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return [(x, None) for x in arr.to_pylist()]
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        if pa.types.is_fixed_size_list(t):
            arr = arr.cast(pa.list_(t.value_type))
        return list(zip(_list_rows(arr), rates))
    if pa.types.is_struct(t):               # Hugging Face's Audio feature
        names = {t.field(i).name for i in range(t.num_fields)}
        if "array" in names:
            arrays = list(_list_rows(arr.field("array")))
            srs = arr.field("sampling_rate").to_pylist() if "sampling_rate" in names else rates
            return list(zip(arrays, srs))
        if names & {"bytes", "path"}:
            data = arr.field("bytes").to_pylist() if "bytes" in names else [None] * n
            paths = arr.field("path").to_pylist() if "path" in names else [None] * n
            return [((d if d else p), None) for d, p in zip(data, paths)]
    raise TypeError(f"audio column of type {t}: expected a path/URI string, bytes, an array of samples "
                    "or Hugging Face's audio struct")


def _column(table: pa.Table, name: Optional[str]) -> Optional[list]:
    return table.column(name).to_pylist() if name and name in table.column_names else None


def decode_batch(table: pa.Table, *, audio_column: str = "audio", sample_rate_column: Optional[str] = "sample_rate",
                 begin_column: Optional[str] = "begin_time", end_column: Optional[str] = "end_time",
                 s3: Optional[S3Config] = None, max_audio_s: Optional[float] = None, silence_dbfs: float = -60.0,
                 silent_is_error: bool = False) -> pa.Table:
    """map_batches fn (pyarrow format): the same rows plus `wave` (16 kHz float32), `duration_s`,
    `silent`, `error` and `error_detail` (null when fine).

    A row that arrives with an `error` already set (an unusable manifest line) keeps it and is not
    decoded; its `error_detail` too."""
    n = table.num_rows
    if audio_column not in table.column_names:
        raise KeyError(f"no audio column {audio_column!r} in {table.column_names} (set audio_column)")
    sources = audio_values(table.column(audio_column), _column(table, sample_rate_column))
    begins = _column(table, begin_column) or [None] * n
    ends = _column(table, end_column) or [None] * n
    err = _column(table, "error") or [None] * n
    detail = _column(table, "error_detail") or [None] * n
    waves: list[np.ndarray] = []
    dur = np.zeros(n, np.float64)
    silent: list = [None] * n
    for i, (src, sr) in enumerate(sources):
        w = np.zeros(0, np.float32)
        if err[i]:
            detail[i] = detail[i] or err[i]
        elif src is None or (isinstance(src, str) and not src):
            err[i], detail[i] = "empty", "no audio in this row"
        else:
            try:
                w = decode_one(src, begins[i], ends[i], sample_rate=sr, s3=s3, max_audio_s=max_audio_s,
                               silence_dbfs=silence_dbfs, silent_is_error=silent_is_error)
                dur[i] = len(w) / SAMPLE_RATE
                silent[i] = is_silent(w, silence_dbfs)
                err[i] = detail[i] = None
            except AudioError as ex:
                err[i], detail[i] = ex.reason, ex.message
        waves.append(w)
    lengths = np.fromiter((len(w) for w in waves), np.int64, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.concatenate(waves) if n else np.zeros(0, np.float32)
    added = {WAVE: pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values, pa.float32())),
             "duration_s": pa.array(dur, pa.float64()), "silent": pa.array(silent, pa.bool_()),
             "error": pa.array(err, pa.string()), "error_detail": pa.array(detail, pa.string())}
    return set_columns(table, added)


def set_columns(table: pa.Table, columns: dict) -> pa.Table:
    """`table` with each named column replaced in place, or appended when new."""
    for name, arr in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    return table


def waves_of(table: pa.Table) -> list[np.ndarray]:
    """The `wave` column back as one writable float32 array per row (torch and vLLM refuse the
    read-only views the object store hands out)."""
    return [np.array(w, np.float32) for w in _list_rows(table.column(WAVE).combine_chunks())]
