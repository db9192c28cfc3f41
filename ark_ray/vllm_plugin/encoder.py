"""The ARK audio encoder as vLLM runs it: packed clips, no work on padding.

`ArkAudioEncoder` (ark_ray.model.modeling) pads a step's clips to the longest one and masks
the padding; every layer then multiplies padding too. Here only the conv stem (~2 % of the
FLOPs) sees the padded batch; the frames are then packed into one [sum_i T_i, d] sequence and
the 32 layers, the adapter LayerNorm and the merge MLP run on real frames only. Attention
stays per clip through `cu_seqlens`:

  * "flash": flash-attention varlen (vLLM's `vllm_flash_attn`, FA3 on Hopper) - CUDA only;
  * "sdpa":  PyTorch SDPA on the clips scattered back into a padded [B, H, T, D] batch with a
             key mask (the HF encoder's arithmetic; the fallback everywhere);
  * "auto":  flash where vLLM ships it, else sdpa.

On CUDA the elementwise work around the matmuls (LayerNorm, bias, RoPE, GELU, residual) can be
fused by `torch.compile`: two small functions (before and after attention) that take the
layer's weights as arguments, so one graph serves all 32 layers, with the token count dynamic;
attention runs eagerly between them. A compile failure falls back to eager, once, with a log.

Same parameters and names as `ArkAudioEncoder` (it is a subclass), so checkpoints and weight
updates load unchanged, and a clip's output does not depend on its neighbours (tested against
the HF encoder clip by clip).
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ark_ray.model.modeling import ArkAudioEncoder, apply_interleaved_rope, rope_cos_sin

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "flash", "sdpa", "padded")


# --------------------------------------------------------------------------- per-layer math
def _attn_in(x, ln_w, ln_b, wq, bq, wk, wv, bv, cos, sin, heads: int):
    """Pre-LN, q/k/v projections, RoPE: x [N, d] -> q, k, v [N, heads, head_dim]."""
    n, d = x.shape
    h = F.layer_norm(x, (d,), ln_w, ln_b, 1e-5)
    shape = (n, heads, d // heads)
    q = F.linear(h, wq, bq).view(shape)
    k = F.linear(h, wk).view(shape)
    v = F.linear(h, wv, bv).view(shape)
    if cos is not None:
        q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)
    return q, k, v


def _attn_out_ffn(x, attn, wo, bo, ln_w, ln_b, w1, b1, w2, b2):
    """Output projection + residual, then the pre-LN GELU FFN + residual (fp16 clamp as HF)."""
    n, d = x.shape
    x = x + F.linear(attn.reshape(n, d), wo, bo)
    x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (d,), ln_w, ln_b, 1e-5), w1, b1)), w2, b2)
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


# --------------------------------------------------------------------------- attention backends
def _flash_fn() -> Callable | None:
    """vLLM's flash-attention varlen and its preferred FA version, or None where it is absent."""
    if not torch.cuda.is_available():
        return None
    try:
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version
    except Exception:  # noqa: BLE001  (no CUDA build of vLLM, or another layout)
        try:
            from vllm.vllm_flash_attn import flash_attn_varlen_func  # type: ignore[no-redef]
            get_flash_attn_version = None
        except Exception:  # noqa: BLE001
            return None
    version = None
    if get_flash_attn_version is not None:
        try:
            version = get_flash_attn_version(head_size=64)
        except Exception:  # noqa: BLE001  (older signature)
            version = None
    extra = {} if version is None else {"fa_version": version}

    def flash(q, k, v, packing: "Packing"):
        return flash_attn_varlen_func(
            q, k, v, max_seqlen_q=packing.max_len, cu_seqlens_q=packing.cu_seqlens,
            max_seqlen_k=packing.max_len, cu_seqlens_k=packing.cu_seqlens,
            softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=False, **extra)

    return flash


