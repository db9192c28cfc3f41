"""ARK-ASR as a vLLM model: our `ArkAudioEncoder` for the audio tower, vLLM's Qwen2 for text.

Loads a real checkpoint as is (`audio_encoder.*` unchanged, `model.*` -> `language_model.model.*`,
`lm_head` tied), places the audio rows at the `<|audio|>` positions vLLM expanded, and
implements `SupportsTranscription` so `vllm serve <dir>` offers /v1/audio/transcriptions.

Generation masks every special/control id except EOS inside `compute_logits` (the reference
bans them too; without the ban the real 0.6B degenerates into special-token repetition), so
every vLLM entry point, the OpenAI endpoints included, decodes like `ArkAsrProcessor` says.
Log-probs vLLM reports are then those of the masked distribution, the same numbers HFEngine
reports. Turn it off with `hf_overrides={"mask_blocked_tokens": False}` to get raw logits.
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext as _nullcontext
from typing import Any

import torch
from torch import nn
from vllm.config import SpeechToTextConfig, VllmConfig
from vllm.inputs import TokensPrompt
from vllm.model_executor.models.interfaces import SupportsMultiModal, SupportsPP, SupportsTranscription
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import (AutoWeightsLoader, WeightsMapper,
                                              init_vllm_registered_model, maybe_prefix)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ark_ray.audio import HOP_LENGTH, SAMPLE_RATE, log_mel, mel_frames
from ark_ray.model.config import audio_token_count
from ark_ray.vllm_plugin import profiling
from ark_ray.vllm_plugin.compat import mark_submodules, split_stt_args
from ark_ray.vllm_plugin.encoder import PackedArkAudioEncoder
from ark_ray.vllm_plugin.processing import (ArkAsrDummyInputsBuilder, ArkAsrMultiModalProcessor,
                                            ArkAsrProcessingInfo, max_audio_seconds,
                                            processor_for)


def _clips(waves: Any) -> list[torch.Tensor]:
    """vLLM's batch of waveforms (one stacked tensor when lengths agree, else a list) -> 1-D clips."""
    if isinstance(waves, torch.Tensor) and waves.dim() == 1:
        return [waves]
    return [w.reshape(-1) for w in waves]


@MULTIMODAL_REGISTRY.register_processor(ArkAsrMultiModalProcessor, info=ArkAsrProcessingInfo,
                                        dummy_inputs=ArkAsrDummyInputsBuilder)
class ArkAsrVllmModel(nn.Module, SupportsMultiModal, SupportsPP, SupportsTranscription):
    # ARK-ASR is trained on Chinese and English and detects the language itself; vLLM warns
    # (and carries on) when a request names another Whisper language.
    supported_languages = {"en": "English", "zh": "Chinese"}

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "model.": "language_model.model.", "lm_head.": "language_model.lm_head."})

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        with mark_submodules(self, "tower", vllm_config, "audio"):
            # packed clips (no work on padding); knobs come as hf_overrides (engine_kwargs)
            self.audio_encoder = PackedArkAudioEncoder(
                config, attention=getattr(config, "ark_encoder_attention", "auto"),
                compile=bool(getattr(config, "ark_encoder_compile", False)))
        self.part_timer = profiling.PartTimer() if profiling.enabled() else None
        with mark_submodules(self, "language", vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config,
                prefix=maybe_prefix(prefix, "language_model"), architectures=["Qwen2ForCausalLM"])
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        blocked: list[int] = []
        if getattr(config, "mask_blocked_tokens", True):
            blocked = processor_for(vllm_config.model_config).blocked_token_ids(config.vocab_size)
        self.register_buffer("blocked_token_ids", torch.tensor(blocked, dtype=torch.long),
                             persistent=False)

    # ------------------------------------------------------------------ multimodal
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return "<|begin_of_audio|><|audio|><|end_of_audio|>"
        raise ValueError(f"ARK-ASR takes audio only, not {modality}")

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(language_model="language_model.",
                                                connector="audio_encoder.adapting.",
                                                tower_model="audio_encoder.")

    def get_language_model(self) -> nn.Module:
        return self.language_model

    def embed_multimodal(self, **kwargs: object):
        """One [N_i, H] tensor per clip, in prompt order (N_i = its `<|audio|>` count)."""
        if kwargs.get("audio_embeds") is not None:
            return tuple(kwargs["audio_embeds"])
        waves = kwargs.get("input_audio")
        if waves is None:
            return []
        weight = self.audio_encoder.whisper.conv1.weight
        timer = self.part_timer
        expected = [int(n) for n in kwargs["feature_lengths"]]
        clips = _clips(waves)
        # The log-mel of every clip of the step, in one batch on the model's device (fp32).
        with timer.part("mel") if timer is not None else _nullcontext():
            mel, frames = log_mel(clips, device=weight.device)
            mel = mel.to(weight.dtype)
        # frame counts come from the lengths (CPU) - no device sync to check them
        got = [mel_frames(c.numel()) for c in clips]
        if got != expected:
            raise RuntimeError(f"mel frames {got} != placeholder frames {expected}")
        if timer is not None:
            timer.count(len(clips), sum(expected))
        rows = self.audio_encoder.forward_packed(mel, expected, timer)
        counts = [audio_token_count(n, self.config.merge_factor) for n in expected]
        return rows.split(counts)

    # ------------------------------------------------------------------ text
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors,
                                         inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor, *args: Any) -> torch.Tensor | None:
        # *args: older vLLM also passes sampling metadata through to the LM head.
        logits = self.language_model.compute_logits(hidden_states, *args)
        if logits is not None and self.blocked_token_ids.numel():
            logits.index_fill_(-1, self.blocked_token_ids.to(logits.device), float("-inf"))
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)

    # ------------------------------------------------------------------ transcription API
    @classmethod
    def get_speech_to_text_config(cls, model_config, task_type: str) -> SpeechToTextConfig:
        limit = max_audio_seconds(str(model_config.tokenizer or model_config.model))
        return SpeechToTextConfig(sample_rate=SAMPLE_RATE, max_audio_clip_s=int(limit))

    @classmethod
    def get_generation_prompt(cls, *args: Any, **kwargs: Any):
        """The ARK prompt with one `<|audio|>` for this (<= 30 s) chunk; vLLM expands it."""
        audio, model_config, task_type = split_stt_args(args, kwargs)
        if task_type != "transcribe":
            raise ValueError(f"ARK-ASR only transcribes; task {task_type!r} is not supported")
        ids = processor_for(model_config).prompt_ids(1)
        return TokensPrompt(prompt_token_ids=ids, multi_modal_data={"audio": audio})

    @classmethod
    def get_num_audio_tokens(cls, audio_duration_s: float, stt_config, model_config) -> int | None:
        merge = processor_for(model_config).merge_factor
        return audio_token_count(int(audio_duration_s * SAMPLE_RATE) // HOP_LENGTH, merge)

    @classmethod
    def post_process_output(cls, text: str) -> str:
        return " ".join(text.split())
