"""S3 end to end against a real S3-compatible HTTP server (moto in server mode on 127.0.0.1):
settings from flags or AWS_* variables, listing a prefix, and jobs/transcribe.py run as a
subprocess that reads WAV + FLAC from one bucket prefix and writes its results to another."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import soundfile as sf

from ark_ray.config import S3Config
from ark_ray.data.listing import list_audio, load_inputs
from ark_ray.data.s3 import StorageError, resolve, s3_options
from ark_ray.model.factory import save_random_model

BUCKET = "audio-in"


@pytest.fixture(scope="module")
def bucket(s3_client):
    s3 = s3_client
    s3.create_bucket(Bucket=BUCKET)
    rng = np.random.default_rng(0)
    for key, fmt, sr, secs in [("raw/a.wav", "WAV", 16000, 1.0), ("raw/deep/b.flac", "FLAC", 22050, 1.4),
                               ("raw/c.WAV", "WAV", 8000, 0.6)]:
        buf = io.BytesIO()
        sf.write(buf, (0.1 * rng.standard_normal(int(sr * secs))).astype(np.float32), sr, format=fmt)
        s3.put_object(Bucket=BUCKET, Key=key, Body=buf.getvalue())
    s3.put_object(Bucket=BUCKET, Key="raw/broken.flac", Body=b"fLaC but not really")
    s3.put_object(Bucket=BUCKET, Key="raw/readme.txt", Body=b"not listed")
    manifest = [{"audio": "raw/a.wav", "text": "ref a", "begin_time": 0.25, "end_time": 0.75},
                {"audio": "s3://audio-in/raw/deep/b.flac", "text": "ref b"}]
    s3.put_object(Bucket=BUCKET, Key="m.jsonl",
                  Body="".join(json.dumps(r) + "\n" for r in manifest).encode())
    return s3


def test_options_from_flags_then_environment():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_REGION": "eu-west-1", "AWS_SESSION_TOKEN": "t"}
    assert s3_options(None, env) == {"endpoint_override": "127.0.0.1:9", "scheme": "http", "region": "eu-west-1",
                                     "access_key": "k", "secret_key": "s", "session_token": "t"}
    flags = S3Config(endpoint_url="https://minio.local:9000", region="us-east-2", access_key_id="K2",
                     secret_access_key="S2")
    got = s3_options(flags, env)
    assert got["endpoint_override"] == "minio.local:9000" and got["scheme"] == "https"
    assert (got["region"], got["access_key"], got["secret_key"]) == ("us-east-2", "K2", "S2")
    assert s3_options(None, {"AWS_ENDPOINT_URL_S3": "http://h:1", "AWS_ENDPOINT_URL": "http://other:2"})[
        "endpoint_override"] == "h:1"
    assert s3_options(S3Config(anonymous=True), env) == {"endpoint_override": "127.0.0.1:9", "scheme": "http",
                                                         "region": "eu-west-1", "anonymous": True}
    with pytest.raises(StorageError, match="both"):
        s3_options(None, {"AWS_ACCESS_KEY_ID": "only-the-id"})
    with pytest.raises(StorageError, match="endpoint"):
        s3_options(S3Config(endpoint_url="ftp://x"), {})
    with pytest.raises(StorageError, match="scheme"):
        resolve("gs://bucket/x")


def test_list_prefix_and_manifest_on_s3(bucket, aws_env, monkeypatch):
    for k, v in aws_env.items():
        monkeypatch.setenv(k, v)
    got = list_audio(f"s3://{BUCKET}/raw")
    assert got == [f"s3://{BUCKET}/raw/{k}" for k in ("a.wav", "broken.flac", "c.WAV", "deep/b.flac")]
    rows = load_inputs(f"s3://{BUCKET}/m.jsonl")
    assert [r["audio"] for r in rows] == [f"s3://{BUCKET}/raw/a.wav", f"s3://{BUCKET}/raw/deep/b.flac"]
    assert rows[0]["key"] == f"s3://{BUCKET}/raw/a.wav#0.250-0.750"
    assert rows[0]["id"].startswith(f"s3://{BUCKET}/m.jsonl:")


def test_manifest_dataset_reads_s3_like_the_local_reader(bucket, moto_endpoint, ray_local):
    """The Ray Data manifest reader on S3, credentials only in the S3Config (the Ray workers have no
    AWS_* variables): bad rows refused all at once or skipped and counted, the good rows the same
    as the in-process reader's, relative audio paths resolved on S3, and the audio decoded there."""
    from ark_ray.data.manifest import ManifestError, read_manifest
    from ark_ray.data.manifest_dataset import ROW_INDEX, open_manifest

    s3 = S3Config(endpoint_url=moto_endpoint, access_key_id="test", secret_access_key="test", region="us-east-1")
    lines = ['{"audio": "raw/a.wav", "text": "ref a", "begin_time": 0.25, "end_time": 0.75}', "not json",
             '{"audio": "raw/c.WAV", "text": "backwards", "begin_time": 2.0, "end_time": 1.0}',
             '{"audio": "s3://audio-in/raw/deep/b.flac", "text": "ref b", "begin_time": -1, "end_time": -1}']
    bucket.put_object(Bucket=BUCKET, Key="train.jsonl", Body="\n".join(lines).encode())
    uri = f"s3://{BUCKET}/train.jsonl"
    with pytest.raises(ManifestError, match=r"2 bad row\(s\)[^\n]*\n[^\n]*train.jsonl:2: bad_row: not valid JSON"
                       r"[^\n]*\n[^\n]*train.jsonl:3: bad_segment"):
        open_manifest(uri, s3=s3)
    with pytest.raises(ManifestError, match="manifest not found"):
        open_manifest(f"s3://{BUCKET}/missing.jsonl", s3=s3)
    m = open_manifest(uri, s3=s3, skip_bad_rows=True)
    assert (m.rows, m.skipped) == (2, 2)
    rows = m.dataset.take_all()
    assert [r.pop(ROW_INDEX) for r in rows] == [0, 1]
    assert rows == read_manifest(uri, skip_bad_rows=True, s3=s3)
    assert [(r["audio"], r["begin_time"], r["end_time"], r["id"]) for r in rows] == [
        (f"s3://{BUCKET}/raw/a.wav", 0.25, 0.75, f"{uri}:1"), (f"s3://{BUCKET}/raw/deep/b.flac", None, None, f"{uri}:4")]
    # and its audio decoded by the input pipeline's Ray Data tasks, off S3, cut and resampled
    from ark_ray.config import InputConfig
    from ark_ray.data.clip_stream import StreamOptions, first_rows

    (clips,) = [c.load() for c in first_rows(m, 2, StreamOptions(InputConfig(block_rows=2), 30.0, s3))]
    assert clips.ids == [f"{uri}:1", f"{uri}:4"] and clips.texts == ["ref a", "ref b"]
    assert len(clips.waves[0]) == 8000 and abs(len(clips.waves[1]) - 22400) <= 1   # 0.5 s; 1.4 s from 22.05 kHz


