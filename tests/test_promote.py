"""Serving on the simulated multi-node cluster (`ray_cluster`, two worker nodes), under steady load
from bounded client loops (the real `openai` client, no retries):

- a model replica's node removed hard (and a replacement added) costs no request: the ingress
  resubmits the lost windows on the other replica;
- `jobs/promote.py` scores the demo teacher against the served demo student on held-out clips,
  runs it as a canary for a share of the requests, then rolls it onto the running application in
  place: zero non-2xx, every answer is the transcript of the model its X-Ark-Model-Version header
  names, answers switch to the teacher, /v1/models shows the new version;
- the untrained student against the served teacher is refused by the gate (exit 3), and
  `--rollback` returns to the student.

The application is `serve_configs/local.yaml` deployed with `serve deploy` by a subprocess (HF
engines: light enough for several models on two 4-CPU nodes), at most one model replica per node
(as with one GPU per node): two for the replica loss, one for the promotion, so that a rollout's
extra replica has a node. The ingress and the HTTP proxy run on the head (never removed: this is
about model replicas).
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import pytest
import requests
import soundfile as sf
import yaml

from ark_ray.net import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
APP, MODEL, REPLICA = "ark-asr", "ark-asr", "ArkTranscriber"
MAX_NEW = 32
TEACHER = REPO / "assets" / "models" / "teacher"
CORPUS = REPO / "assets" / "demo_corpus"


def app_config(port: int, model: str, replicas: int = 2) -> dict:
    """serve_configs/local.yaml on `port`, serving `model` with HF replicas on different nodes (as
    GPU replicas would be), one window per engine call (so an answer does not depend on what else
    is in the batch)."""
    cfg = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    cfg["http_options"]["port"] = port
    (app,) = cfg["applications"]
    app["args"].update(model=model, max_new_tokens=MAX_NEW, max_batch_size=1,
                       engine={"backend": "hf", "num_cpus": 1, "max_chunk_s": 30})
    app["deployments"] = [{"name": REPLICA, "num_replicas": replicas, "max_replicas_per_node": 1},
                          {"name": "ArkIngress", "num_replicas": 1,
                           "ray_actor_options": {"num_cpus": 0, "resources": {"sim_head": 0.01}}}]
    return cfg


def serve_cli(cluster, *args: str, timeout: float = 300) -> str:
    r = subprocess.run([str(pathlib.Path(sys.executable).with_name("serve")), *args, "-a", cluster.dashboard_url],
                       env=cluster.env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def app_details(cluster) -> dict:
    return requests.get(cluster.dashboard_url + "/api/serve/applications/", timeout=30).json()["applications"]


def replicas(cluster) -> list[dict]:
    """The model deployment's replicas ({state, node_id, ...}) as the Serve REST API lists them."""
    return list((app_details(cluster).get(APP) or {}).get("deployments", {}).get(REPLICA, {}).get("replicas", []))


def running(cluster) -> list[str]:
    """Node ids of the running model replicas."""
    return [r["node_id"] for r in replicas(cluster) if r["state"] == "RUNNING"]


