"""The page at / in headless Chromium (Debian's `chromium`, driven over the DevTools protocol):
pick a file, press Transcribe, read the transcript; and a bad file shows the server's reason."""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import time

import numpy as np
import pytest
import requests
import soundfile as sf

from ark_ray.model.factory import save_random_model
from ark_ray.net import free_port
from ark_ray.serve import build_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; scripts/setup.sh does it)")

MODEL = "ark-asr-page"
DEADLINE_S = 120  # an upper bound for a stuck browser, not a timing assertion


class Cdp:
    """A minimal Chrome DevTools Protocol client for one page (websocket-client)."""

    def __init__(self, ws_url: str):
        import websocket
        self.ws = websocket.create_connection(ws_url, timeout=DEADLINE_S, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res["result"].get("value")

    def wait_for(self, expression: str):
        """Poll a JS expression until it is truthy (a condition, bounded by DEADLINE_S)."""
        end = time.monotonic() + DEADLINE_S
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expression!r}")

    def close(self):
        self.ws.close()


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory, stop_serve):
    from ray import serve

    d = tmp_path_factory.mktemp("page_tiny")
    save_random_model(d, "tiny", initializer_range=0.2, seed=5)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": str(d), "model_name": MODEL, "max_new_tokens": 10, "api_key_env": None,
                         "engine": {"backend": "hf", "num_cpus": 1}, "max_batch_size": 4,
                         "max_ongoing_requests": 4}), name="ark-page", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    stop_serve()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = pathlib.Path(profile) / "DevToolsActivePort"
        end = time.monotonic() + DEADLINE_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > end:
                pytest.fail(f"chromium did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        devtools = int(port_file.read_text().split()[0])
        targets = requests.get(f"http://127.0.0.1:{devtools}/json/list", timeout=30).json()
        cdp = Cdp(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=server + "/")
        cdp.wait_for("document.readyState === 'complete' && !!document.getElementById('go')")
        yield cdp
        cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def upload_and_submit(cdp: Cdp, path: pathlib.Path, fmt: str = "json") -> tuple[str, str]:
    doc = cdp.call("DOM.getDocument")["root"]["nodeId"]
    node = cdp.call("DOM.querySelector", nodeId=doc, selector="#file")["nodeId"]
    cdp.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)
    cdp.js(f"document.getElementById('format').value = {json.dumps(fmt)}; "
           "document.getElementById('status').textContent = 'idle'; document.getElementById('go').click()")
    status = cdp.wait_for("(s => s === 'done' || s.startsWith('error') ? s : '')"
                          "(document.getElementById('status').textContent)")
    return status, cdp.js("document.getElementById('out').textContent")


def test_page_transcribes_an_upload(server, page, tmp_path):
    rng = np.random.default_rng(0)
    wav = tmp_path / "hello.wav"
    sf.write(wav, (0.1 * rng.standard_normal(32000)).astype(np.float32), 16000)
    expected = requests.post(server + "/v1/audio/transcriptions", data={"model": MODEL},
                             files={"file": ("hello.wav", wav.read_bytes(), "audio/wav")}, timeout=120).json()
    status, text = upload_and_submit(page, wav)
    assert status == "done" and text == expected["text"]
    status, vtt = upload_and_submit(page, wav, fmt="vtt")
    assert status == "done" and vtt.startswith("WEBVTT")


def test_page_shows_the_servers_reason_for_a_bad_file(page, tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_bytes(b"definitely not audio" * 50)
    status, text = upload_and_submit(page, bad)
    assert status == "error 400" and "unreadable" in text
    assert page.js("document.getElementById('out').className") == "error"


def test_page_is_served_at_root(server):
    r = requests.get(server + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert MODEL in r.text and 'id="file"' in r.text
    assert r.text.count("<script") == 1 and "src=" not in r.text  # self-contained: works offline
