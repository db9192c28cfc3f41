"""Audio front end shared by training, batch and serving: decode, segment, resample, log-mel, chunk."""
from ark_ray.audio.chunker import AudioChunk, chunk_audio
from ark_ray.audio.decode import (SAMPLE_RATE, check_not_silent, check_waveform, is_silent, load_audio,
                                  resample, to_mono)
from ark_ray.audio.errors import REASONS, AudioError
from ark_ray.audio.mel import HOP_LENGTH, N_FFT, N_MELS, log_mel, mel_filters, mel_frames

__all__ = ["SAMPLE_RATE", "N_MELS", "N_FFT", "HOP_LENGTH", "AudioError", "REASONS", "AudioChunk",
           "load_audio", "resample", "to_mono", "check_waveform", "is_silent", "check_not_silent",
           "log_mel", "mel_filters", "mel_frames", "chunk_audio"]
