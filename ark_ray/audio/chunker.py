"""The one long-audio chunker: windows of at most `max_chunk_s`, cut where the audio is quietest.

Training, batch transcription and serving all cut long clips here, so the model sees the same
windows everywhere and segment timestamps (each window's offset) agree across them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ark_ray.audio.decode import SAMPLE_RATE


@dataclass
class AudioChunk:
    start_s: float
    end_s: float
    samples: np.ndarray


def _frame_rms(x: np.ndarray, frame: int, hop: int) -> np.ndarray:
    if len(x) < frame:
        return np.array([np.sqrt(np.mean(x ** 2))]) if len(x) else np.zeros(1)
    n = 1 + (len(x) - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]
    return np.sqrt(np.mean(x[idx] ** 2, axis=1))


def chunk_audio(wave: np.ndarray, *, max_chunk_s: float = 30.0, search_s: float = 5.0,
                sample_rate: int = SAMPLE_RATE, frame_ms: float = 25.0) -> list[AudioChunk]:
    """Cut `wave` into contiguous windows (no gaps, no overlaps) of at most `max_chunk_s`.

    Each cut is placed at the lowest short-frame RMS within the last `search_s` seconds of the
    window, i.e. in a pause when there is one, never mid-word when a pause exists.
    """
    wave = np.asarray(wave, dtype=np.float32)
    max_len = int(max_chunk_s * sample_rate)
    if max_len <= 0:
        raise ValueError("max_chunk_s must be positive")
    search = min(int(search_s * sample_rate), max_len // 2)
    frame = max(1, int(frame_ms / 1000 * sample_rate))
    hop = max(1, frame // 2)
    chunks: list[AudioChunk] = []
    start = 0
    total = len(wave)
    while total - start > max_len:
        lo, hi = start + max_len - search, start + max_len
        rms = _frame_rms(wave[lo:hi], frame, hop)
        best = int(np.argmin(rms))
        cut = lo + best * hop + frame // 2
        cut = min(max(cut, lo), hi)
        chunks.append(AudioChunk(start / sample_rate, cut / sample_rate, wave[start:cut]))
        start = cut
    chunks.append(AudioChunk(start / sample_rate, total / sample_rate, wave[start:total]))
    return chunks
