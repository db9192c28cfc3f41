"""Engines: one `Transcriber` interface; `VllmEngine` (default) and `HFEngine` (reference/fallback)."""
from __future__ import annotations

from ark_ray.config import EngineConfig
from ark_ray.engines.base import Segment, Transcriber, Transcript


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


__all__ = ["Transcriber", "Transcript", "Segment", "make_engine"]
