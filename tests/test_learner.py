"""DeepSpeed learner group under Ray on CPU: ZeRO 2/3, world sizes, resume, HF export, manifests."""
import json

import numpy as np
import pytest
import torch

from ark_ray.config import LearnerConfig
from ark_ray.data.manifest import ManifestError, read_manifest
from ark_ray.model import ArkAsrForConditionalGeneration
from ark_ray.model.factory import save_random_model
from ark_ray.model.processor import ArkAsrProcessor
from ark_ray.train.learner import LearnerGroup


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("learner_model")
    save_random_model(d, "tiny", seed=3)
    return str(d)


@pytest.fixture(scope="module")
def batch(model_dir):
    proc = ArkAsrProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(8000)).astype(np.float32) for _ in range(4)]
    # equal-length targets so every rank holds the same number of loss tokens
    b = proc(waves, texts=["call alice", "play music", "move left", "open door"], padding_side="right")
    return {k: v.numpy() for k, v in b.items()}


def train(model_dir, batch, steps, **kw):
    cfg = LearnerConfig(lr=1e-3, seed=0, **kw)
    g = LearnerGroup(model_dir, cfg, total_steps=10)
    try:
        return [g.train_step(batch)["loss"] for _ in range(steps)], g
    except Exception:
        g.shutdown()
        raise


@pytest.mark.parametrize("stage", [2, 3])
def test_loss_falls_and_world_sizes_agree(ray_local, model_dir, batch, stage):
    one, g1 = train(model_dir, batch, 4, num_workers=1, zero_stage=stage)
    g1.shutdown()
    two, g2 = train(model_dir, batch, 4, num_workers=2, zero_stage=stage)
    g2.shutdown()
    assert one[-1] < one[0] * 0.9
    np.testing.assert_allclose(one, two, rtol=2e-3)


def test_resume_continues_with_the_same_losses(ray_local, model_dir, batch, tmp_path):
    full, g = train(model_dir, batch, 4, num_workers=1, zero_stage=2)
    g.shutdown()
    first, g = train(model_dir, batch, 2, num_workers=1, zero_stage=2)
    g.save_checkpoint(str(tmp_path / "ck"), {"data_step": 2})
    g.shutdown()
    g = LearnerGroup(model_dir, LearnerConfig(lr=1e-3, seed=0), total_steps=10)
    try:
        assert g.load_checkpoint(str(tmp_path / "ck"))["data_step"] == 2
        rest = [g.train_step(batch)["loss"] for _ in range(2)]
    finally:
        g.shutdown()
    np.testing.assert_allclose(first + rest, full, rtol=1e-5)


def test_export_reloads_with_identical_logits(ray_local, model_dir, batch, tmp_path):
    _, g = train(model_dir, batch, 2, num_workers=1, zero_stage=2)
    try:
        sd = g.state_dict()
        g.export_hf(str(tmp_path / "exp"), dtype=torch.float32)
    finally:
        g.shutdown()
    m = ArkAsrForConditionalGeneration.from_pretrained(tmp_path / "exp").eval()
    ref = ArkAsrForConditionalGeneration.from_pretrained(model_dir).eval()
    ref.load_state_dict(sd, strict=False)
    inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(m(**inputs).logits, ref(**inputs).logits)
    assert ArkAsrProcessor.from_pretrained(tmp_path / "exp").token_ids.audio > 0


@pytest.mark.parametrize("line,msg", [
    ('{"text": "x"}', "missing or empty 'audio'"),
    ('not json', "not valid JSON"),
    ('{"audio": "a.wav"}', "missing text field"),
    ('{"audio": "a.wav", "text": "x", "begin_time": "soon"}', "begin_time must be a number"),
    ('{"audio": "a.wav", "text": "x", "begin_time": 2, "end_time": 1}', "begin_time 2 >= end_time 1"),
])
def test_bad_manifest_rows(tmp_path, line, msg):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"audio": "ok.wav", "text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ManifestError, match=msg) as e:
        read_manifest(p)
    assert "m.jsonl:2" in str(e.value)


def test_manifest_resolves_relative_paths(tmp_path):
    p = tmp_path / "sub" / "m.jsonl"
    p.parent.mkdir()
    p.write_text(json.dumps({"audio": "a/b.flac", "text": "x", "extra": 1}) + "\n")
    (row,) = read_manifest(p)
    assert row["audio"] == str(tmp_path / "sub" / "a" / "b.flac") and row["extra"] == 1