def wait_for(what: str, check, timeout_s: float = 600, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def speech(lines: list[str]) -> tuple[bytes, np.ndarray]:
    from ark_ray.audio import load_audio

    wave = np.concatenate([load_audio(CORPUS / json.loads(x)["audio"]) for x in lines])
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue(), wave


@pytest.fixture(scope="module")
def student():
    from ark_ray.demo import student as demo_student

    return str(demo_student.ensure())


class Served:
    """The application on the cluster, deployed from a config file by `serve deploy`."""

    def __init__(self, cluster, model: str, folder: pathlib.Path):
        self.cluster, self.model, self.port = cluster, model, free_port()
        self.path, self.url = folder / "serve.yaml", f"http://127.0.0.1:{self.port}"

    def deploy(self, n: int) -> None:
        """(Re)deploy with `n` model replicas; wait until exactly those run."""
        self.path.write_text(yaml.safe_dump(app_config(self.port, self.model, n)))
        serve_cli(self.cluster, "deploy", str(self.path))
        wait_for(f"{n} running replicas", lambda: (app_details(self.cluster).get(APP) or {}).get(
            "status") == "RUNNING" and len(running(self.cluster)) == n == len(replicas(self.cluster)))


@pytest.fixture(scope="module")
def served(ray_cluster, student, tmp_path_factory):
    """The application on the cluster with two model replicas on the two worker nodes; shut down
    after the module."""
    ray_cluster.ensure_workers(2)
    app = Served(ray_cluster, student, tmp_path_factory.mktemp("serve_cluster"))
    app.deploy(2)
    yield app
    serve_cli(ray_cluster, "shutdown", "-y")


@pytest.fixture(scope="module")
def clip(student):
    """A few seconds of demo speech (one window) that the student and the teacher transcribe
    differently, with each model's own transcript of it (the HF engine, in this process)."""
    from ark_ray.config import EngineConfig, SamplingConfig
    from ark_ray.engines import make_engine
    from ark_ray.serve.versions import model_version

    lines = (CORPUS / "test.jsonl").read_text().splitlines()
    engines = {model_version(d): make_engine(str(d), EngineConfig(backend="hf")) for d in (student, TEACHER)}
    for start in range(0, 30, 3):
        data, wave = speech(lines[start:start + 3])
        texts = {v: e.transcribe([wave], SamplingConfig(max_new_tokens=MAX_NEW))[0].text for v, e in engines.items()}
        if len(set(texts.values())) == 2:
            return data, texts
    pytest.fail("no demo clip the student and the teacher transcribe differently")


class Load:
    """Client loops posting the clip back to back until stopped (bounded: `threads` requests at
    once, the last `streams` of them with stream=true), recording (start, end, status, version
    header, text) of every answer; a stream that ends without its done event counts as a 500."""

    def __init__(self, url: str, data: bytes, threads: int = 2, streams: int = 0):
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        self.data, self.stop_event = data, threading.Event()
        self.records: list[tuple] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i >= threads - streams,), daemon=True)
                        for i in range(threads)]

    def _one(self, stream: bool) -> tuple:
        raw = self.client.audio.transcriptions.with_raw_response.create(
            model=MODEL, file=("clip.wav", self.data, "audio/wav"), **({"stream": True} if stream else {}))
        version = raw.headers.get("x-ark-model-version")
        if not stream:
            return raw.status_code, version, raw.parse().text
        done = [e.text for e in raw.parse() if e.type == "transcript.text.done"]
        return (raw.status_code, version, done[0]) if done else (500, version, "stream ended without done")

    def _loop(self, stream: bool) -> None:
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try:
                out = self._one(stream)
                rec = (t0, time.monotonic(), *out)
            except openai.APIStatusError as e:
                rec = (t0, time.monotonic(), e.status_code, None, e.message)
            except (openai.APIConnectionError, openai.APIError) as e:   # a stream's error event too
                rec = (t0, time.monotonic(), 0, None, str(e))
            with self.lock:
                self.records.append(rec)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=300)

    def count(self) -> int:
        with self.lock:
            return len(self.records)

    def since(self, t: float) -> list[tuple]:
        with self.lock:
            return [r for r in self.records if r[0] >= t]


