"""The Serve endpoint, run for real on the session's local Ray and called over HTTP on 127.0.0.1:
the `openai` client for every response_format and streaming, a 45 s clip, each bad input,
the API key, and a burst beyond capacity (503s, /health still fine, served again afterwards)."""
from __future__ import annotations

import io
import json
import threading

import numpy as np
import openai
import pytest
import requests
import soundfile as sf

from ark_ray.config import ConfigError, EngineConfig, SamplingConfig
from ark_ray.engines import make_engine
from ark_ray.model.factory import save_random_model
from ark_ray.net import free_port
from ark_ray.serve import build_app, formats
from ark_ray.serve.app import resolve_model_dir
from ark_ray.engines.base import Segment, Transcript

KEY = "test-key-123"
MODEL = "ark-asr-test"
MAX_NEW = 12


def wav_bytes(seconds: float, seed: int = 0, gap_at: float | None = None, sr: int = 16000) -> bytes:
    rng = np.random.default_rng(seed)
    wave = (0.1 * rng.standard_normal(int(seconds * sr))).astype(np.float32)
    if gap_at is not None:
        wave[int(gap_at * sr):int((gap_at + 0.5) * sr)] *= 0.001
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    from ark_ray.audio import load_audio
    return load_audio(data)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_tiny")
    save_random_model(d, "tiny", initializer_range=0.2, seed=3)
    return str(d)


