#!/usr/bin/env bash
# One device call after the kit install (../shared/device): install this repo into the kit's site
# dir (so vLLM finds our plugin's entry point) and build the real-dims random ARK-ASR student and
# teacher once per lease under /tmp/ark (bf16, vocab 163958, the tiny tokenizer). /tmp/m06 points
# at the student (the engine, serve and batch benchmarks' --model_dir).
#   source bench/gpu_env.sh && bash bench/gpu_setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation --no-index --no-compile --target /tmp/site . 2>&1 | tail -2
python3 - <<'PY'
import pathlib, time
from bench.opd_throughput import ensure_models
t = time.perf_counter()
root = pathlib.Path("/tmp/ark/models-ark-asr-0.6b")
ensure_models(root / "student", root / "teacher", "ark-asr-0.6b", True, {})
print(f"models ready in {time.perf_counter() - t:.0f} s")
PY
ln -sfn /tmp/ark/models-ark-asr-0.6b/student /tmp/m06
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
