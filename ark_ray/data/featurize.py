"""The Ray Data featurize stage shared by training jobs: audio path -> log-mel, or an error row."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ark_ray.audio import N_MELS, SAMPLE_RATE, AudioError, load_audio, log_mel


def _opt_float(v) -> Optional[float]:
    """None / NaN (how Arrow hands back a null) -> None, else float."""
    if v is None:
        return None
    v = float(v)
    return None if np.isnan(v) else v


def featurize_rows(batch: dict, max_audio_s: Optional[float] = None) -> dict:
    """map_batches fn (numpy format): adds `mel` [128, T] float32, `frames`, `duration_s`, `error` ("" when fine).

    A clip that cannot be used keeps its row, with `error` set to the AudioError text, `frames` 0 and a
    one-frame zero mel: callers count and report it instead of silently dropping it.
    """
    n = len(batch["audio"])
    mels, frames, durs, errors = [], [], [], []
    for i in range(n):
        b, e = batch.get("begin_time", [None] * n)[i], batch.get("end_time", [None] * n)[i]
        b, e = _opt_float(b), _opt_float(e)
        try:
            wave = load_audio(str(batch["audio"][i]), begin_time=b, end_time=e, max_duration_s=max_audio_s)
            mel, fr = log_mel([wave])
            mels.append(mel[0].numpy())
            frames.append(int(fr[0]))
            durs.append(len(wave) / SAMPLE_RATE)
            errors.append("")
        except AudioError as err:
            mels.append(np.zeros((N_MELS, 1), np.float32))
            frames.append(0)
            durs.append(0.0)
            errors.append(str(err))
    out = dict(batch)
    mel_col = np.empty(n, dtype=object)
    for i, m in enumerate(mels):
        mel_col[i] = m
    out.update(mel=mel_col, frames=np.asarray(frames, np.int64), duration_s=np.asarray(durs),
               error=np.asarray(errors, dtype=object))
    return out


def pad_mels(mels, frames) -> tuple[np.ndarray, np.ndarray]:
    """Ragged [128, T_i] mels -> [B, 128, T_max] (zero padded) + frames [B]."""
    t = max(int(f) for f in frames)
    out = np.zeros((len(mels), N_MELS, max(1, t)), np.float32)
    for i, (m, f) in enumerate(zip(mels, frames)):
        out[i, :, : int(f)] = np.asarray(m).reshape(N_MELS, -1)[:, : int(f)]
    return out, np.asarray(frames, np.int64)
