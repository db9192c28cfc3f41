"""Write a complete ARK-ASR model directory with random weights (tests, benchmarks, new students).

A model directory is what every engine loads: config.json + model.safetensors + tokenizer files
+ processor_config.json + preprocessor_config.json, the layout of a real checkpoint.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch

from ark_ray.model.config import ArkAsrConfig
from ark_ray.model.modeling import ArkAsrForConditionalGeneration
from ark_ray.model.presets import preset_config
from ark_ray.model.processor import ArkAsrProcessor

DEFAULT_TINY_TEXTS = [
    "turn on the kitchen lights", "turn off the bedroom lights", "three seven nine two",
    "move forward two meters", "call alice smith", "what time is it", "open the front door",
    "set a timer for five minutes", "play some music", "one two three four five six seven eight nine zero",
]


def make_tokenizer(preset: str, texts: Optional[Iterable[str]] = None):
    """The tiny BPE for `tiny`, the real Qwen2-based ARK tokenizer for real dimensions."""
    if preset == "tiny":
        from ark_ray.model.tokenizer import build_tiny_tokenizer
        return build_tiny_tokenizer(list(texts or DEFAULT_TINY_TEXTS) * 5, vocab_size=1024)
    from ark_ray.model.tokenizer import build_ark_tokenizer_from_qwen
    return build_ark_tokenizer_from_qwen()


def save_random_model(out_dir: str | os.PathLike, preset: str = "tiny", *, tokenizer=None,
                      texts: Optional[Iterable[str]] = None, seed: int = 0,
                      dtype: torch.dtype = torch.float32, **overrides) -> ArkAsrConfig:
    """Randomly initialised model + its tokenizer/processor files in `out_dir`; returns the config."""
    tokenizer = tokenizer or make_tokenizer(preset, texts)
    cfg = preset_config(preset, tokenizer=tokenizer, **overrides)
    torch.manual_seed(seed)
    model = ArkAsrForConditionalGeneration(cfg).to(dtype)
    model.config.torch_dtype = dtype
    model.save_pretrained(out_dir)
    ArkAsrProcessor(tokenizer).save_pretrained(out_dir)
    return cfg
