"""Audio in, 16 kHz mono float32 out: decode (soundfile), downmix, cut a segment, resample (soxr)."""
from __future__ import annotations

import io
import os
from typing import BinaryIO, Optional, Union

import numpy as np
import soundfile as sf
import soxr

from ark_ray.audio.errors import AudioError

#: The one sample rate: every clip is decoded and resampled to it; the log-mel, the chunker and the
#: model's audio-token count all assume it (import it from `ark_ray.audio`).
SAMPLE_RATE = 16000
AudioSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO]


def to_mono(wave: np.ndarray) -> np.ndarray:
    """[n] or [n, channels] -> [n] (channel mean)."""
    wave = np.asarray(wave)
    return wave.mean(axis=1) if wave.ndim == 2 else wave


def resample(wave: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    if sr_in == sr_out:
        return np.asarray(wave, dtype=np.float32)
    return soxr.resample(np.asarray(wave, dtype=np.float32), sr_in, sr_out, quality="HQ").astype(np.float32)


def _open(src: AudioSource) -> sf.SoundFile:
    if isinstance(src, (bytes, bytearray)):
        if len(src) == 0:
            raise AudioError("empty", "no bytes")
        src = io.BytesIO(bytes(src))
    elif isinstance(src, (str, os.PathLike)):
        if not os.path.exists(src):
            raise AudioError("unreadable", f"no such file: {src}")
        if os.path.getsize(src) == 0:
            raise AudioError("empty", f"zero-byte file: {src}")
    try:
        return sf.SoundFile(src)
    except sf.LibsndfileError as e:  # not audio, truncated header, unknown container
        # libsndfile's own words, with the file's name; never the repr of an in-memory buffer
        what = "the audio bytes" if isinstance(src, io.BytesIO) else str(src)
        msg = f"cannot open {what}: {e.error_string.strip()}"
        low = msg.lower()
        reason = "unsupported_format" if ("unsupported" in low or "encoding" in low or "codec" in low) else "unreadable"
        raise AudioError(reason, msg) from None
    except (RuntimeError, TypeError, ValueError) as e:
        raise AudioError("unreadable", str(e)) from None


def load_audio(src: AudioSource, *, begin_time: Optional[float] = None, end_time: Optional[float] = None,
               max_duration_s: Optional[float] = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode wav/flac/ogg/mp3 (whatever libsndfile reads) to mono float32 at `sample_rate`.

    `begin_time` / `end_time` (seconds) cut a segment before resampling; only that segment is
    read from disk. `max_duration_s` bounds the (segment's) duration. Raises AudioError.
    """
    if begin_time is not None and begin_time < 0:
        raise AudioError("bad_segment", f"begin_time {begin_time} < 0")
    if begin_time is not None and end_time is not None:
        if end_time == begin_time:
            raise AudioError("zero_length_segment", f"begin_time == end_time == {begin_time}")
        if end_time < begin_time:
            raise AudioError("bad_segment", f"begin_time {begin_time} >= end_time {end_time}")
    with _open(src) as f:
        sr, total = f.samplerate, f.frames
        start = int(round((begin_time or 0.0) * sr))
        stop = total if end_time is None else int(round(end_time * sr))
        if total == 0:
            raise AudioError("empty", "the file holds no samples")
        if start >= total:
            raise AudioError("bad_segment", f"begin_time {begin_time} s is past the end ({total / sr:.3f} s)")
        stop = min(stop, total)
        if stop <= start:
            raise AudioError("zero_length_segment", "the segment holds no samples")
        if max_duration_s is not None and (stop - start) / sr > max_duration_s:
            raise AudioError("too_long", f"{(stop - start) / sr:.1f} s > limit {max_duration_s} s")
        try:
            f.seek(start)
            data = f.read(stop - start, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise AudioError("unreadable", f"decode failed: {e}") from None
    if data.shape[0] == 0:
        raise AudioError("unreadable", "truncated: no samples could be decoded")
    wave = to_mono(data)
    if not np.isfinite(wave).all():
        raise AudioError("non_finite", "NaN or inf samples")
    return resample(wave, sr, sample_rate)


def check_waveform(wave: np.ndarray, *, max_duration_s: Optional[float] = None,
                   sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Validate an in-memory waveform (the same rules as decoded files); returns float32 mono."""
    wave = to_mono(np.asarray(wave, dtype=np.float32))
    if wave.size == 0:
        raise AudioError("empty", "no samples")
    if not np.isfinite(wave).all():
        raise AudioError("non_finite", "NaN or inf samples")
    if max_duration_s is not None and len(wave) / sample_rate > max_duration_s:
        raise AudioError("too_long", f"{len(wave) / sample_rate:.1f} s > limit {max_duration_s} s")
    return wave


def is_silent(wave: np.ndarray, threshold_dbfs: float = -60.0) -> bool:
    """True when the clip's peak is below `threshold_dbfs` (nothing to transcribe)."""
    peak = float(np.max(np.abs(wave))) if len(wave) else 0.0
    return peak <= 10 ** (threshold_dbfs / 20)


def check_not_silent(wave: np.ndarray, threshold_dbfs: float = -60.0) -> np.ndarray:
    if is_silent(wave, threshold_dbfs):
        raise AudioError("silent", f"peak below {threshold_dbfs} dBFS")
    return wave
