"""ARK-ASR for PyTorch + transformers; importing this registers model_type "arkasr" with the Auto classes."""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ark_ray.model.config import ArkAsrConfig, audio_token_count
from ark_ray.model.modeling import ArkAsrForConditionalGeneration, ArkAudioEncoder
from ark_ray.model.presets import PRESETS, preset_config, token_ids_from_tokenizer

AutoConfig.register("arkasr", ArkAsrConfig, exist_ok=True)
AutoModel.register(ArkAsrConfig, ArkAsrForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(ArkAsrConfig, ArkAsrForConditionalGeneration, exist_ok=True)


def __getattr__(name):  # the processor pulls in the audio stack; load it on first use
    if name == "ArkAsrProcessor":
        from ark_ray.model.processor import ArkAsrProcessor
        return ArkAsrProcessor
    if name == "build_tiny_tokenizer":
        from ark_ray.model.tokenizer import build_tiny_tokenizer
        return build_tiny_tokenizer
    raise AttributeError(name)


__all__ = ["ArkAsrConfig", "ArkAsrForConditionalGeneration", "ArkAudioEncoder", "ArkAsrProcessor",
           "audio_token_count", "preset_config", "token_ids_from_tokenizer", "PRESETS",
           "build_tiny_tokenizer"]
