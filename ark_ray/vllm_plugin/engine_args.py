"""The vLLM engine arguments that make ARK-ASR fast, from an EngineConfig, in one place.

VllmEngine adds these to its own arguments (model, dtype, lengths, memory); the engine sweep
(bench/engine_sweep.py) varies the same keys, so what it measures is what ships.

  * `mm_processor_cache_gb=0`: every clip is new audio, so vLLM's multimodal processor cache
    only costs: it hashes each waveform (~1.9 MB for 30 s) in the single-threaded front end
    and keeps a copy. With the cache off and prefix caching off (VllmEngine's setting), vLLM
    names each clip by its request id instead of hashing it (vLLM 0.26 and 0.32 alike).
  * `max_num_batched_tokens` / `enable_chunked_prefill`: the step budget, which also sizes the
    encoder budget and encoder cache (clips encoded per step).
  * `hf_overrides` carry the encoder's knobs into the worker (PackedArkAudioEncoder reads them).

Keys this vLLM does not know are dropped (feature detection, as in compat.py).
"""
from __future__ import annotations

import dataclasses


def engine_kwargs(cfg, on_gpu: bool) -> dict:
    """Extra `LLM(...)` keyword arguments for an `ark_ray.config.EngineConfig`."""
    kw: dict = {
        "mm_processor_cache_gb": 0,
        "enable_chunked_prefill": bool(cfg.enable_chunked_prefill),
        "hf_overrides": {"ark_encoder_attention": cfg.encoder_attention,
                         "ark_encoder_compile": bool(cfg.encoder_compile and on_gpu)},
    }
    if on_gpu and cfg.compilation_config:
        kw["compilation_config"] = dict(cfg.compilation_config)
    if cfg.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = int(cfg.max_num_batched_tokens)
    return supported(kw)


def supported(kw: dict) -> dict:
    """`kw` without the keys this vLLM's EngineArgs lacks."""
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:  # pragma: no cover - vLLM absent: nothing to filter against
        return kw
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    return {k: v for k, v in kw.items() if k in known}
