"""A CPU vLLM engine asks for what it needs: the model's weights plus a KV cache sized from its own
settings (ark_ray/engines/cpu_memory.py), and its Ray actor asks Ray for that memory."""
import json

import pytest

from ark_ray.config import EngineConfig
from ark_ray.engines import cpu_memory
from ark_ray.engines.cpu_memory import GiB, engine_memory_bytes, kv_cache_bytes, model_bytes
from ark_ray.runtime import engine_actor_options


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    """A checkpoint directory: config.json with known decoder dims, a safetensors header of 1000 + 24 elements."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    (tmp_path / "config.json").write_text(json.dumps(
        {"text_config": {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                         "hidden_size": 512}}))
    header = json.dumps({"__metadata__": {}, "a": {"dtype": "BF16", "shape": [10, 100], "data_offsets": [0, 2000]},
                         "b": {"dtype": "BF16", "shape": [2, 3, 4], "data_offsets": [2000, 2048]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(2048))
    return str(tmp_path)


def test_kv_cache_sized_from_the_engine_settings(ckpt):
    per_token = 4 * 2 * 64 * 2 * 4                       # layers x kv heads x head_dim x (K, V) x fp32
    assert kv_cache_bytes(ckpt, 64, 1024) == 64 * 1024 * per_token
    assert kv_cache_bytes(ckpt, 8, 512, dtype="bfloat16") == max(8 * 512 * per_token // 2, cpu_memory.MIN_KV_BYTES)
    # capped, but never below one full-length sequence (vLLM would refuse to start)
    assert kv_cache_bytes(ckpt, 1024, 4096, max_gb=0.25) == GiB // 4
    assert kv_cache_bytes(ckpt, 1, 4096, max_gb=1e-6) == (4096 + cpu_memory.BLOCK_SLACK_TOKENS) * per_token
    assert model_bytes(ckpt) == 1024 * 4 and model_bytes(ckpt, "bfloat16") == 1024 * 2


def test_vllm_cpu_kvcache_space_overrides(ckpt, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert kv_cache_bytes(ckpt, 64, 1024) == 3 * GiB
    assert cpu_memory.cpu_kv_kwargs(ckpt, 64, 1024) == {}     # vLLM reads the variable itself


def test_cpu_engine_actor_asks_ray_for_model_plus_kv(ckpt):
    eng = EngineConfig(max_num_seqs=16, max_model_len=1024)
    opts = engine_actor_options(ckpt, eng)
    assert opts["memory"] == engine_memory_bytes(ckpt, eng) == 1024 * 4 + kv_cache_bytes(ckpt, 16, 1024)
    assert opts["num_cpus"] == eng.num_cpus and opts["num_gpus"] == 0
    assert "memory" not in engine_actor_options(ckpt, EngineConfig(num_gpus=1))       # GPU engines: vLLM's share
    assert "memory" not in engine_actor_options(ckpt, EngineConfig(backend="hf"))
    assert "memory" not in engine_actor_options("/nonexistent/model", eng)           # unreadable here: no request
