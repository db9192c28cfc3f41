"""The bundled demo corpus: manifests, audio, disjoint splits, size budget, determinism."""
import json
import pathlib
import shutil

import numpy as np
import pytest
import soundfile as sf

from ark_ray.audio import load_audio
from ark_ray.demo import corpus


def rows(split):
    return [json.loads(line) for line in corpus.manifest_path(split).read_text().splitlines()]


@pytest.mark.parametrize("split", ["dev", "test", "train_sample", "multilingual"])
def test_manifest_and_audio(split):
    rs = rows(split)
    assert len(rs) >= 15
    for r in rs:
        assert set(r) >= {"id", "audio", "text", "language", "duration", "begin_time", "end_time"}
        path = corpus.corpus_dir() / r["audio"]
        info = sf.info(path)
        assert info.samplerate == 16000 and info.channels == 1 and info.format == "FLAC"
        assert abs(info.frames / 16000 - r["duration"]) < 1e-3
        assert r["text"] and r["text"] == r["text"].strip()
    w = load_audio(corpus.corpus_dir() / rs[0]["audio"])
    assert np.abs(w).max() > 0.05


def test_splits_disjoint_by_text():
    train = set(corpus.texts_for("train", 4000))
    dev, test = {r["text"] for r in rows("dev")}, {r["text"] for r in rows("test")}
    assert not (dev & train) and not (test & train) and not (dev & test)
    assert {r["text"] for r in rows("train_sample")} <= train


def test_size_budget():
    total = sum(p.stat().st_size for p in corpus.corpus_dir().rglob("*") if p.is_file())
    assert total <= 5 * 1024 * 1024, total


def test_texts_are_deterministic():
    assert corpus.texts_for("test", 60) == corpus.texts_for("test", 60)
    assert corpus.texts_for("train", 50, seed=0) != corpus.texts_for("train", 50, seed=1)
    assert [r["text"] for r in rows("test")] == corpus.texts_for("test", 60)


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("flite")), reason="espeak-ng/flite not installed")
def test_regeneration_is_bit_identical(tmp_path):
    for r in rows("dev")[:2]:
        out = tmp_path / "x.flac"
        corpus.synthesize(r["text"], f"0:{r['id']}", out, r["language"])
        a, _ = sf.read(out, dtype="int16")
        b, _ = sf.read(corpus.corpus_dir() / r["audio"], dtype="int16")
        assert np.array_equal(a, b)


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("flite")), reason="espeak-ng/flite not installed")
def test_opus_split_is_smaller_and_loads_like_flac(tmp_path):
    """--format opus: an .opus manifest our loader reads, same durations, ~5x fewer bytes."""
    from ark_ray.data.manifest import read_manifest

    flac = corpus.generate_split(tmp_path / "f", "train", 3, fmt="flac")
    opus = corpus.generate_split(tmp_path / "o", "train", 3, fmt="opus")
    fr, orows = read_manifest(str(flac)), read_manifest(str(opus))
    assert [r["audio"].endswith(".opus") for r in orows] == [True] * 3
    assert [r["duration"] for r in orows] == [r["duration"] for r in fr]
    for f, o in zip(fr, orows):
        a, b = load_audio(f["audio"]), load_audio(o["audio"])
        assert abs(len(a) - len(b)) <= 1
    def size(rows):
        return sum(pathlib.Path(r["audio"]).stat().st_size for r in rows)
    assert size(orows) * 3 < size(fr)
