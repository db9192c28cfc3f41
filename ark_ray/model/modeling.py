"""ARK-ASR in PyTorch: RoPE Whisper encoder -> 4-frame-merge MLP adapter -> Qwen2 decoder.

    mel [B, 128, T] --conv1(k3,s1)+GELU--conv2(k3,s2)+GELU--> [B, (T+1)//2, d]
      --> L x pre-LN layer (bidirectional MHA with partial interleaved RoPE, GELU FFN)
      --> (Whisper's final LN is Identity) --> adapter LayerNorm --> merge 4 frames
      --> Linear(4d, 2H) --> GELU --> Linear(2H, H)  = one embedding per <|audio|> token
    prompt embeddings with those rows at the <|audio|> positions --> Qwen2 --> tied lm_head

Module names give exactly the real checkpoint's keys (`audio_encoder.whisper.*`,
`audio_encoder.layer_norm`, `audio_encoder.adapting.{0,2}`, `model.*`, `lm_head`).

One deliberate difference from the reference: **the encoder masks padded frames.** The
reference runs attention with no mask, so in a padded batch real frames attend to padding
and a clip's transcript depends on what it is batched with. We build a key-padding mask from
each clip's own mel length, so a clip gives the same output alone as in any batch (for a
single unpadded clip the two are identical).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, Qwen2ForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from ark_ray.model.config import ArkAsrConfig

_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU, "selu": nn.SELU}


def _decoder_keywords() -> frozenset:
    """Keywords Qwen2ForCausalLM.forward uses (its parameters and transformers' attention/loss
    kwargs, which differ by transformers version): the only ones forward passes on."""
    names = set(inspect.signature(Qwen2ForCausalLM.forward).parameters) - {"self", "kwargs"}
    try:
        from transformers.utils import TransformersKwargs
        names |= set(TransformersKwargs.__required_keys__) | set(TransformersKwargs.__optional_keys__)
    except ImportError:
        pass
    # what generate() and Trainer send across versions
    names |= {"cache_position", "return_dict", "output_attentions", "output_hidden_states", "num_items_in_batch"}
    return frozenset(names)


_DECODER_KEYWORDS = _decoder_keywords()


def _audio_alias(input_features, audios):
    """open-audio-opd's training and inference scripts pass the log-mel to the checkpoint's remote code
    as `audios=`; ours takes `input_features=` (docs/architecture.md, "The reference")."""
    if audios is None:
        return input_features
    if input_features is not None:
        raise TypeError("pass the log-mel as input_features= or as audios= (its alias), not both")
    return audios


def rope_cos_sin(positions: torch.Tensor, rot_dim: int, base: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, rot_dim // 2] for adjacent-pair RoPE over `rot_dim` dims (fp32, then `dtype`).

    The cache is cast to the activation dtype like the reference, so bf16 runs round the same way.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32,
                                            device=positions.device) / rot_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the first 2*cos.shape[-1] dims; pass the rest.

    x: [B, heads, T, head_dim]; cos/sin: [T, rot_dim // 2].
    """
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, x_pass), dim=-1)