def _run_job(args: list[str], env_extra: dict, repo_root) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(env_extra)
    env["PYTHONPATH"] = str(repo_root)
    proc = subprocess.run([sys.executable, str(repo_root / "jobs" / "transcribe.py"), *args], env=env,
                          cwd=repo_root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY_JSON ")][-1]
    assert "| x_real_time " in proc.stdout                    # the closing summary table
    return json.loads(line[len("SUMMARY_JSON "):])


def test_transcribe_job_end_to_end_on_s3(bucket, aws_env, tmp_path, repo_root):
    model = tmp_path / "model"
    save_random_model(model, "tiny", seed=3)
    ray_tmp = tempfile.mkdtemp(prefix="ark-s3-", dir="/tmp")
    args = [f"--input=s3://{BUCKET}/raw", f"--output=s3://{BUCKET}/out/run1", f"--model={model}",
            "--engine.backend=hf", "--sampling.max_new_tokens=4", "--files_per_block=2", "--ray.num_cpus=4",
            f"--ray.temp_dir={ray_tmp}", "--progress=false"]
    summary = _run_job(args, aws_env, repo_root)
    assert (summary["inputs"], summary["rows_written"], summary["error_rows"]) == (4, 4, 1)

    listed = bucket.list_objects_v2(Bucket=BUCKET, Prefix="out/run1/")["Contents"]
    parts = [o["Key"] for o in listed if o["Key"].rsplit("/", 1)[-1].startswith("part-")]
    assert parts and all(k.endswith(".jsonl") for k in parts)
    rows = [json.loads(line) for k in parts
            for line in bucket.get_object(Bucket=BUCKET, Key=k)["Body"].read().decode().splitlines()]
    by_audio = {r["audio"]: r for r in rows}
    assert set(by_audio) == {f"s3://{BUCKET}/raw/{k}" for k in ("a.wav", "deep/b.flac", "c.WAV", "broken.flac")}
    assert by_audio[f"s3://{BUCKET}/raw/broken.flac"]["error"] == "unreadable"
    assert by_audio[f"s3://{BUCKET}/raw/deep/b.flac"]["duration_s"] == pytest.approx(1.4, abs=1e-3)
    for k in ("a.wav", "deep/b.flac", "c.WAV"):
        r = by_audio[f"s3://{BUCKET}/raw/{k}"]
        assert r["error"] is None and isinstance(r["pred_text"], str) and r["pred_text_raw"]

    # the same job again, settings by flags instead of the environment: everything is already done
    flags = [f"--s3.endpoint_url={aws_env['AWS_ENDPOINT_URL']}", "--s3.access_key_id=test",
             "--s3.secret_access_key=test", "--s3.region=us-east-1"]
    again = _run_job(args + flags, {}, repo_root)
    assert (again["skipped_done"], again["rows_written"]) == (4, 0)


SCALE_FILES = 320


@pytest.fixture(scope="module")
def scale_prefix(bucket):
    """SCALE_FILES tiny WAVs under one prefix, plus 1001 non-audio objects beside them, so one
    recursive listing spans two pages (S3 returns at most 1000 keys a page)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(1)

    def put(i: int) -> None:
        if i < SCALE_FILES:
            buf = io.BytesIO()
            sf.write(buf, (0.1 * rng.standard_normal(1600 + 16 * i)).astype(np.float32), 16000, format="WAV")
            bucket.put_object(Bucket=BUCKET, Key=f"scale/in/{i:04d}.wav", Body=buf.getvalue())
        else:
            bucket.put_object(Bucket=BUCKET, Key=f"scale/in/notes/{i:04d}.txt", Body=b"x")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(SCALE_FILES + 1001)))
    return f"s3://{BUCKET}/scale/in"


def test_listing_paginates(scale_prefix, aws_env, monkeypatch):
    for k, v in aws_env.items():
        monkeypatch.setenv(k, v)
    got = list_audio(scale_prefix)
    assert got == [f"{scale_prefix}/{i:04d}.wav" for i in range(SCALE_FILES)]


def _parts(bucket, prefix: str) -> list[str]:
    keys, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        page = bucket.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **kw)
        keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].rsplit("/", 1)[-1].startswith("part-")]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def test_killed_midway_then_rerun_every_input_one_row(scale_prefix, bucket, moto_endpoint, ray_local, tmp_path,
                                                     repo_root):
    """The job (a driver on the session's cluster, as under `ray job submit`) is SIGKILLed once
    part files land, taking its engine actor and tasks with it; the rerun finishes the rest."""
    import signal
    import time
    from collections import Counter

    model = tmp_path / "model"
    save_random_model(model, "tiny", seed=4)
    out = f"s3://{BUCKET}/scale/out"
    args = [f"--input={scale_prefix}", f"--output={out}", f"--model={model}", "--engine.backend=hf",
            "--sampling.max_new_tokens=16", "--files_per_block=5", "--progress=false",
            f"--s3.endpoint_url={moto_endpoint}", "--s3.access_key_id=test", "--s3.secret_access_key=test",
            "--s3.region=us-east-1"]
    cluster = {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(cluster, PYTHONPATH=str(repo_root))
    log = open(tmp_path / "killed_job.log", "w")
    proc = subprocess.Popen([sys.executable, str(repo_root / "jobs" / "transcribe.py"), *args], env=env,
                            cwd=repo_root, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    landed = []
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not landed:
            landed = _parts(bucket, "scale/out/")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)        # the driver; Ray then ends its actors and tasks
        proc.wait()
    assert landed and proc.returncode == -signal.SIGKILL, (tmp_path / "killed_job.log").read_text()[-3000:]
    n_parts = len(_parts(bucket, "scale/out/"))
    assert 0 < n_parts < SCALE_FILES // 5

    summary = _run_job(args, cluster, repo_root)
    assert summary["inputs"] == SCALE_FILES and summary["skipped_done"] >= 5
    assert summary["skipped_done"] + summary["rows_written"] == SCALE_FILES and summary["error_rows"] == 0
    rows = [json.loads(line) for k in _parts(bucket, "scale/out/")
            for line in bucket.get_object(Bucket=BUCKET, Key=k)["Body"].read().decode().splitlines()]
    assert Counter(r["key"] for r in rows) == Counter({f"{scale_prefix}/{i:04d}.wav": 1 for i in range(SCALE_FILES)})
    assert all(r["error"] is None and r["pred_text_raw"] for r in rows)