def _sdpa(q, k, v, packing: "Packing"):
    """Per-clip attention via one padded SDPA call with a key mask (scatter in, gather out)."""
    b, t = packing.batch, packing.max_len
    n, heads, hd = q.shape

    def pad(x):
        buf = x.new_zeros(b * t, heads, hd)
        buf.index_copy_(0, packing.index, x)
        return buf.view(b, t, heads, hd).transpose(1, 2)

    mask = packing.key_mask  # [B, 1, 1, T] or None when every clip is max_len long
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b * t, heads, hd).index_select(0, packing.index)


class Packing:
    """Where each clip's frames sit in the packed sequence (built once per batch)."""

    def __init__(self, lengths: Sequence[int], width: int, device: torch.device):
        self.lengths = [int(n) for n in lengths]
        self.batch, self.width = len(self.lengths), int(width)
        self.max_len = max(self.lengths)
        starts = [0]
        for n in self.lengths:
            starts.append(starts[-1] + n)
        self.starts = starts
        self.total = starts[-1]
        cpu = torch.tensor(starts, dtype=torch.int32)
        self.cu_seqlens = cpu.to(device, non_blocking=True)
        # flat rows of the padded [B, width] batch that hold real frames, in packed order
        rows = torch.cat([torch.arange(n) + i * self.width for i, n in enumerate(self.lengths)])
        self.rows = rows.to(device, non_blocking=True)
        # the same frames in a [B, max_len] batch (what the sdpa backend scatters into)
        index = torch.cat([torch.arange(n) + i * self.max_len for i, n in enumerate(self.lengths)])
        self.index = index.to(device, non_blocking=True)
        self.positions = torch.cat([torch.arange(n) for n in self.lengths]).to(device, non_blocking=True)
        self.key_mask = None
        if min(self.lengths) < self.max_len:
            valid = torch.arange(self.max_len)[None, :] < torch.tensor(self.lengths)[:, None]
            self.key_mask = valid[:, None, None, :].to(device, non_blocking=True)


