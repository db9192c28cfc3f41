"""The OPD demo's parts: the pruned student, the unlabelled audio, the console and its plot.
(The plain-shell environment is tests/test_reliability.py's; the demo run itself is measured by
bench/demo_opd.py, not here.)"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable


def test_demo_student_is_the_teacher_with_pruned_feed_forward_blocks(tmp_path):
    from safetensors.torch import load_file

    from ark_ray.demo import student
    from ark_ray.model import ArkAsrForConditionalGeneration

    d = student.prune_ffn(student.TEACHER, tmp_path / "s", student.DECODER_MLP, student.ENCODER_FFN)
    t, s = load_file(student.TEACHER / "model.safetensors"), load_file(d / "model.safetensors")
    assert set(s) == set(t)
    for name in t:
        if ".mlp." in name or ".fc1." in name or ".fc2." in name:
            continue
        assert (s[name] == t[name]).all(), name          # attention, embeddings, adapter: the teacher's
    up, t_up = s["model.layers.0.mlp.up_proj.weight"], t["model.layers.0.mlp.up_proj.weight"]
    assert up.shape == (student.DECODER_MLP, t_up.shape[1])
    # each kept unit is one of the teacher's, whole: its up row and its down column travel together
    rows = {tuple(r.tolist()): i for i, r in enumerate(t_up)}
    kept = [rows[tuple(r.tolist())] for r in up]
    assert kept == sorted(kept)
    assert (s["model.layers.0.mlp.down_proj.weight"] == t["model.layers.0.mlp.down_proj.weight"][:, kept]).all()
    assert s["audio_encoder.whisper.layers.1.fc2.weight"].shape[1] == student.ENCODER_FFN
    m = ArkAsrForConditionalGeneration.from_pretrained(d)
    assert m.config.intermediate_size == student.DECODER_MLP
    assert m.config.whisper_config.encoder_ffn_dim == student.ENCODER_FFN
    n_student = sum(p.numel() for p in m.parameters())
    n_teacher = sum(p.numel() for p in ArkAsrForConditionalGeneration.from_pretrained(student.TEACHER).parameters())
    assert n_student < 0.7 * n_teacher


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("flite")), reason="espeak-ng/flite missing")
def test_unlabelled_audio_is_deterministic_distinct_and_has_no_transcripts(tmp_path):
    from ark_ray.data.manifest import read_manifest
    from ark_ray.demo import unlabelled
    from ark_ray.demo.corpus import texts_for

    assert unlabelled.parse("demo://unlabelled") == unlabelled.DEFAULT_N
    assert unlabelled.parse("demo://unlabelled-7") == 7 and unlabelled.parse("a.jsonl") is None
    a = unlabelled.ensure(6, tmp_path / "a")
    b = unlabelled.ensure(6, tmp_path / "b", workers=1)
    rows = read_manifest(a, text_field=None)
    assert len(rows) == 6 and all("text" not in r for r in rows)
    assert len({r["id"] for r in rows}) == 6
    for ra, rb in zip(a.read_text().splitlines(), b.read_text().splitlines()):
        ja, jb = json.loads(ra), json.loads(rb)
        assert ja == jb
        assert (a.parent / ja["audio"]).read_bytes() == (b.parent / jb["audio"]).read_bytes()
    # the texts spoken are train texts after the labelled split, never a held-out one
    held = {json.loads(x)["text"] for s in ("test", "dev") for x in open(REPO / f"assets/demo_corpus/{s}.jsonl")}
    assert not held & set(texts_for("train", unlabelled.FIRST + 6)[unlabelled.FIRST:])
    mtime = a.stat().st_mtime
    assert unlabelled.ensure(6, tmp_path / "a") == a and a.stat().st_mtime == mtime   # cached


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("flite")), reason="espeak-ng/flite missing")
def test_heldout_set_starts_with_the_bundled_test_clips_and_shares_no_text_with_training(tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    from ark_ray.data.manifest import read_manifest
    from ark_ray.demo import heldout
    from ark_ray.demo.corpus import texts_for

    assert heldout.resolve("a.jsonl") == "a.jsonl"
    m = heldout.ensure(3, tmp_path / "h", workers=1)
    rows = read_manifest(m)
    bundled = read_manifest(str(REPO / "assets/demo_corpus/test.jsonl"))
    for r, b in zip(rows, bundled[:3]):          # same texts and voices as the bundled test clips
        assert r["text"] == b["text"] and r["id"] == b["id"]
        x, y = sf.read(r["audio"])[0], sf.read(b["audio"])[0]
        assert len(x) == len(y) and np.abs(x - y).max() < 1e-4
    texts = texts_for("test", heldout.DEFAULT_N)
    assert len(set(texts)) == heldout.DEFAULT_N
    assert not set(texts) & set(texts_for("train", 4000)) and not set(texts) & set(texts_for("dev", 30))
    monkeypatch.setenv("ARK_DEMO_CACHE", str(tmp_path / "cache"))
    assert heldout.resolve("demo://heldout-3") == str(tmp_path / "cache" / "heldout_3" / "heldout.jsonl")


def test_console_shows_progress_and_evaluations_and_logs_the_rest(tmp_path):
    script = textwrap.dedent(f"""
        import logging, os, subprocess, sys, warnings
        sys.path.insert(0, {str(REPO)!r})
        from ark_ray.opd.console import Console, table
        logging.basicConfig(level=logging.INFO)
        c = Console({str(tmp_path / 'run')!r})
        c.total = 3
        c.line("visible line")
        logging.getLogger("vllm").warning("Failed to load weights (noise)")
        print("plain print noise")
        warnings.warn("a library warning")
        os.write(2, b"c-level noise\\n")
        subprocess.run(["echo", "child noise"])
        c.on_eval(0, "student", 0.9)
        c.on_eval(0, "teacher", 0.35)
        for s in (1, 2, 3):
            c.on_step(dict(step=s, kl=1.0 / s, samples=16, dropped_stale=s - 1))
        c.on_eval(3, "student", 0.6)
        c.close_bar()
        print(c.save_curves())
        c.line(table([("student_wer_after", "0.6")]))
    """)
    r = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    term = r.stdout + r.stderr
    assert "visible line" in term and "student held-out WER 0.900" in term and "teacher held-out WER 0.350" in term
    assert "student held-out WER 0.600" in term and "| student_wer_after | 0.6 |" in term
    assert "3/3" in term and "stale dropped 2" in term and "kl 0.333" in term
    for noise in ("noise", "library warning"):
        assert noise not in term
    log = (tmp_path / "run/job.log").read_text()
    for noise in ("Failed to load weights (noise)", "plain print noise", "a library warning", "c-level noise",
                  "child noise"):
        assert noise in log
    png = tmp_path / "run/curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    img = Image.open(png)
    assert img.size == (960, 420) and len(img.convert("RGB").getcolors(maxcolors=1 << 16)) > 3   # something was drawn
    data = json.loads((tmp_path / "run/curves.json").read_text())
    assert [e["wer"] for e in data["evals"] if e["who"] == "student"] == [0.9, 0.6] and data["teacher_wer"] == 0.35


def test_closing_table_shows_the_baselines_only_for_the_demo_they_were_measured_on():
    """The shipped baselines (bench/demo_opd.py) match the shipped demo; a run with another batch,
    held-out set, step count or student gets none, since they would not compare like with like."""
    import importlib.util

    from ark_ray.config import OpdConfig, load_config

    spec = importlib.util.spec_from_file_location("opd_job", REPO / "jobs/opd.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    cfg = load_config(OpdConfig, REPO / "jobs/configs/opd_tiny.yaml", {})
    lines = job.baseline_lines(cfg.student, cfg.eval_manifest, cfg)
    assert any("same-compute SFT" in x for x in lines) and any("adaptation, then OPD" in x for x in lines)
    other = load_config(OpdConfig, REPO / "jobs/configs/opd_tiny.yaml", {"rollout_batch_size": 16})
    assert job.baseline_lines(other.student, other.eval_manifest, other) == []
    assert job.baseline_lines(cfg.student, "assets/demo_corpus/test.jsonl", cfg) == []
    assert job.baseline_lines("assets/models/student", cfg.eval_manifest, cfg) == []
