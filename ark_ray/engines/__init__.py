"""Engines: one `Transcriber` interface; `VllmEngine` (default) and `HFEngine` (reference/fallback).

`AsyncTranscriber` is the serving side (one window per request, awaited or streamed):
`AsyncVllmEngine`, on vLLM's AsyncLLM."""
from __future__ import annotations

from ark_ray.config import EngineConfig
from ark_ray.engines.base import AsyncTranscriber, Segment, Transcriber, Transcript


def make_engine(model_dir: str, cfg: EngineConfig | None = None) -> Transcriber:
    """The engine `cfg.backend` names, built for `model_dir` (an HF-format ARK-ASR directory)."""
    cfg = cfg or EngineConfig()
    if cfg.backend == "hf":
        from ark_ray.engines.hf import HFEngine
        return HFEngine(model_dir, device=cfg.device, dtype=cfg.dtype, max_batch_size=cfg.max_num_seqs,
                        max_chunk_s=cfg.max_chunk_s)
    if cfg.backend == "vllm":
        from ark_ray.engines.vllm_engine import VllmEngine
        return VllmEngine(model_dir, cfg)
    raise ValueError(f"unknown engine backend {cfg.backend!r}")


def make_async_engine(model_dir: str, cfg: EngineConfig | None = None) -> AsyncTranscriber:
    """The async (serving) engine for `cfg.backend`; only vLLM has one (HF serves through batches)."""
    cfg = cfg or EngineConfig()
    if cfg.backend != "vllm":
        raise ValueError(f"no async engine for backend {cfg.backend!r} (only vllm)")
    from ark_ray.engines.async_vllm import AsyncVllmEngine
    return AsyncVllmEngine(model_dir, cfg)


__all__ = ["Transcriber", "AsyncTranscriber", "Transcript", "Segment", "make_engine", "make_async_engine"]
