"""The 128-bin Whisper log-mel as a batched torch function (CPU or GPU).

Same numbers as transformers' WhisperFeatureExtractor on a clip (n_fft 400, hop 160, periodic
Hann, centre reflect padding, power 2, slaney mel filters 0-8 kHz, log10 clamp 1e-10, floor at
the clip's max - 8, (x + 4) / 4, frames = n_samples // 160), but padded to the longest clip in
the batch, never to 30 s. Each clip is reflect-padded on its own and its max is taken over its
own frames, so clip i's valid frames equal `log_mel([wave_i])` whatever it is batched with.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Union

import numpy as np

from ark_ray.audio.decode import SAMPLE_RATE

# torch is imported inside the functions that use it: `ark_ray.audio` is imported by every Ray Data
# decode task, which needs only soundfile/soxr; an eager torch import there costs each worker
# ~300 MB and seconds, and a task cancelled in the middle of `import torch` (a pipeline shut down
# mid-block) left a worker whose next import failed with "duplicate registrations".

N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128


def mel_frames(n_samples: int) -> int:
    """Log-mel frames of a clip of `n_samples` at 16 kHz (the STFT's last frame is dropped)."""
    return int(n_samples) // HOP_LENGTH


@lru_cache(maxsize=8)
def _filters(n_mels: int, device: str) -> torch.Tensor:
    import torch
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=n_mels, min_frequency=0.0,
                         max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney",
                         mel_scale="slaney")
    return torch.from_numpy(np.asarray(fb, dtype=np.float32)).T.contiguous().to(device)  # [n_mels, 201]


def mel_filters(n_mels: int = N_MELS, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Slaney mel filterbank [n_mels, 201] (equal to Whisper's mel_filters.npz)."""
    return _filters(n_mels, str(device))


@lru_cache(maxsize=8)
def _window(device: str) -> torch.Tensor:
    import torch

    return torch.hann_window(N_FFT, periodic=True, device=device)


def log_mel(waves: Sequence[Union[np.ndarray, torch.Tensor]], device: Optional[Union[str, torch.device]] = None,
            n_mels: int = N_MELS) -> tuple[torch.Tensor, torch.Tensor]:
    """16 kHz mono clips -> (log-mel [B, n_mels, T_max] float32, valid frames [B] int64).

    Frames past a clip's own length are 0 (the model masks them).
    """
    import torch

    if len(waves) == 0:
        raise ValueError("log_mel needs at least one clip")
    dev = torch.device(device) if device is not None else (
        waves[0].device if isinstance(waves[0], torch.Tensor) else torch.device("cpu"))
    pad = N_FFT // 2
    padded, lengths = [], []
    for w in waves:
        w = torch.as_tensor(w).to(dev, torch.float32).reshape(-1)
        n = w.numel()
        if n == 0:
            raise ValueError("log_mel got an empty clip")
        lengths.append(n)
        if n > pad:
            padded.append(torch.nn.functional.pad(w[None, None], (pad, pad), mode="reflect")[0, 0])
        else:  # torch's reflect needs pad < n; numpy's repeats the reflection like librosa does
            padded.append(torch.from_numpy(np.pad(w.cpu().numpy(), pad, mode="reflect")).to(dev))
    width = max(p.numel() for p in padded)
    batch = torch.zeros(len(padded), width, device=dev)
    for i, p in enumerate(padded):
        batch[i, : p.numel()] = p
    spec = torch.stft(batch, N_FFT, HOP_LENGTH, window=_window(str(dev)), center=False, return_complex=True)
    power = spec.abs() ** 2                                       # [B, 201, frames]
    mel = _filters(n_mels, str(dev)) @ power                      # [B, n_mels, frames]
    log_spec = torch.clamp(mel, min=1e-10).log10()
    frames = torch.tensor([mel_frames(n) for n in lengths], device=dev)
    t_max = int(frames.max())
    log_spec = log_spec[..., :t_max]
    valid = torch.arange(t_max, device=dev)[None, :] < frames[:, None]          # [B, T]
    peak = log_spec.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=(1, 2))
    log_spec = torch.maximum(log_spec, (peak - 8.0)[:, None, None])
    log_spec = (log_spec + 4.0) / 4.0
    log_spec = log_spec.masked_fill(~valid[:, None, :], 0.0)
    return log_spec, frames.to(torch.int64)
