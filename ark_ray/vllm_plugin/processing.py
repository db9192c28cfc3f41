"""vLLM's multimodal processing for ARK-ASR: raw clips in, checked waveforms + frame counts out,
and the one `<|audio|>` placeholder of a prompt expanded to that clip's N audio tokens.

The log-mel itself is computed by the model on its device (`embed_multimodal`), batched over
every clip of a step: on the GPU it is nearly free, while in the single-threaded front-end
process that runs this processor it was a serial cost (~3.5 ms per 10 s clip on one CPU core;
moving it gained ~10 % end to end on an H100, docs/benchmarks.md).
Every convention (frame count, token count, token ids) comes from `ArkAsrProcessor`, so a
prompt built here is token-for-token the one the HF model and training see. Each clip keeps its
own length (no padding to 30 s or to the batch); the model pads when it batches clips and the
encoder masks the padding, so a clip's result never depends on its neighbours.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement, PromptUpdate, PromptUpdateDetails)

from ark_ray.audio import HOP_LENGTH, SAMPLE_RATE, AudioError, check_waveform, mel_frames
from ark_ray.model.config import ArkAsrConfig, audio_token_count
from ark_ray.model.processor import ArkAsrProcessor
from ark_ray.vllm_plugin.compat import (BaseDummyInputsBuilder, batched_field, make_data_parser,
                                        split_hf_processor_args)

#: The longest clip one prompt takes (the model was trained on <= 30 s; longer audio is cut
#: by a chunker first: ours in the Ray jobs, vLLM's own in /v1/audio/transcriptions).
DEFAULT_MAX_AUDIO_S = 30.0
#: Samples per audio token: 8 mel frames (conv stride 2, then 4 frames merged) x 160 hop.
SAMPLES_PER_TOKEN = 8 * HOP_LENGTH


@lru_cache(maxsize=8)
def load_processor(path: str) -> ArkAsrProcessor:
    """The model directory's ArkAsrProcessor, loaded once per process."""
    return ArkAsrProcessor.from_pretrained(path)


def processor_for(model_config) -> ArkAsrProcessor:
    """The processor of a vLLM ModelConfig (its tokenizer dir holds processor_config.json)."""
    return load_processor(str(model_config.tokenizer or model_config.model))


@lru_cache(maxsize=8)
def max_audio_seconds(path: str) -> float:
    """`chunk_length` of the checkpoint's preprocessor_config.json (30 s for ARK-ASR)."""
    cfg_path = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            return float(json.load(f).get("chunk_length", DEFAULT_MAX_AUDIO_S))
    return DEFAULT_MAX_AUDIO_S


class ArkAsrProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> ArkAsrConfig:
        return self.ctx.get_hf_config(ArkAsrConfig)

    def get_hf_processor(self, **kwargs: object) -> ArkAsrProcessor:
        proc = processor_for(self.ctx.model_config)
        merge = self.get_hf_config().merge_factor
        if proc.merge_factor != merge:
            raise ValueError(f"processor_config.json merge_factor {proc.merge_factor} != "
                             f"config.json merge_factor {merge}")
        return proc

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}  # ArkAsrProcessor takes no per-request options

    def get_data_parser(self):
        hidden = getattr(self, "_get_expected_hidden_size", lambda: None)()
        return make_data_parser(
            target_sr=SAMPLE_RATE, target_channels=1, audio_resample_method="soxr",
            expected_hidden_size=hidden,
            allow_missing_mm_embeddings=getattr(self, "allow_missing_mm_embeddings", False))

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": None}

    def max_audio_s(self) -> float:
        mc = self.ctx.model_config
        return max_audio_seconds(str(mc.tokenizer or mc.model))

    def get_mm_max_tokens_per_item(self, seq_len: int,
                                   mm_counts: Mapping[str, int] | None = None) -> Mapping[str, int]:
        """Tokens of the longest clip, capped so a prompt that holds it still fits `seq_len`."""
        longest = audio_token_count(int(self.max_audio_s() * SAMPLE_RATE) // HOP_LENGTH,
                                    self.get_hf_config().merge_factor)
        overhead = len(self.get_hf_processor().prompt_ids(0))
        return {"audio": max(1, min(longest, seq_len - overhead))}


class ArkAsrDummyInputsBuilder(BaseDummyInputsBuilder[ArkAsrProcessingInfo]):
    """Profiling input: silent clips as long as the longest one a prompt can hold."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().audio_token * mm_counts.get("audio", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        n_tokens = self.info.get_mm_max_tokens_per_item(seq_len, mm_counts)["audio"]
        overrides = (mm_options or {}).get("audio")
        return {"audio": self._get_dummy_audios(length=n_tokens * SAMPLES_PER_TOKEN,
                                                num_audios=mm_counts.get("audio", 0),
                                                overrides=overrides)}


class ArkAsrMultiModalProcessor(BaseMultiModalProcessor[ArkAsrProcessingInfo]):
    def _call_hf_processor(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Each clip's checked waveform (float32 [n_i]) and its mel frame count T_i.

        Called with vLLM's old or new signature (see compat); the old one also reads the
        prompt's ids back, unexpanded (vLLM applies the placeholder expansion itself).
        """
        prompt, data, old_style = split_hf_processor_args(args, kwargs)
        clips = data.get("audio", data.get("audios"))
        if clips is None:
            clips = []
        elif not isinstance(clips, (list, tuple)):
            clips = [clips]
        out: dict[str, Any] = self._featurize(clips) if len(clips) else {}
        if old_style:
            ids = self.info.get_tokenizer().encode(prompt or "", add_special_tokens=False)
            out["input_ids"] = torch.tensor([ids], dtype=torch.long)
        return BatchFeature(out)

    def _hf_processor_applies_updates(self, *args: Any, **kwargs: Any) -> bool:
        return False  # older vLLM asks; our features never come with expanded ids

    def _featurize(self, clips: Sequence[Any]) -> dict[str, Any]:
        limit = self.info.max_audio_s()
        waves = []
        for clip in clips:
            wave = check_waveform(np.asarray(clip, dtype=np.float32), max_duration_s=limit)
            if wave.shape[0] < HOP_LENGTH:
                raise AudioError("empty", f"{wave.shape[0]} samples: shorter than one 10 ms frame")
            waves.append(torch.from_numpy(np.ascontiguousarray(wave)))
        lengths = torch.tensor([mel_frames(w.shape[0]) for w in waves], dtype=torch.long)
        return {"input_audio": waves, "feature_lengths": lengths}

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]):
        return dict(input_audio=batched_field("audio"),
                    feature_lengths=batched_field("audio", keep_on_cpu=True),
                    audio_embeds=batched_field("audio"))

    def _get_prompt_updates(self, mm_items: MultiModalDataItems,
                            hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        proc = self.info.get_hf_processor()
        audio_id = proc.token_ids.audio
        items = out_mm_kwargs.get("audio", [])

        def n_tokens(i: int) -> int:
            item = items[i]
            if "audio_embeds" in item:
                return int(item["audio_embeds"].data.shape[0])
            return audio_token_count(int(item["feature_lengths"].data), proc.merge_factor)

        def replacement(i: int):
            return PromptUpdateDetails.select_token_id([audio_id] * n_tokens(i), embed_token_id=audio_id)

        return [PromptReplacement(modality="audio", target=[audio_id], replacement=replacement)]