def retried_windows(cluster) -> float:
    """ark_serve_window_retries_total summed over the cluster's nodes."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for url in cluster.metrics_urls():
        try:
            body = requests.get(url, timeout=10).text
        except requests.RequestException:
            continue
        for fam in text_string_to_metric_families(body):
            total += sum(s.value for s in fam.samples if s.name == "ray_ark_serve_window_retries_total")
    return total


# ------------------------------------------------------------------------------------------------
def test_replica_loss_costs_no_request(ray_cluster, served, clip):
    data, _ = clip
    served.deploy(2)
    nodes = running(ray_cluster)
    assert len(nodes) == 2 and len(set(nodes)) == 2, f"model replicas not on two nodes: {replicas(ray_cluster)}"
    victim = nodes[0]
    retried_before = retried_windows(ray_cluster)
    # five clients on two replicas: each replica always holds windows (one per engine call, the
    # rest queued in it), so the lost one takes some with it
    with Load(served.url, data, threads=5, streams=1) as load:
        wait_for("steady answers", lambda: load.count() >= 6, timeout_s=300, every_s=0.2)
        t_kill = time.monotonic()
        ray_cluster.replace(victim)                       # hard: raylet and workers gone at once
        wait_for("Serve to replace the lost replica", lambda: len(running(ray_cluster)) == 2 and
                 victim not in running(ray_cluster), timeout_s=600)
        n = load.count()
        wait_for("answers from the replaced replica set", lambda: load.count() >= n + 6, timeout_s=300, every_s=0.2)
    recs = sorted(load.records)
    codes = [r[2] for r in recs]
    assert codes.count(200) == len(codes), [r for r in recs if r[2] != 200][:5]
    ends = sorted(r[1] for r in recs)
    around = [r for r in recs if r[0] <= t_kill + 15 and r[1] >= t_kill]
    figures = {"requests": len(recs), "non_2xx": len(codes) - codes.count(200),
               "longest_gap_s": round(max(b - a for a, b in zip(ends, ends[1:])), 2),
               "slowest_around_kill_s": round(max(r[1] - r[0] for r in around), 2),
               "median_s": round(float(np.median([r[1] - r[0] for r in recs])), 2)}
    retried = wait_for("the retry to be counted", lambda: retried_windows(ray_cluster) - retried_before,
                       timeout_s=60)
    figures["windows_retried"] = int(retried)
    print("REPLICA_LOSS", json.dumps(figures))
    assert retried >= 1          # a window was in flight on the lost replica and went elsewhere


def promote(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "promote.py"), f"--app={APP}", *args],
                          env=cluster.env(), capture_output=True, text=True, timeout=900, cwd=REPO)


def models(url: str) -> dict:
    (m,) = requests.get(url + "/v1/models", timeout=30).json()["data"]
    return m


def test_promote_canary_gate_and_rollback(ray_cluster, served, clip, student, tmp_path):
    """One model replica (a config change, no restart): the rollout's surge replica takes the other
    worker node."""
    from ark_ray.serve.versions import model_version

    data, texts = clip
    served.deploy(1)
    url = served.url
    v_student, v_teacher = model_version(student), model_version(TEACHER)
    lines = (CORPUS / "test.jsonl").read_text().splitlines()[:16]
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(dict(json.loads(x), audio=str(CORPUS / json.loads(x)["audio"]))) + "\n"
                               for x in lines))
    common = [f"--eval_manifest={heldout}", f"--state_dir={tmp_path / 'state'}", "--min_gain=0.05"]
    assert models(url)["version"] == v_student
    seen_models: list[dict] = []
    with Load(url, data, threads=2) as load:
        wait_for("steady answers", lambda: load.count() >= 4, timeout_s=300, every_s=0.2)
        stop_polling = threading.Event()

        def poll():
            while not stop_polling.is_set():
                seen_models.append(models(url))
                time.sleep(0.5)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        up = promote(ray_cluster, f"--candidate={TEACHER}", "--canary_fraction=0.5", "--canary_s=8", *common)
        stop_polling.set()
        poller.join()
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-5000:]
        assert models(url)["version"] == v_teacher
        n = load.count()
        wait_for("answers after the rollout", lambda: load.count() >= n + 4, timeout_s=300, every_s=0.2)
        t_promoted = time.monotonic()       # routers know the new replica set by now

        worse = promote(ray_cluster, f"--candidate={student}", *common)
        assert worse.returncode == 3, worse.stdout[-3000:] + worse.stderr[-5000:]
        assert models(url)["version"] == v_teacher

        t_rollback = time.monotonic()
        back = promote(ray_cluster, "--rollback", *common[1:])
        assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-5000:]
        assert models(url)["version"] == v_student
        n = load.count()
        wait_for("answers after the rollback", lambda: load.count() >= n + 4, timeout_s=300, every_s=0.2)
        t_back = time.monotonic()
        n = load.count()
        wait_for("answers from the student", lambda: load.count() >= n + 2, timeout_s=300, every_s=0.2)
    recs = sorted(load.records)
    assert [r for r in recs if r[2] != 200] == []                       # zero non-2xx throughout
    for r in recs:                      # each answer is the transcript of the model its header names
        assert r[3] in texts and r[4] == texts[r[3]], r
    assert any(r[3] == v_teacher for r in recs if r[1] < t_promoted)    # answers switched to the teacher
    assert {r[3] for r in recs if t_promoted <= r[0] < t_rollback} == {v_teacher}
    assert {r[3] for r in recs if r[0] > t_back} == {v_student}
    assert {"version": v_teacher, "fraction": 0.5} in [m.get("canary") for m in seen_models]

    table = closing(up.stdout)
    # the console: header, bars, a line per event, the table (text mode reads each bar update, \r, as a line too)
    assert all(r.stdout.count("\n") <= 60 for r in (up, worse, back)), up.stdout + worse.stdout + back.stdout
    assert "canary: 50% of requests go to" in up.stdout and "gate passed" in up.stdout
    assert (table["decision"], table["served_before"], table["served_now"]) == ("promoted", v_student, v_teacher)
    assert float(table["candidate_wer"]) <= float(table["served_wer"]) - 0.05, table
    refused = closing(worse.stdout)
    assert (refused["decision"], refused["served_now"]) == ("refused", v_teacher)
    assert "not below the served" in refused["why"] and "cached" in worse.stdout   # transcripts reused
    assert closing(back.stdout)["served_now"] == v_student
    nope = promote(ray_cluster, "--rollback", "--app=nope", *common[1:])
    assert nope.returncode == 2 and "app: no Serve application 'nope' is running" in nope.stderr, nope.stderr[-2000:]
    history = json.loads((tmp_path / "state" / APP / "history.json").read_text())
    assert [e["action"] for e in history] == ["promoted", "refused", "rolled_back"]
    assert history[0]["to"]["version"] == v_teacher and history[2]["to"]["version"] == v_student


def closing(stdout: str) -> dict:
    """The closing table of a promote run as {metric: value}."""
    rows = [line.split("|")[1:3] for line in stdout.splitlines() if line.startswith("| ") and line.count("|") >= 3]
    return {k.strip(): v.strip() for k, v in rows}


# ------------------------------------------------------------------------------------------------ no cluster
def test_gate_and_rollback_history(tmp_path):
    from ark_ray.data.run_storage import RunStorage
    from ark_ray.serve.promote import History, Model, gate

    served = Model("/m/a", "a", wer=0.30, error_rows=0)
    assert gate(served, Model("/m/b", "b", wer=0.28, error_rows=0), 0.01)[0]
    ok, why = gate(served, Model("/m/b", "b", wer=0.28, error_rows=0), 0.05)
    assert not ok and "not below the served 0.3000 by 0.0500" in why
    ok, why = gate(served, Model("/m/b", "b", wer=0.10, error_rows=2), 0.01)
    assert not ok and "failed on 2 held-out rows" in why          # a better WER on fewer rows is no win

    h = History(RunStorage(tmp_path / "state"))
    for a, b, action in (("a", "b", "promoted"), ("b", "c", "refused"), ("b", "d", "promoted"),
                         ("d", "b", "rolled_back")):
        h.add({"action": action, "from": {"model": f"/m/{a}", "version": a}, "to": {"model": f"/m/{b}", "version": b}})
    reread = History(RunStorage(tmp_path / "state"))
    assert [e["action"] for e in reread.entries] == ["promoted", "refused", "promoted", "rolled_back"]
    assert reread.undo_target("d")["version"] == "b"
    assert reread.undo_target("b")["version"] == "a"              # a second rollback keeps going back
    assert reread.undo_target("a") is None and reread.undo_target("c") is None


def test_s3_candidate_is_a_run_folder_downloaded_once(s3_client, aws_env, tmp_path):
    from ark_ray.config import PromoteConfig, S3Config
    from ark_ray.serve.promote import candidate_dir
    from ark_ray.serve.versions import fingerprint

    s3_client.create_bucket(Bucket="ark-promote")
    for f in TEACHER.iterdir():
        s3_client.upload_file(str(f), "ark-promote", f"runs/opd7/final/{f.name}")
    s3 = S3Config(endpoint_url=aws_env["AWS_ENDPOINT_URL"], access_key_id="test", secret_access_key="test",
                  region="us-east-1")
    cfg = PromoteConfig(candidate="s3://ark-promote/runs/opd7", state_dir=str(tmp_path / "state"), s3=s3)
    lines: list[str] = []
    local = candidate_dir(cfg.candidate, cfg, lines.append)
    assert local.startswith(str(tmp_path / "state" / "models")) and pathlib.Path(local, "config.json").is_file()
    assert fingerprint(local) == fingerprint(TEACHER) and len(lines) == 1 and "downloading" in lines[0]
    assert candidate_dir(cfg.candidate, cfg, lines.append) == local and len(lines) == 1     # cached
    with pytest.raises(Exception, match="no config.json"):
        candidate_dir("s3://ark-promote/runs/none", cfg, lines.append)


def test_bad_candidate_or_manifest_is_one_line_before_ray_starts(tmp_path):
    state = f"--state_dir={tmp_path / 'state'}"
    for args, words in (([f"--candidate={tmp_path}", state], f"promote: candidate: {tmp_path} has no config.json"),
                        ([f"--candidate={TEACHER}", "--eval_manifest=/no/such.jsonl", state],
                         "promote: eval_manifest: /no/such.jsonl not found")):
        r = subprocess.run([sys.executable, str(REPO / "jobs" / "promote.py"), *args], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path, env={k: v for k, v in os.environ.items()
                                                                      if k != "RAY_ADDRESS"})
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(words), r.stderr[-2000:]
        assert "Traceback" not in r.stderr
