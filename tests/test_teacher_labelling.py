"""Teacher labelling: `jobs/transcribe.py --model TEACHER --label_field=text` writes a manifest that
jobs/sft.py trains on directly (teacher-data adaptation), with the original reference kept."""
from __future__ import annotations

import importlib.util
import json

import pytest

from ark_ray.config import TranscribeConfig, load_config
from ark_ray.data.manifest import read_manifest
from ark_ray.data.part_files import read_output
from ark_ray.data.transcribe_pipeline import run_transcribe
from ark_ray.model.factory import save_random_model


def _load_job(repo_root, name):
    spec = importlib.util.spec_from_file_location(f"job_{name}", repo_root / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def labelled(ray_local, repo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label")
    teacher = tmp / "teacher"
    save_random_model(teacher, "tiny", seed=5)
    demo = repo_root / "assets" / "demo_corpus"
    rows = [json.loads(line) for line in (demo / "dev.jsonl").read_text().splitlines()[:4]]
    for r in rows:
        r["audio"] = str(demo / r["audio"])
    rows.append({"id": "broken", "audio": str(tmp / "missing.flac"), "text": "no audio here"})
    (tmp / "unlabelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "labels"
    transcribe = _load_job(repo_root, "transcribe")
    summary = transcribe.main([f"--input={tmp / 'unlabelled.jsonl'}", f"--output={out}", f"--model={teacher}",
                               "--label_field=text", "--engine.backend=hf", "--sampling.max_new_tokens=6",
                               "--progress=false"])
    return tmp, out, rows, summary


def test_output_is_a_manifest_with_teacher_text(labelled):
    tmp, out, rows, summary = labelled
    assert summary["rows_written"] == 5 and summary["error_rows"] == 1
    assert summary["manifest"] == str(out / "manifest.jsonl") and summary["manifest_rows"] == 4
    parts = {r["id"]: r for r in read_output(str(out))}
    assert parts["broken"]["error"] == "unreadable" and parts["broken"]["text"] == ""   # nothing lost
    manifest = read_manifest(out / "manifest.jsonl", text_field="text")
    assert [m["id"] for m in manifest] == [r["id"] for r in rows[:4]]                  # error rows left out
    for m, r in zip(manifest, rows):
        assert m["text"] == m["pred_text"] == parts[r["id"]]["pred_text"]              # the teacher's label
        assert m["reference_text"] == r["text"] and m["audio"] == r["audio"]
        assert "error" not in m


def test_rerun_skips_done_and_rewrites_the_same_manifest(labelled):
    tmp, out, _, _ = labelled
    before = (out / "manifest.jsonl").read_text()
    again = run_transcribe(load_config(TranscribeConfig, None, [
        f"--input={tmp / 'unlabelled.jsonl'}", f"--output={out}", f"--model={tmp / 'teacher'}",
        "--label_field=text", "--engine.backend=hf", "--progress=false"]))
    assert (again["skipped_done"], again["rows_written"], again["manifest_rows"]) == (5, 0, 4)
    assert (out / "manifest.jsonl").read_text() == before


def test_sft_trains_one_step_on_the_teacher_labels(labelled, repo_root):
    tmp, out, _, _ = labelled
    sft = _load_job(repo_root, "sft")
    s = sft.main([f"--model={tmp / 'teacher'}", f"--train_manifest={out / 'manifest.jsonl'}",
                  "--eval_manifest=null", "--steps=1", "--batch_size=2", f"--output_dir={tmp / 'sft'}",
                  "--export_dtype=float32"])
    assert s["steps"] == 1 and s["error_rows"] == 0
    assert s["first_loss"] == s["first_loss"] and s["first_loss"] > 0                   # finite, trained
    assert (tmp / "sft" / "final" / "config.json").exists()
    rec = json.loads((tmp / "sft" / "metrics.jsonl").read_text().splitlines()[-1])
    # the step's record: its loss, and where its time went (waiting for featurized audio, then collate
    # + learner step), two parts of this run's wall time; the first batch always waits for Ray Data
    assert rec["step"] == 1 and rec["loss"] == s["first_loss"]
    assert rec["data_s"] > 0 and rec["step_s"] > 0 and rec["data_s"] + rec["step_s"] <= s["wall_s"]