# --------------------------------------------------------------------------- the encoder
class PackedArkAudioEncoder(ArkAudioEncoder):
    """`ArkAudioEncoder` with a packed forward (same parameters, same checkpoint names)."""

    def __init__(self, config, attention: str = "auto", compile: bool = False):
        super().__init__(config)
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"encoder attention {attention!r}: choose one of {ATTENTION_CHOICES}")
        self.attention = attention
        self.want_compile = compile
        self._attn_fn: Callable | None = None
        self._pre: Callable = _attn_in
        self._post: Callable = _attn_out_ffn
        self._compiled = False

    # -- set-up, on first use (the device is known only then)
    def _setup(self, device: torch.device, dtype: torch.dtype) -> None:
        if self._attn_fn is not None:
            return
        half = dtype in (torch.float16, torch.bfloat16)   # flash-attention has no fp32 kernels
        flash = _flash_fn() if (device.type == "cuda" and half and self.attention in ("auto", "flash")) else None
        if self.attention == "flash" and flash is None:
            log.warning("ARK encoder: flash-attention varlen unavailable here; using SDPA")
        self._attn_fn = flash or _sdpa
        self.backend = "flash" if flash is not None else "sdpa"
        if self.want_compile and device.type == "cuda":
            self._pre = torch.compile(_attn_in, dynamic=True)
            self._post = torch.compile(_attn_out_ffn, dynamic=True)
            self._compiled = True
        log.info("ARK encoder: packed, attention=%s, compiled=%s", self.backend, self._compiled)

    def _uncompile(self, err: Exception) -> None:
        log.warning("ARK encoder: torch.compile failed (%s: %s); running eagerly", type(err).__name__, err)
        self._pre, self._post, self._compiled = _attn_in, _attn_out_ffn, False

    def forward_packed(self, mel: torch.Tensor, frames: Sequence[int], timer=None) -> torch.Tensor:
        """mel [B, n_mels, T] (frames past each clip's `frames[i]` are ignored) -> [sum_i N_i, H].

        `frames` are CPU ints (vLLM keeps `feature_lengths` on the CPU): the packing is planned
        without a device sync. `timer` (profiling) brackets the stem+layers and the adapter.
        """
        if self.attention == "padded":  # the HF module's padded batch, for A/B runs
            lengths = torch.tensor(list(frames), device=mel.device)
            return super().forward(mel, lengths)
        self._setup(mel.device, mel.dtype)
        ctx = timer.part if timer is not None else _no_timer
        with ctx("encoder"):
            x, packing = self._stem_packed(mel, frames)
            while True:
                try:
                    x = self._layers(x, packing)
                    break
                except Exception as err:  # noqa: BLE001  (inductor/triton missing, a kernel refusing)
                    if self._compiled:       # first drop the compile, then flash; then give up
                        self._uncompile(err)
                    elif self.backend == "flash":
                        log.warning("ARK encoder: flash-attention failed (%s: %s); using SDPA",
                                    type(err).__name__, err)
                        self._attn_fn, self.backend = _sdpa, "sdpa"
                    else:
                        raise
        with ctx("adapter"):
            return self._adapt(x, packing)

    def _stem_packed(self, mel, frames):
        w = self.whisper
        b, _, t_mel = mel.shape
        lengths = torch.tensor(list(frames), device=mel.device)
        # as WhisperRoPEEncoder.forward: zero past each clip's end before and after conv1
        pad = torch.arange(t_mel, device=mel.device)[None, :] >= lengths[:, None]
        mel = mel.masked_fill(pad[:, None, :], 0.0)
        x = F.gelu(w.conv1(mel)).masked_fill(pad[:, None, :], 0.0)
        x = F.gelu(w.conv2(x)).transpose(1, 2)          # [B, T_enc, d]
        t_enc = x.shape[1]
        enc_lengths = [min((int(n) + 1) // 2, t_enc) for n in frames]
        packing = Packing(enc_lengths, t_enc, mel.device)
        x = x.reshape(b * t_enc, -1).index_select(0, packing.rows)
        if not w.use_rope:
            x = x + w.embed_positions.weight[packing.positions]
        return x, packing

    def _layers(self, x, packing: Packing):
        w = self.whisper
        cos = sin = None
        if w.use_rope:
            cos, sin = rope_cos_sin(packing.positions, w.head_dim // 2, dtype=x.dtype)
            cos, sin = cos[:, None, :], sin[:, None, :]     # [N, 1, rot/2]: broadcast over heads
        for layer in w.layers:
            a = layer.self_attn
            q, k, v = self._pre(x, layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias,
                                a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.v_proj.weight,
                                a.v_proj.bias, cos, sin, a.num_heads)
            o = self._attn_fn(q.contiguous(), k.contiguous(), v.contiguous(), packing)
            x = self._post(x, o, a.out_proj.weight, a.out_proj.bias, layer.final_layer_norm.weight,
                           layer.final_layer_norm.bias, layer.fc1.weight, layer.fc1.bias,
                           layer.fc2.weight, layer.fc2.bias)
        return x

    def _adapt(self, x, packing: Packing):
        """Adapter LayerNorm, merge `m` frames per token clip by clip, Linear-GELU-Linear.

        Tail frames that do not fill a token are dropped; a clip shorter than one token is
        zero-padded (after the LayerNorm) to one, as the HF encoder does for a clip alone.
        """
        m = self.merge_factor
        x = self.layer_norm(x)
        zero_row = packing.total
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])
        index = []
        for start, n in zip(packing.starts, packing.lengths):
            tokens = max(1, n // m)
            index.append(torch.arange(tokens * m) + start if n >= m else
                         torch.tensor([start + j if j < n else zero_row for j in range(m)]))
        gather = torch.cat(index).to(x.device, non_blocking=True)
        merged = x.index_select(0, gather).reshape(-1, m * x.shape[1])
        return self.adapting(merged)


class _NoTimer:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _no_timer(_name: str) -> _NoTimer:
    return _NoTimer()