@pytest.fixture(scope="module")
def server(ray_local, model_dir, stop_serve):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Capacity is deliberately small (2 windows running + 4 queued) so a burst overflows it.
    app = build_app({"model": model_dir, "model_name": MODEL, "api_key": KEY, "max_new_tokens": MAX_NEW,
                     "engine": {"backend": "hf", "num_cpus": 1}, "max_batch_size": 2,
                     "max_ongoing_requests": 2, "max_queued_requests": 4, "max_upload_mb": 2.0,
                     "max_audio_s": 60.0, "ingress_max_ongoing_requests": 100})
    serve.run(app, name="ark-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    stop_serve()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same model through HFEngine in this process: what the endpoint must answer."""
    engine = make_engine(model_dir, EngineConfig(backend="hf"))
    return lambda data: engine.transcribe([decoded(data)], SamplingConfig(max_new_tokens=MAX_NEW))[0]


def post(server, data: bytes | None = b"", key: str | None = KEY, **fields):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    fields.setdefault("model", MODEL)
    parts = [(k, (None, v)) for k, v in fields.items()]            # multipart even without a file
    if data is not None:
        parts.append(("file", ("clip.wav", data, "audio/wav")))
    return requests.post(server + "/v1/audio/transcriptions", files=parts, headers=headers, timeout=120)


# ----------------------------------------------------------------------------- formats (pure)
def test_subtitle_formats_from_segments():
    t = Transcript(0, 0, [1, 2], "hello world", "hello world", duration_s=3725.5, segments=[
        Segment(0.0, 29.9, "hello", [1]), Segment(29.9, 30.0, "", [2]), Segment(3600.0, 3725.5, "world", [2])])
    srt = formats.to_srt(t)
    assert srt == ("1\n00:00:00,000 --> 00:00:29,900\nhello\n\n"
                   "2\n01:00:00,000 --> 01:02:05,500\nworld\n")
    assert formats.to_vtt(t).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:29.900\nhello\n")
    assert formats.compression_ratio("") == 0.0 and formats.compression_ratio("ab" * 200) > 5


# ----------------------------------------------------------------------------- metrics
REQS, ERRS = "ray_ark_serve_requests_total", "ray_ark_serve_errors_total"
LAT = "ray_ark_serve_request_latency_seconds_count"
ROUTE = "/v1/audio/transcriptions"


def test_every_answer_is_counted_in_metrics(server, ray_metrics):
    """Each answer, errors and unknown paths included, moves ark_serve_* on Ray's metrics endpoint.

    The first test to call the server, so nothing it answered earlier can still be on its way to
    the exporter and the growth is exactly what this test caused.
    """
    k = ray_metrics.key
    before = ray_metrics.scrape()
    for _ in range(2):
        assert requests.get(server + "/health", timeout=30).status_code == 200
    assert post(server, wav_bytes(2.0, seed=6)).status_code == 200
    assert post(server, wav_bytes(1.0), key="wrong").status_code == 401
    assert post(server, wav_bytes(1.0), model="whisper-1").status_code == 404
    assert requests.get(server + "/no/such/page", timeout=30).status_code == 404
    want = {k(REQS, route="/health", status=200): 2, k(REQS, route=ROUTE, status=200): 1,
            k(REQS, route=ROUTE, status=401): 1, k(REQS, route=ROUTE, status=404): 1,
            k(REQS, route="unmatched", status=404): 1,
            k(ERRS, status=401): 1, k(ERRS, status=404): 2,
            k(LAT, route="/health"): 2, k(LAT, route=ROUTE): 3, k(LAT, route="unmatched"): 1,
            k("ray_ark_serve_audio_seconds_total"): 2.0}   # only the successful 2 s clip
    grew = ray_metrics.wait_for_increase(before, want)
    assert {key: grew.get(key) for key in want} == pytest.approx(want)
    assert sum(v for (name, _), v in grew.items() if name == REQS) == 6


# ----------------------------------------------------------------------------- happy paths
def test_every_response_format_with_openai_client(client, reference):
    data = wav_bytes(3.0, seed=1)
    ref = reference(data)
    f = ("clip.wav", data, "audio/wav")
    js = client.audio.transcriptions.create(model=MODEL, file=f, response_format="json")
    assert js.text == ref.text
    assert js.usage.type == "duration" and js.usage.seconds == pytest.approx(3.0)
    text = client.audio.transcriptions.create(model=MODEL, file=f, response_format="text", language="en")
    assert isinstance(text, str) and text.strip() == ref.text
    vj = client.audio.transcriptions.create(model=MODEL, file=f, response_format="verbose_json",
                                            language="en", timestamp_granularities=["segment"])
    assert vj.text == ref.text and vj.duration == pytest.approx(3.0) and vj.language == "en"
    assert vj.model_extra["language_source"] == "request"
    assert len(vj.segments) == 1
    seg = vj.segments[0]
    assert (seg.start, seg.end, seg.tokens) == (0.0, pytest.approx(3.0), ref.token_ids)
    assert seg.avg_logprob == pytest.approx(float(np.mean(ref.token_logprobs)), abs=1e-4)
    srt = client.audio.transcriptions.create(model=MODEL, file=f, response_format="srt")
    vtt = client.audio.transcriptions.create(model=MODEL, file=f, response_format="vtt")
    if ref.text:
        assert srt == f"1\n00:00:00,000 --> 00:00:03,000\n{ref.text}\n"
        assert vtt == f"WEBVTT\n\n00:00:00.000 --> 00:00:03.000\n{ref.text}\n"
    else:
        assert srt == "" and vtt == "WEBVTT\n\n"
    assert [m.id for m in client.models.list()] == [MODEL]


def test_sampling_temperature_is_applied(client):
    f = ("clip.wav", wav_bytes(2.0, seed=2), "audio/wav")
    outs = {client.audio.transcriptions.create(model=MODEL, file=f, temperature=1.5).text for _ in range(4)}
    greedy = {client.audio.transcriptions.create(model=MODEL, file=f, temperature=0).text for _ in range(2)}
    assert len(greedy) == 1
    assert len(outs | greedy) > 1  # random tiny model at T=1.5: samples differ from greedy


def test_long_clip_is_chunked_with_segment_timestamps(client, reference, server):
    data = wav_bytes(45.0, seed=4, gap_at=27.0)
    ref = reference(data)
    assert len(ref.segments) == 2
    f = ("long.wav", data, "audio/wav")
    vj = client.audio.transcriptions.create(model=MODEL, file=f, response_format="verbose_json")
    assert vj.duration == pytest.approx(45.0) and vj.text == ref.text
    # no language sent: ARK-ASR identifies none, so the reported one is a guess and says so
    assert (vj.language, vj.model_extra["language_source"]) == ("english", "script_guess")
    assert [(s.start, s.end, s.text) for s in vj.segments] == [
        (pytest.approx(s.start_s, abs=1e-3), pytest.approx(s.end_s, abs=1e-3), s.text) for s in ref.segments]
    assert vj.segments[0].start == 0.0 and vj.segments[0].end == vj.segments[1].start
    assert 27.0 <= vj.segments[0].end <= 27.5 and vj.segments[1].end == pytest.approx(45.0)  # cut in the pause
    vtt = client.audio.transcriptions.create(model=MODEL, file=f, response_format="vtt")
    cues = [line for line in vtt.splitlines() if "-->" in line]
    assert len(cues) == sum(1 for s in ref.segments if s.text.strip())
    # streaming: one delta per window at most, adding up to the final text
    events = list(client.audio.transcriptions.create(model=MODEL, file=f, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(done) == 1 and done[0].text == ref.text and "".join(deltas) == ref.text
    assert len(deltas) <= 2 and done[0].usage.output_tokens == len(ref.token_ids)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("data, reason", [
    (b"this is not audio at all" * 10, "unreadable"),
    (b"", "empty"),
])
def test_bad_audio_is_400_naming_the_reason(client, data, reason):
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model=MODEL, file=("bad.wav", data, "audio/wav"))
    assert e.value.status_code == 400 and reason in e.value.message
    assert e.value.body["code"] == reason and e.value.body["param"] == "file"


def test_request_errors(server, client):
    ok = wav_bytes(1.0)
    too_big = post(server, wav_bytes(70.0))                       # 70 s * 32 KB/s > 2 MB limit
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "file_too_large"
    too_long = post(server, wav_bytes(61.0, sr=8000))             # under 2 MB but over max_audio_s
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "too_long"
    cases = [
        (dict(data=ok, model="whisper-1"), 404, "model"),
        (dict(data=ok, model=""), 400, "model"),
        (dict(data=ok, response_format="xml"), 400, "response_format"),
        (dict(data=ok, temperature="hot"), 400, "temperature"),
        (dict(data=ok, temperature="3"), 400, "temperature"),
        (dict(data=ok, language="english!"), 400, "language"),
        (dict(data=ok, stream="true", response_format="srt"), 400, "stream"),
        (dict(data=ok, **{"timestamp_granularities[]": "word"}), 400, "timestamp_granularities[]"),
        (dict(data=None), 400, "file"),
    ]
    for kwargs, status, param in cases:
        r = post(server, **kwargs)
        assert r.status_code == status, (kwargs.keys(), r.text)
        assert r.json()["error"]["param"] == param
    not_form = requests.post(server + "/v1/audio/transcriptions", json={"model": MODEL},
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert not_form.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="nope", file=("a.wav", ok, "audio/wav"))


def test_api_key(server):
    ok = wav_bytes(1.0)
    for key in (None, "wrong"):
        r = post(server, ok, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(server + "/v1/models", timeout=30).status_code == 401
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert requests.get(server + "/health", timeout=30).json()["status"] == "ok"   # open without a key
    assert post(server, ok).status_code == 200


def test_burst_beyond_capacity_gets_503_and_recovers(server, ray_metrics):
    data = wav_bytes(40.0, seed=5)     # 2 windows each: 40 windows against room for 6
    before = ray_metrics.scrape()
    n = 20
    barrier = threading.Barrier(n + 1)
    codes: list[int] = []
    retry_after: list[str] = []
    health: list[int] = []
    bodies: list[str] = []
    lock = threading.Lock()

    def one():
        barrier.wait()
        r = post(server, data)
        with lock:
            codes.append(r.status_code)
            if r.status_code == 503:
                retry_after.append(r.headers.get("retry-after"))
                bodies.append(r.text)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    while any(t.is_alive() for t in threads):      # the server answers /health during the burst
        health.append(requests.get(server + "/health", timeout=30).status_code)
    for t in threads:
        t.join()
    assert len(codes) == n and set(codes) <= {200, 503}
    assert codes.count(503) >= 1 and codes.count(200) >= 1
    assert health and set(health) == {200}
    assert all(json.loads(b)["error"]["code"] == "overloaded" for b in bodies), bodies[:3]
    assert retry_after and set(retry_after) == {"1"}
    after = post(server, wav_bytes(1.0))
    assert after.status_code == 200 and "text" in after.json()
    overloaded = codes.count(503)         # every 503 is counted, like any other answer
    k = ray_metrics.key
    grew = ray_metrics.wait_for_increase(before, {k(REQS, route=ROUTE, status=503): overloaded})
    assert grew.get(k(REQS, route=ROUTE, status=503)) == overloaded
    assert grew.get(k(ERRS, status=503)) == overloaded


# ----------------------------------------------------------------------------- config
def test_build_app_validates_config(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        build_app({"model": str(tmp_path), "max_batch_size": 8, "max_ongoing_requests": 4})
    with pytest.raises(ConfigError, match="max_queued_requests"):
        build_app({"model": str(tmp_path), "max_audio_s": 600, "max_queued_requests": 16})
    with pytest.raises(ConfigError, match="unknown config key"):
        build_app({"model": str(tmp_path), "max_batchsize": 8})
    monkeypatch.delenv("ARK_TEST_MODEL", raising=False)
    with pytest.raises(ConfigError, match="ARK_TEST_MODEL"):
        resolve_model_dir("${ARK_TEST_MODEL}/student")
    monkeypatch.setenv("ARK_TEST_MODEL", str(tmp_path))
    assert resolve_model_dir("${ARK_TEST_MODEL}/student") == f"{tmp_path}/student"


def test_sse_shapes():
    t = Transcript(0, 0, [1, 2, 3], "abc", "abc", duration_s=1.0)
    assert json.loads(formats.sse(formats.delta_event("ab"))[6:]) == {"type": "transcript.text.delta", "delta": "ab"}
    done = json.loads(formats.sse(formats.done_event(t, 10))[6:])
    assert done["usage"] == {"type": "tokens", "input_tokens": 10, "output_tokens": 3, "total_tokens": 13}


def test_stream_deltas_hold_back_what_later_tokens_can_change():
    """A partial transcript is shown up to an incomplete character or an unclosed `<` (a marker
    cleanup may still drop), without trailing spaces (cleanup strips them)."""
    assert formats.stable_prefix("hello wor") == "hello wor"
    assert formats.stable_prefix("hello <|te") == "hello"
    assert formats.stable_prefix("caf\ufffd") == "caf"
    assert formats.stable_prefix("a <|x|> b ") == "a <|x|> b"
