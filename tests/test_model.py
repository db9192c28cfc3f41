"""ARK-ASR model: real checkpoint layout, parameter count, RoPE, batching, save/load, generate."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from ark_ray.model import ArkAsrConfig, ArkAsrForConditionalGeneration, audio_token_count, preset_config
from ark_ray.model.modeling import apply_interleaved_rope, rope_cos_sin


def real_keys(enc_layers: int, dec_layers: int) -> set[str]:
    """The key list of a real ARK-ASR checkpoint (reference §5), for the given depths."""
    keys = {
        "audio_encoder.whisper.conv1.weight", "audio_encoder.whisper.conv1.bias",
        "audio_encoder.whisper.conv2.weight", "audio_encoder.whisper.conv2.bias",
        "audio_encoder.whisper.embed_positions.weight",
        "audio_encoder.layer_norm.weight", "audio_encoder.layer_norm.bias",
        "audio_encoder.adapting.0.weight", "audio_encoder.adapting.0.bias",
        "audio_encoder.adapting.2.weight", "audio_encoder.adapting.2.bias",
        "model.embed_tokens.weight", "model.norm.weight",
    }
    for i in range(enc_layers):
        p = f"audio_encoder.whisper.layers.{i}."
        keys |= {p + "self_attn.q_proj.weight", p + "self_attn.q_proj.bias", p + "self_attn.k_proj.weight",
                 p + "self_attn.v_proj.weight", p + "self_attn.v_proj.bias",
                 p + "self_attn.out_proj.weight", p + "self_attn.out_proj.bias",
                 p + "self_attn_layer_norm.weight", p + "self_attn_layer_norm.bias",
                 p + "fc1.weight", p + "fc1.bias", p + "fc2.weight", p + "fc2.bias",
                 p + "final_layer_norm.weight", p + "final_layer_norm.bias"}
    for i in range(dec_layers):
        p = f"model.layers.{i}."
        keys |= {p + f"self_attn.{x}_proj.{y}" for x in "qkv" for y in ("weight", "bias")}
        keys |= {p + "self_attn.o_proj.weight", p + "input_layernorm.weight",
                 p + "post_attention_layernorm.weight"}
        keys |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    return keys


def small_config(**kw) -> ArkAsrConfig:
    kw.setdefault("initializer_range", 0.2)  # larger init so random greedy outputs vary
    return preset_config("tiny", **kw)


def prompt_ids(cfg: ArkAsrConfig, n_audio: int) -> list[int]:
    return ([cfg.user_token_id, cfg.begin_audio_token_id] + [cfg.audio_token_id] * n_audio
            + [cfg.end_audio_token_id, 5, 6, 7, cfg.assistant_token_id])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ArkAsrForConditionalGeneration(small_config()).eval()


def test_real_dims_parameter_count():
    with torch.device("meta"):
        m = ArkAsrForConditionalGeneration(preset_config("ark-asr-0.6b"))
    n = sum(p.numel() for p in m.parameters())
    assert 1.145e9 < n < 1.16e9, n
    enc = sum(p.numel() for p in m.audio_encoder.whisper.parameters())
    assert 0.63e9 < enc < 0.64e9, enc  # Whisper-large-v3 encoder incl. unused embed_positions
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_tiny_preset_is_small_and_vllm_cpu_friendly():
    cfg = preset_config("tiny")
    m = ArkAsrForConditionalGeneration(cfg)
    assert 2e6 < sum(p.numel() for p in m.parameters()) < 6e6
    assert cfg.hidden_size // cfg.num_attention_heads >= 64
    assert cfg.whisper_config.d_model // cfg.whisper_config.encoder_attention_heads >= 64


def test_saved_keys_are_the_real_checkpoint_keys(tmp_path, model):
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == real_keys(2, 2)  # tied lm_head is not written, like the HF Qwen2 convention
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "arkasr" and cfg["whisper_config"]["d_model"] == 256
    assert cfg["tie_word_embeddings"] is True


def test_real_layout_directory_loads_without_missing_or_unexpected_keys(tmp_path):
    cfg = small_config()
    ref = ArkAsrForConditionalGeneration(cfg)
    tensors = {k: v.clone().contiguous() for k, v in ref.state_dict().items()}
    assert "lm_head.weight" in tensors  # a real file may carry the tied head too
    assert set(tensors) == real_keys(2, 2) | {"lm_head.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    raw = cfg.to_dict()
    raw["architectures"] = ["ArkasrForConditionalGeneration"]  # the real file's spelling
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ArkAsrConfig)
    m, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(m, ArkAsrForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, tensors[k], rtol=0, atol=0)


def test_save_reload_identical_logits(tmp_path, model):
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([prompt_ids(model.config, audio_token_count(200))])
    mel = torch.randn(1, 128, 200)
    with torch.no_grad():
        a = model(input_ids=ids, input_features=mel, feature_lengths=torch.tensor([200])).logits
        b = again(input_ids=ids, input_features=mel, feature_lengths=torch.tensor([200])).logits
    assert torch.equal(a, b)


def test_rope_matches_naive_pairwise_rotation():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 5, 64, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(5), 32, dtype=torch.float64)
    got = apply_interleaved_rope(x, cos, sin)
    want = x.clone()
    for p in range(5):
        for i in range(16):
            theta = p * 10000.0 ** (-2 * i / 32)
            a, b = x[..., p, 2 * i], x[..., p, 2 * i + 1]
            want[..., p, 2 * i] = a * torch.cos(torch.tensor(theta, dtype=torch.float64)) - b * torch.sin(torch.tensor(theta, dtype=torch.float64))
            want[..., p, 2 * i + 1] = b * torch.cos(torch.tensor(theta, dtype=torch.float64)) + a * torch.sin(torch.tensor(theta, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # cos/sin are fp32 like the reference
    assert torch.equal(got[..., 32:], x[..., 32:])  # second half of each head passes through


def test_audio_token_count_formula():
    assert [audio_token_count(t) for t in (1, 7, 8, 400, 3000, 1790)] == [1, 1, 1, 50, 375, 223]


def _left_pad_batch(cfg, lens):
    ps = [prompt_ids(cfg, audio_token_count(n)) for n in lens]
    w = max(map(len, ps))
    ids = torch.tensor([[cfg.pad_token_id] * (w - len(p)) + p for p in ps])
    am = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in ps])
    return ids, am, w


def test_batched_equals_single(model):
    torch.manual_seed(2)
    cfg = model.config
    lens = [311, 123, 57, 9]
    mels = [torch.randn(128, n) for n in lens]
    feats = torch.zeros(len(lens), 128, max(lens))
    for i, m in enumerate(mels):
        feats[i, :, : lens[i]] = m
    with torch.no_grad():
        batched = model.get_audio_embeds(feats, torch.tensor(lens))
        single = torch.cat([model.get_audio_embeds(m[None], torch.tensor([n])) for m, n in zip(mels, lens)])
    assert batched.shape == (sum(audio_token_count(n) for n in lens), cfg.hidden_size)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-3)

    gen = dict(max_new_tokens=6, do_sample=False, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    ids, am, w = _left_pad_batch(cfg, lens)
    out = model.generate(input_ids=ids, attention_mask=am, input_features=feats,
                         feature_lengths=torch.tensor(lens), **gen)[:, w:]
    for i, (m, n) in enumerate(zip(mels, lens)):
        one = torch.tensor([prompt_ids(cfg, audio_token_count(n))])
        alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), input_features=m[None],
                               feature_lengths=torch.tensor([n]), **gen)[0, one.shape[1]:]
        assert out[i, : len(alone)].tolist() == alone.tolist()
    assert len({tuple(r) for r in out.tolist()}) > 1  # the random model does not emit one constant row


def test_generate_with_cache_equals_no_cache_greedy_loop(model):
    torch.manual_seed(3)
    cfg = model.config
    mel = torch.randn(1, 128, 150)
    ids = torch.tensor([prompt_ids(cfg, audio_token_count(150))])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=mel,
                         feature_lengths=torch.tensor([150]), max_new_tokens=5, do_sample=False,
                         eos_token_id=None, pad_token_id=cfg.pad_token_id)[0, ids.shape[1]:].tolist()
    seq = ids
    manual = []
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=seq, input_features=mel, feature_lengths=torch.tensor([150]),
                           use_cache=False).logits[0, -1]
            nxt = int(logits.argmax())
            manual.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    assert out == manual


def test_labels_give_a_finite_loss_and_gradients(model):
    cfg = model.config
    ids = torch.tensor([prompt_ids(cfg, audio_token_count(100)) + [9, 10, cfg.eos_token_id]])
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    m = ArkAsrForConditionalGeneration(small_config())
    out = m(input_ids=ids, input_features=torch.randn(1, 128, 100), feature_lengths=torch.tensor([100]),
            labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert m.audio_encoder.whisper.conv1.weight.grad.abs().sum() > 0  # gradient reaches the encoder
    assert m.audio_encoder.whisper.embed_positions.weight.grad is None  # unused with RoPE
