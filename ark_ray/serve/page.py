"""The page at `/`: pick an audio file, get its transcript, using the same public API as any client.

Self-contained HTML (no external scripts or styles), so it works on an offline cluster.
"""
from __future__ import annotations

import html
import json

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ARK-ASR transcription</title>
<style>
 body {{ font-family: system-ui, sans-serif; max-width: 48rem; margin: 2rem auto; padding: 0 1rem; }}
 label {{ display: block; margin: .6rem 0; }}
 pre {{ white-space: pre-wrap; background: #f4f4f4; padding: 1rem; min-height: 3rem; }}
 .error {{ color: #a00; }}
</style>
</head>
<body>
<h1>ARK-ASR transcription</h1>
<p>Model <code id="model">{model}</code>. Upload an audio file (wav, flac, ogg, mp3).</p>
<form id="form">
 <label>Audio file <input type="file" id="file" name="file" accept="audio/*" required></label>
 <label>Format
  <select id="format" name="response_format">
   <option value="json">text (json)</option><option value="verbose_json">verbose_json</option>
   <option value="srt">srt</option><option value="vtt">vtt</option>
  </select>
 </label>
 <label {key_hidden}>API key <input type="password" id="key" autocomplete="off"></label>
 <button type="submit" id="go">Transcribe</button>
</form>
<p id="status" role="status">idle</p>
<pre id="out"></pre>
<script>
const model = {model_js}, base = {base_js};
document.getElementById("form").addEventListener("submit", async (ev) => {{
  ev.preventDefault();
  const file = document.getElementById("file").files[0];
  const fmt = document.getElementById("format").value;
  const status = document.getElementById("status"), out = document.getElementById("out");
  if (!file) {{ status.textContent = "choose a file first"; return; }}
  const body = new FormData();
  body.append("file", file);
  body.append("model", model);
  body.append("response_format", fmt);
  const headers = {{}};
  const key = document.getElementById("key").value;
  if (key) headers["Authorization"] = "Bearer " + key;
  status.textContent = "transcribing…"; out.textContent = ""; out.className = "";
  try {{
    const r = await fetch(base + "/v1/audio/transcriptions", {{ method: "POST", body, headers }});
    const raw = await r.text();
    if (!r.ok) {{
      let msg = raw;
      try {{ msg = JSON.parse(raw).error.message; }} catch (e) {{}}
      out.className = "error"; out.textContent = msg; status.textContent = "error " + r.status;
      return;
    }}
    out.textContent = fmt === "json" ? JSON.parse(raw).text
                    : fmt === "verbose_json" ? JSON.stringify(JSON.parse(raw), null, 2) : raw;
    status.textContent = "done";
  }} catch (e) {{
    out.className = "error"; out.textContent = String(e); status.textContent = "error";
  }}
}});
</script>
</body>
</html>
"""


def render_page(model_name: str, needs_key: bool = False, base: str = "") -> str:
    """The page; `base` is the app's route prefix (Serve's root_path), so the form posts to this app."""
    js = lambda v: json.dumps(v).replace("<", "\\u003c")  # noqa: E731 - safe inside <script>
    return _PAGE.format(model=html.escape(model_name), model_js=js(model_name), base_js=js(base.rstrip("/")),
                        key_hidden="" if needs_key else "hidden")