class WhisperRoPEAttention(nn.Module):
    """Whisper's encoder self-attention (k_proj has no bias) with RoPE on half of each head."""

    def __init__(self, d_model: int, num_heads: int, use_rope: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.use_rope = use_rope
        self.q_proj = nn.Linear(d_model, d_model, bias=True)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=True)
        self.out_proj = nn.Linear(d_model, d_model, bias=True)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None,
                cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if self.use_rope:
            q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # scale 1/sqrt(head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class WhisperRoPEEncoderLayer(GradientCheckpointingLayer):
    """Pre-LN: x + attn(LN(x)), then + fc2(GELU(fc1(LN(.)))); fp16 clamp as the reference.

    A GradientCheckpointingLayer (a plain nn.Module until `gradient_checkpointing_enable`), so the
    learner's activation checkpointing covers the encoder as well as the decoder."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, use_rope: bool):
        super().__init__()
        self.self_attn = WhisperRoPEAttention(d_model, num_heads, use_rope)
        self.self_attn_layer_norm = nn.LayerNorm(d_model, eps=1e-5)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model, eps=1e-5)

    def forward(self, x, key_mask, cos, sin):
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask, cos, sin)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:
            limit = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-limit, limit)
        return x


class WhisperRoPEEncoder(nn.Module):
    """HF WhisperEncoder's layout (conv stem, layers, unused embed_positions) with RoPE layers."""

    def __init__(self, wc, use_rope: bool = True):
        super().__init__()
        d = wc.d_model
        self.use_rope = use_rope
        self.head_dim = d // wc.encoder_attention_heads
        self.conv1 = nn.Conv1d(wc.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # Present in every checkpoint, never added when use_rope (RoPE carries the positions).
        self.embed_positions = nn.Embedding(wc.max_source_positions, d)
        self.layers = nn.ModuleList(
            WhisperRoPEEncoderLayer(d, wc.encoder_attention_heads, wc.encoder_ffn_dim, use_rope)
            for _ in range(wc.encoder_layers))

    def forward(self, mel: torch.Tensor, frame_lengths: torch.Tensor | None = None):
        """mel [B, n_mels, T] -> (hidden [B, T_enc, d], encoder lengths [B])."""
        if frame_lengths is not None:
            # Zero everything past each clip's own end, before and after conv1, so the last valid
            # frames see the same zero padding as the clip alone would (batch invariance).
            frame_lengths = frame_lengths.to(mel.device)
            pad = torch.arange(mel.shape[-1], device=mel.device)[None, :] >= frame_lengths[:, None]
            mel = mel.masked_fill(pad[:, None, :], 0.0)
            x = F.gelu(self.conv1(mel)).masked_fill(pad[:, None, :], 0.0)
        else:
            x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        b, t, _ = x.shape
        if frame_lengths is None:
            enc_lengths = torch.full((b,), t, dtype=torch.long, device=x.device)
        else:
            enc_lengths = ((frame_lengths + 1) // 2).clamp(max=t)
        if not self.use_rope:
            x = x + self.embed_positions.weight[:t]
        key_mask = None
        if bool((enc_lengths < t).any()):
            valid = torch.arange(t, device=x.device)[None, :] < enc_lengths[:, None]
            key_mask = valid[:, None, None, :]  # [B, 1, 1, T] True = attend
        cos = sin = None
        if self.use_rope:
            cos, sin = rope_cos_sin(torch.arange(t, device=x.device), self.head_dim // 2, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, key_mask, cos, sin)
        return x, enc_lengths


class ArkAudioEncoder(nn.Module):
    """`audio_encoder.*`: the RoPE Whisper encoder, the adapter LayerNorm and the merge MLP."""

    def __init__(self, config: ArkAsrConfig):
        super().__init__()
        wc = config.whisper_config
        self.merge_factor = config.merge_factor
        self.whisper = WhisperRoPEEncoder(wc, use_rope=config.use_rope)
        self.layer_norm = nn.LayerNorm(wc.d_model, eps=1e-5)
        self.adapting = nn.Sequential(
            nn.Linear(wc.d_model * config.merge_factor, 2 * config.hidden_size),
            _ACTS[config.mlp_adapter_act](),
            nn.Linear(2 * config.hidden_size, config.hidden_size),
        )

    def forward(self, mel: torch.Tensor, frame_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """mel [B, n_mels, T] -> audio embeddings of every clip, concatenated [sum_i N_i, H].

        N_i = max(1, enc_len_i // merge): the tail frames that do not fill a token are dropped,
        a clip shorter than one token is zero-padded to one, as in the reference.
        """
        hidden, enc_lengths = self.whisper(mel, frame_lengths)
        hidden = self.layer_norm(hidden)
        m = self.merge_factor
        b, t, d = hidden.shape
        if t < m:
            hidden = F.pad(hidden, (0, 0, 0, m - t))
            t = m
        merged = self.adapting(hidden[:, : (t // m) * m].reshape(b, t // m, d * m))
        counts = (enc_lengths // m).clamp(min=1).tolist()
        return torch.cat([merged[i, :n] for i, n in enumerate(counts)], dim=0)


class ArkAsrForConditionalGeneration(Qwen2ForCausalLM, GenerationMixin):
    """ARK-ASR: `audio_encoder` + Qwen2 `model` + tied `lm_head` (transformers' Qwen2 decoder)."""

    config_class = ArkAsrConfig
    main_input_name = "input_ids"
    _no_split_modules = ["Qwen2DecoderLayer", "WhisperRoPEEncoderLayer"]

    def __init__(self, config: ArkAsrConfig):
        super().__init__(config)
        self.audio_encoder = ArkAudioEncoder(config)
        self.post_init()

    def get_audio_embeds(self, input_features: torch.Tensor,
                         feature_lengths: torch.Tensor | None = None) -> torch.Tensor:
        param = self.audio_encoder.whisper.conv1.weight
        return self.audio_encoder(input_features.to(param.device, param.dtype), feature_lengths)

    def embed_with_audio(self, input_ids: torch.Tensor, input_features: torch.Tensor | None,
                         feature_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the adapter rows scattered into the <|audio|> positions, in order.

        Fewer rows than slots: the rest stay zero; more rows: the surplus is dropped (reference).
        """
        audio_id = self.config.audio_token_id
        is_audio = input_ids == audio_id
        embeds = self.model.embed_tokens(input_ids.masked_fill(is_audio, 0))
        if input_features is None or not bool(is_audio.any()):
            return embeds
        audio = self.get_audio_embeds(input_features, feature_lengths).to(embeds.dtype)
        slots = int(is_audio.sum())
        if audio.shape[0] < slots:
            audio = torch.cat([audio, audio.new_zeros(slots - audio.shape[0], audio.shape[1])])
        embeds = embeds.masked_fill(is_audio[..., None], 0.0)
        return embeds.masked_scatter(is_audio[..., None], audio[:slots])

    def forward(self, input_ids=None, attention_mask=None, input_features=None,
                feature_lengths=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, audios=None,
                **kwargs) -> CausalLMOutputWithPast:
        """`audios` is an alias of `input_features` (the keyword open-audio-opd's scripts use). A
        keyword the model does not use is refused: swallowing it would compute logits without the
        audio it carried."""
        unknown = sorted(set(kwargs) - _DECODER_KEYWORDS)
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword(s) {unknown}; the log-mel "
                            "goes in input_features= (or audios=), its frame counts in feature_lengths=")
        input_features = _audio_alias(input_features, audios)
        if inputs_embeds is None:
            inputs_embeds = self.embed_with_audio(input_ids, input_features, feature_lengths)
        return super().forward(
            input_ids=None, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
            use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, input_features=None,
                                      feature_lengths=None, audios=None, **kwargs):
        input_features = _audio_alias(input_features, audios)
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, **kwargs)
        # Audio is consumed on the prefill step only: later steps feed one new token each,
        # so `inputs["input_ids"]` holds no <|audio|> ids and input_features would be wasted.
        prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        if prefill:
            inputs["input_features"] = input_features
            inputs["feature_lengths"] = feature_lengths
        else:
            inputs.pop("input_features", None)
            inputs.pop("feature_lengths", None)
        # transformers passes `input_ids=None` when it uses inputs_embeds on the first step;
        # we always embed ourselves, so prefer ids.
        if inputs.get("input_ids") is None and inputs.get("inputs_embeds") is None:
            inputs["input_ids"] = input_ids
        return inputs
