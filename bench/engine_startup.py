"""Where vLLM engine start-up goes, and what each start-up setting costs in throughput.

    python bench/engine_startup.py --model_dir /tmp/m06 --variants default eager \
        --out $OUT/startup.json

Each variant runs in a fresh subprocess with its own empty vLLM / torch.compile / FlashInfer
cache folders (a fresh autoscaled node's first start), the engine core in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that a sampler thread sees its Python stack: every
0.2 s the main thread's innermost vLLM / torch / FlashInfer / ark_ray frames are counted, and
the top ones are reported in seconds. After start-up the variant transcribes `--clips` clips
of the batch benchmark's corpus (4-26 s, 48 new tokens, greedy) once, for its x real time.

Variants (VARIANTS below): `default` (what VllmEngine builds today), `no_fi_sampler`
(`VLLM_USE_FLASHINFER_SAMPLER=0`), `eager` (no torch.compile, no CUDA graphs), and
`graphs_no_compile` (CUDA graphs of the whole decode step, no torch.compile); `--set` adds
EngineConfig keys to every variant.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: name -> (environment, EngineConfig keys)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "no_fi_sampler": ({"VLLM_USE_FLASHINFER_SAMPLER": "0"}, {}),
    "eager": ({}, {"enforce_eager": True}),
    "graphs_no_compile": ({}, {"compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}),
    "no_fi_graphs_no_compile": ({"VLLM_USE_FLASHINFER_SAMPLER": "0"},
                                {"compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}),
}
KEEP = ("vllm/", "flashinfer", "torch/_inductor", "torch/_dynamo", "ark_ray/", "triton/", "transformers/")


class StackSampler:
    """Counts the main thread's innermost interesting frames every `every` seconds."""

    def __init__(self, every: float = 0.2):
        self.every, self.counts, self.timeline = every, collections.Counter(), []
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._t0 = time.perf_counter()

    def _sample(self) -> str:
        frame = sys._current_frames().get(self._main)
        names = []
        while frame is not None and len(names) < 3:
            path = frame.f_code.co_filename
            hit = next((k for k in KEEP if k in path), None)
            if hit:
                short = path[path.index(hit):]
                names.append(f"{short}:{frame.f_code.co_name}")
            frame = frame.f_back
        return " < ".join(names) or "(other)"

    def _run(self):
        last = None
        while not self._stop.wait(self.every):
            sig = self._sample()
            self.counts[sig] += 1
            top = sig.split(" < ")[0]
            if top != last:
                self.timeline.append((round(time.perf_counter() - self._t0, 1), top))
                last = top

    def __enter__(self):
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def top(self, n: int = 15) -> list[tuple[str, float]]:
        return [(sig, round(c * self.every, 1)) for sig, c in self.counts.most_common(n)]


def child(args) -> dict:
    """One variant in this (fresh) process: build, sample the stack, then transcribe once."""
    import numpy as np

    from ark_ray.audio import SAMPLE_RATE, load_audio
    from ark_ray.config import EngineConfig, SamplingConfig

    t0 = time.perf_counter()
    import vllm  # noqa: F401 - timed on its own

    import_s = time.perf_counter() - t0
    from ark_ray.engines.vllm_engine import VllmEngine

    keys = json.loads(args.engine_json)
    cfg = EngineConfig(backend="vllm", num_gpus=1, max_num_seqs=args.max_num_seqs, max_model_len=640, **keys)
    with StackSampler() as sampler:
        t1 = time.perf_counter()
        engine = VllmEngine(args.model_dir, cfg)
        build_s = time.perf_counter() - t1
    files = sorted(pathlib.Path(args.corpus).glob("*.flac"))[:args.clips]
    waves = [load_audio(str(f)) for f in files]
    sampling = SamplingConfig(max_new_tokens=48)
    t2 = time.perf_counter()
    engine.transcribe(waves[:8], sampling)
    first_s = time.perf_counter() - t2
    from bench.batch_transcribe import GpuSampler

    with GpuSampler() as gpu:
        t3 = time.perf_counter()
        engine.transcribe(waves, sampling)
        t4 = time.perf_counter()
    run_s = t4 - t3
    busy = gpu.busy(t3, t4)
    audio_s = sum(len(w) for w in waves) / SAMPLE_RATE
    engine.close()
    return {"import_vllm_s": round(import_s, 1), "build_s": round(build_s, 1), "first_call_s": round(first_s, 2),
            "x_rt": round(audio_s / run_s, 1), "clips": len(waves), "audio_s": round(audio_s, 1),
            "run_s": round(run_s, 2), "gpu_busy_pct": None if busy is None else round(busy, 1), "top_frames": sampler.top(), "timeline": sampler.timeline[-60:],
            "startup_x_rt_10h": round(36000 / (build_s + import_s + 36000 / (audio_s / run_s)), 1)}


def run_variant(name: str, args) -> dict:
    env_extra, keys = VARIANTS[name]
    keys = {**keys, **dict(kv.split("=", 1) for kv in args.set)}
    keys = {k: _value(v) for k, v in keys.items()}
    cache = tempfile.mkdtemp(prefix=f"ark-startup-{name}-")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CACHE_ROOT=f"{cache}/vllm",
               TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor", TRITON_CACHE_DIR=f"{cache}/triton",
               FLASHINFER_WORKSPACE_BASE=cache, XDG_CACHE_HOME=f"{cache}/xdg", **env_extra)
    cmd = [sys.executable, __file__, "--child", "--model_dir", args.model_dir, "--corpus", args.corpus,
           "--clips", str(args.clips), "--max_num_seqs", str(args.max_num_seqs), "--engine_json", json.dumps(keys)]
    t = time.perf_counter()
    log = pathlib.Path(args.log_dir, f"startup_{name}.log")
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=fh, text=True)
    out = {"variant": name, "env": env_extra, "engine": keys, "wall_s": round(time.perf_counter() - t, 1),
           "log": str(log)}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("STARTUP_JSON ")), None)
    if proc.returncode or line is None:
        out["error"] = f"rc={proc.returncode}: " + log.read_text()[-1500:]
    else:
        out.update(json.loads(line[len("STARTUP_JSON "):]))
    return out


def _value(v):
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--variants", nargs="+", default=["default", "eager"], choices=sorted(VARIANTS))
    ap.add_argument("--set", nargs="*", default=[], help="EngineConfig KEY=VALUE for every variant")
    ap.add_argument("--clips", type=int, default=1024)
    ap.add_argument("--max_num_seqs", type=int, default=512)
    ap.add_argument("--corpus", default="/tmp/ark-bench-startup/audio")
    ap.add_argument("--log_dir", default=os.environ.get("OUT", "."))
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine_json", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("STARTUP_JSON " + json.dumps(child(args)), flush=True)
        return []
    from bench.batch_transcribe import make_corpus

    make_corpus(pathlib.Path(args.corpus), files=args.clips, hours=None, min_s=4.0, max_s=26.0)
    results = []
    for name in args.variants:
        r = run_variant(name, args)
        results.append(r)
        brief = {k: r.get(k) for k in ("variant", "import_vllm_s", "build_s", "first_call_s", "x_rt", "gpu_busy_pct",
                                        "startup_x_rt_10h", "error")}
        print("VARIANT " + json.dumps(brief), flush=True)
        for sig, s in r.get("top_frames", [])[:8]:
            print(f"   {s:6.1f} s  {sig}", flush=True)
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
