"""A bounded CPU soak of the batch job: 500 mixed inputs in one manifest of open-audio-opd's format (good
clips at 16 and 48 kHz, a long-form clip, silence, hostile files, segments good and bad, unusable
lines, duplicates), `python jobs/transcribe.py` killed (SIGKILL) twice at random points and rerun:
every input has exactly one row, each error reason is what that input is, every part file reads.
HF engine on a tiny random model, so it fits CI on 2 cores in a few minutes."""
from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from ark_ray.data.part_files import list_parts, read_output
from ark_ray.data.row_files import read_table
from ark_ray.data.s3 import resolve
from ark_ray.model.factory import save_random_model

REPO = pathlib.Path(__file__).resolve().parents[1]
N = 500
SR = 16000


def _noise(seconds, seed, sr=SR, level=0.1):
    return (level * np.random.default_rng(seed).standard_normal(int(seconds * sr))).astype(np.float32)


def make_files(root: pathlib.Path) -> dict:
    """Distinct audio files -> the reason a whole-file row of it gives (None: transcribed)."""
    files = {}
    for i in range(12):
        sf.write(root / f"ok{i}.wav", _noise(0.3 + 0.05 * i, i), SR)
        files[f"ok{i}.wav"] = None
    for i in range(3):
        sf.write(root / f"hi{i}.flac", _noise(0.5, 100 + i, sr=48000), 48000)
        files[f"hi{i}.flac"] = None
    sf.write(root / "long.wav", _noise(35.0, 7, level=0.05), SR)                   # long-form: two chunks
    files["long.wav"] = None
    sf.write(root / "silence.wav", np.zeros(SR // 2, np.float32), SR)               # flagged, not an error
    files["silence.wav"] = None
    (root / "empty.wav").write_bytes(b"")
    files["empty.wav"] = "empty"
    (root / "text.wav").write_bytes(b"not audio at all\n" * 40)
    files["text.wav"] = "unreadable"
    sf.write(root / "full.flac", _noise(1.0, 9), SR)
    data = (root / "full.flac").read_bytes()
    (root / "full.flac").unlink()
    (root / "cut.flac").write_bytes(data[: len(data) // 3])
    files["cut.flac"] = "unreadable"
    (root / "song.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + bytes(64))
    files["song.m4a"] = "unsupported_format"
    bad = _noise(0.3, 11)
    bad[10] = np.nan
    sf.write(root / "nan.wav", bad, SR, subtype="FLOAT")
    files["nan.wav"] = "non_finite"
    files["gone.wav"] = "unreadable"                                                 # listed, never written
    return files


def make_manifest(root: pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, list]:
    """N lines; expected[i] = the error reason of line i+1 (None: a transcript)."""
    rng = random.Random(seed)
    files = make_files(root)
    good = [f for f, r in files.items() if r is None and f != "long.wav"]
    lines, expected = [], []
    for i in range(N):
        kind = rng.choices(["whole", "segment", "seed_sentinel", "hostile", "bad_segment", "zero", "past_end",
                            "bad_line", "duplicate", "long"], [30, 15, 15, 12, 5, 4, 3, 6, 9, 1])[0]
        row = {"audio": rng.choice(good), "text": f"line {i + 1}", "task": "asr", "n": i}
        reason = None
        if kind == "whole":
            pass
        elif kind == "segment":
            b = round(rng.uniform(0, 0.2), 3)
            row.update(begin_time=b, end_time=round(b + rng.uniform(0.05, 0.1), 3))
        elif kind == "seed_sentinel":
            row.update(begin_time=-1, end_time=rng.choice([-1, 0.1, 5.0]))          # end ignored: begin < 0
        elif kind == "hostile":
            row["audio"] = rng.choice([f for f, r in files.items() if r is not None])
            reason = files[row["audio"]]
        elif kind == "bad_segment":
            row.update(begin_time=0.2, end_time=0.1)
            reason = "bad_segment"
        elif kind == "zero":
            row.update(begin_time=0.1, end_time=0.1)
            reason = "zero_length_segment"
        elif kind == "past_end":
            row.update(begin_time=50.0, end_time=51.0)
            reason = "bad_segment"
        elif kind == "bad_line":
            row = rng.choice(['{"audio": "ok0.wav", "text": ', '{"text": "no audio"}', '["ok0.wav"]',
                              json.dumps({"audio": "ok0.wav", "begin_time": "0.1"})])
            reason = "bad_row"
        elif kind == "duplicate" and lines:
            j = rng.randrange(len(lines))
            row, reason = lines[j], expected[j]
        elif kind == "long":
            row["audio"] = "long.wav"
        lines.append(row)
        expected.append(reason)
    path = root / "soak.jsonl"
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path, expected


def _job(address: str, manifest, out, model_dir) -> subprocess.Popen:
    env = dict(os.environ, RAY_ADDRESS=address)
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "transcribe.py"), f"--input={manifest}", f"--output={out}",
         f"--model={model_dir}", "--engine.backend=hf", "--sampling.max_new_tokens=3", "--files_per_block=8",
         "--progress=false", "--format=parquet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _parts(out: pathlib.Path) -> int:
    return len(list(out.glob("part-*"))) if out.exists() else 0


@pytest.mark.slow
def test_soak_500_inputs_two_kills_one_row_each(ray_local, tmp_path):
    model_dir = tmp_path / "tiny"
    save_random_model(model_dir, "tiny", seed=1)
    manifest, expected = make_manifest(tmp_path)
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    rng = random.Random(1)
    blocks = (N + 7) // 8
    kills = []
    for target in sorted(rng.sample(range(3, blocks - 3), 2)):    # two random points, in part files written
        proc = _job(address, manifest, out, model_dir)
        while proc.poll() is None and _parts(out) < target:
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed:\n" + proc.stdout.read()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(_parts(out))
        time.sleep(3)     # the dead driver's workers go with it
    assert kills[0] < blocks and kills[1] < blocks
    proc = _job(address, manifest, out, model_dir)
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]
    summary = json.loads(log.split("SUMMARY_JSON ", 1)[1].splitlines()[0])
    assert summary["skipped_done"] > 0                       # it resumed, not restarted

    fs, root = resolve(str(out))
    for p in list_parts(fs, root):                           # every output file reads
        assert read_table(p, fs).num_rows > 0
    rows = read_output(str(out))
    keys = Counter(r["key"] for r in rows)
    assert len(rows) == N and set(keys.values()) == {1}      # exactly one row per input
    by_line, by_n = {}, {}
    for r in rows:
        if r["key"].startswith(f"{manifest}:"):               # an unusable line: keyed by its line
            by_line[int(r["key"].rsplit(":", 1)[1]) - 1] = r
        else:                                                 # duplicates share `n` with the line they copy
            by_n.setdefault(int(r["n"]), []).append(r)
    want_by_n: dict = {}
    for i, line in enumerate(manifest.read_text().splitlines()):
        if i in by_line:
            assert by_line[i]["error"] == expected[i], (i, line, by_line[i])
            assert expected[i] in ("bad_row", "bad_segment", "zero_length_segment")
        else:
            want_by_n.setdefault(json.loads(line)["n"], []).append(expected[i])
    assert sorted(by_n) == sorted(want_by_n)
    for n, want in want_by_n.items():
        assert Counter(r["error"] for r in by_n[n]) == Counter(want), (n, by_n[n])
        for r in by_n[n]:
            assert (r["pred_text"] is None) == (r["error"] is not None)
    assert all(r["silent"] for r in rows if r["audio"].endswith("silence.wav") and r["error"] is None)
