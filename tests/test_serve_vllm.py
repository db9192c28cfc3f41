"""The async (vLLM) replica end to end: `serve_configs/local.yaml` deployed the way `serve run` /
`serve deploy` do (the Serve controller builds it), only the port and model path made local.

Token streaming with the `openai` client (several deltas for one window, adding up exactly to
the final text, the same text as without streaming), a burst beyond the config's capacity (503s
with Retry-After, then served normally), and autoscaling: with min 1 / max 2 replicas and a low
target, load brings up a second replica and it goes away once the load stops."""
from __future__ import annotations

import io
import json
import pathlib
import threading
import time

import numpy as np
import openai
import pytest
import requests
import soundfile as sf
import yaml

from ark_ray.net import free_port

pytest.importorskip("vllm")

REPO = pathlib.Path(__file__).resolve().parents[1]


CONFIG = REPO / "serve_configs" / "local.yaml"
APP, REPLICA = "ark-asr", "ArkTranscriber"
MODEL = "ark-asr"


def local_config(port: int, autoscaling: dict | None = None) -> dict:
    """local.yaml as written, on `port`, with the model path absolute (the controller's build task
    does not run in the repo), optionally with an autoscaling_config for the model replicas."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["http_options"]["port"] = port
    (app,) = cfg["applications"]
    app["args"]["model"] = str(REPO / app["args"]["model"])
    if autoscaling:
        (dep,) = [d for d in app["deployments"] if d["name"] == REPLICA]
        dep.pop("num_replicas", None)
        dep["autoscaling_config"] = autoscaling
    return cfg


def deploy(cfg: dict, timeout_s: float = 900) -> None:
    """What `serve deploy` does: hand the config to the controller, wait for the app to run."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(cfg)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            return
        assert status is None or status.status != "DEPLOY_FAILED", status.message
        assert time.monotonic() < deadline, f"{APP} not running after {timeout_s} s: {status}"
        time.sleep(1)


def replica_states() -> dict:
    from ray import serve

    return dict(serve.status().applications[APP].deployments[REPLICA].replica_states)


@pytest.fixture(scope="module")
def server(ray_local, stop_serve):
    port = free_port()
    deploy(local_config(port))
    yield {"url": f"http://127.0.0.1:{port}", "port": port}
    stop_serve()


def speech(n_utts: int, offset: int = 0) -> bytes:
    """`n_utts` demo test utterances back to back, as WAV."""
    from ark_ray.audio import load_audio

    corpus = REPO / "assets" / "demo_corpus"
    lines = (corpus / "test.jsonl").read_text().splitlines()[offset:offset + n_utts]
    wave = np.concatenate([load_audio(corpus / json.loads(x)["audio"]) for x in lines])
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def post(url: str, data: bytes, name: str = "clip.wav", **fields):
    fields.setdefault("model", MODEL)
    return requests.post(url + "/v1/audio/transcriptions", files={"file": (name, data)}, data=fields, timeout=300)


def test_tokens_stream_with_openai_client(server):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=300)
    short = ("short.wav", speech(4), "audio/wav")              # ~8 s: one window, several words
    text = client.audio.transcriptions.create(model=MODEL, file=short).text
    assert len(text.split()) >= 3, text
    events = list(client.audio.transcriptions.create(model=MODEL, file=short, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    (done,) = [e for e in events if e.type == "transcript.text.done"]
    assert done.text == text and "".join(deltas) == text
    assert len(deltas) >= 2, deltas    # tokens stream as decoded, not one delta per finished window
    assert done.usage.output_tokens >= len(deltas)
    # two windows (the shared chunker cuts at 30 s): the deltas still add up to the joined text
    long = ("long.wav", speech(24, offset=4), "audio/wav")
    vj = client.audio.transcriptions.create(model=MODEL, file=long, response_format="verbose_json")
    assert len(vj.segments) >= 2 and all(s.avg_logprob < 0 for s in vj.segments if s.tokens)
    events = list(client.audio.transcriptions.create(model=MODEL, file=long, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    (done,) = [e for e in events if e.type == "transcript.text.done"]
    assert done.text == vj.text and "".join(deltas) == vj.text and len(deltas) >= len(vj.segments)


def silence_flac(seconds: float) -> bytes:
    """Digital silence as FLAC: many windows in a few KB, so a burst costs little to upload."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * 16000), np.float32), 16000, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def test_burst_against_local_yaml_gets_503_with_retry_after_and_recovers(server):
    cfg = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    capacity = cfg["max_ongoing_requests"] + cfg["max_queued_requests"]          # windows, one replica
    data = silence_flac(cfg["max_audio_s"])                # >= max_audio_s / max_chunk_s windows each
    n = 2 * capacity // int(cfg["max_audio_s"] / cfg["engine"]["max_chunk_s"]) + 1
    url = server["url"]
    barrier = threading.Barrier(n + 1)
    answers: list[requests.Response] = []
    health: list[int] = []
    lock = threading.Lock()

    def one():
        barrier.wait()
        r = post(url, data, "silence.flac")
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    while any(t.is_alive() for t in threads):      # /health answers during the burst
        health.append(requests.get(url + "/health", timeout=60).status_code)
        time.sleep(0.2)
    for t in threads:
        t.join()
    codes = [r.status_code for r in answers]
    assert len(codes) == n and set(codes) <= {200, 503}, [r.text[:200] for r in answers if r.status_code not in (200, 503)]
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    assert health and set(health) == {200}
    for r in answers:
        if r.status_code == 503:
            assert r.headers.get("retry-after") == "1" and r.json()["error"]["code"] == "overloaded"
    after = post(url, speech(2))
    assert after.status_code == 200 and after.json()["text"]


def test_autoscaling_adds_a_replica_under_load_and_removes_it(server):
    """The same app with min 1 / max 2 model replicas and a target of 1 window in flight each."""
    deploy(local_config(server["port"], autoscaling={
        "min_replicas": 1, "initial_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
        "upscale_delay_s": 0, "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 2}))
    assert replica_states() == {"RUNNING": 1}
    data = speech(3)
    stop = threading.Event()
    codes: list[int] = []

    def client():
        while not stop.is_set():
            codes.append(post(server["url"], data).status_code)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    seen = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            seen.append(replica_states())
            if seen[-1].get("RUNNING", 0) == 2:
                break
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert seen[-1].get("RUNNING") == 2, seen[-5:]
    assert any(s.get("STARTING") for s in seen)          # a new replica, not an existing one
    assert codes and set(codes) == {200}
    deadline = time.monotonic() + 300
    while replica_states() != {"RUNNING": 1} and time.monotonic() < deadline:
        time.sleep(1)
    assert replica_states() == {"RUNNING": 1}
    assert post(server["url"], speech(1)).status_code == 200
