"""ArkAsrConfig: the `config.json` of an ARK-ASR checkpoint (model_type "arkasr").

Laid out like the real checkpoint: the Qwen2 decoder's fields at the top level (ArkasrConfig
subclasses Qwen2Config upstream), the Whisper encoder in a nested `whisper_config`, plus the
adapter fields (merge_factor, use_rope, max_whisper_length, mlp_adapter_act, adapter_type,
spec_aug) and the special-token ids. A real `config.json` loads as is.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config, WhisperConfig

#: Whisper-large-v3 encoder dimensions (the real ARK-ASR-0.6B audio tower).
WHISPER_LARGE_V3_ENCODER = dict(
    d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
    num_mel_bins=128, max_source_positions=1500, activation_function="gelu",
    decoder_layers=1, decoder_attention_heads=20, decoder_ffn_dim=5120,
)


def audio_token_count(mel_frames: int, merge_factor: int = 4) -> int:
    """`<|audio|>` placeholders for a clip of `mel_frames` log-mel frames.

    conv2 (stride 2) gives (T + 1) // 2 encoder frames; the adapter merges `merge_factor` of
    them per token; a clip shorter than one token still gets one (zero-padded) token.
    100 mel frames/s -> 12.5 tokens/s; 30 s -> 375.
    """
    return max(1, ((int(mel_frames) + 1) // 2) // merge_factor)


@strict
class ArkAsrConfig(Qwen2Config):
    model_type = "arkasr"
    sub_configs = {"whisper_config": WhisperConfig}

    whisper_config: dict | WhisperConfig | None = None
    adapter_type: str = "mlp"
    merge_factor: int = 4
    spec_aug: bool = False
    use_rope: bool = True
    max_whisper_length: int = 1500
    mlp_adapter_act: str = "gelu"
    audio_token_id: int = 151663
    user_token_id: int = 151665
    begin_audio_token_id: int = 151666
    end_audio_token_id: int = 151667
    assistant_token_id: int = 151668

    def __post_init__(self, **kwargs):
        if self.whisper_config is None:
            self.whisper_config = WhisperConfig(**WHISPER_LARGE_V3_ENCODER)
        elif isinstance(self.whisper_config, dict):
            wc = dict(self.whisper_config)
            wc.pop("model_type", None)
            self.whisper_config = WhisperConfig(**wc)
        if self.adapter_type != "mlp":
            raise ValueError(f"adapter_type {self.adapter_type!r}: only 'mlp' exists in ARK-ASR")
        if self.spec_aug:
            raise ValueError("spec_aug=True is a training-time augmentation ARK-ASR checkpoints never enable")
        super().__post_init__(**kwargs)

    def audio_tokens_for(self, mel_frames: int) -> int:
        return audio_token_count(mel_frames, self.merge_factor)
