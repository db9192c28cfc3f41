"""Engine benchmark: VllmEngine vs HFEngine (the path of open-audio-opd's inference
script, scripts/infer/ark_asr_transformers.py: HF generate, batch 40, fp16) in one run.

    python bench/transcribe_engine.py --model_dir /tmp/m06 --seconds 10 30 [--clips 512] [--set KEY=VALUE ...]

Real dimensions, random weights (a random model rarely emits EOS, so every clip decodes
max_new_tokens: 35 for 10 s clips, 105 for 30 s, the transcript length of real speech).
Two shapes per clip length: "greedy" (transcription) and "rollout" (temperature 1 and the
top-32 log-probs at every position, what an OPD rollout asks for). Reports audio-seconds per
wall-second for each engine and shape and the vLLM/HF ratio. `--set` takes EngineConfig keys
for the vLLM engine (e.g. max_num_seqs=512 max_num_batched_tokens=32768 encoder_compile=false).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ark_ray.audio import SAMPLE_RATE  # noqa: E402


def clips(n: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32) for _ in range(n)]


SHAPES = ("greedy", "rollout")


def sampling_for(shape: str, seconds: float):
    from ark_ray.config import SamplingConfig

    new = int(round(3.5 * seconds))
    if shape == "rollout":
        return SamplingConfig(max_new_tokens=new, temperature=1.0, logprobs_topk=32, seed=0)
    return SamplingConfig(max_new_tokens=new)


def parse_set(items: list[str]) -> dict:
    out = {}
    for kv in items:
        k, v = kv.split("=", 1)
        low = v.lower()
        out[k] = True if low == "true" else False if low == "false" else int(v) if v.isdigit() else \
            float(v) if v.replace(".", "", 1).isdigit() else v
    return out


def timed(engine, audio, sampling) -> float:
    t0 = time.perf_counter()
    engine.transcribe(audio, sampling)
    return sum(len(a) for a in audio) / SAMPLE_RATE / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ark-asr-0.6b")
    ap.add_argument("--seconds", type=float, nargs="+", default=[10.0, 30.0])
    ap.add_argument("--clips", type=int, default=512)
    ap.add_argument("--hf_clips", type=int, default=80)
    ap.add_argument("--model_dir", default=None)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="EngineConfig overrides (vLLM)")
    ap.add_argument("--skip_hf", action="store_true")
    args = ap.parse_args()
    import torch

    from ark_ray.config import EngineConfig
    from ark_ray.engines import make_engine
    from ark_ray.model.factory import save_random_model

    model_dir = args.model_dir or tempfile.mkdtemp(prefix="ark-bench-")
    if args.model_dir is None:
        save_random_model(model_dir, args.preset, dtype=torch.bfloat16)
    gpu = torch.cuda.is_available()
    results = []
    over = {"max_num_seqs": 256, "max_model_len": 640, **parse_set(args.set)}
    vllm = make_engine(model_dir, EngineConfig(backend="vllm", **over))
    for s in args.seconds:
        for shape in args.shapes:
            sp = sampling_for(shape, s)
            timed(vllm, clips(8, s, 1), sp)  # warm-up
            results.append({"engine": "vllm", "shape": shape, "clip_s": s,
                            "x_real_time": timed(vllm, clips(args.clips, s), sp)})
            print(results[-1], flush=True)
    vllm.close()
    del vllm
    if not args.skip_hf:
        hf = make_engine(model_dir, EngineConfig(backend="hf", dtype="float16" if gpu else "float32", max_num_seqs=40))
        for s in args.seconds:
            for shape in args.shapes:
                sp = sampling_for(shape, s)
                timed(hf, clips(4, s, 1), sp)
                results.append({"engine": "hf", "shape": shape, "clip_s": s,
                                "x_real_time": timed(hf, clips(args.hf_clips, s), sp)})
                print(results[-1], flush=True)
    for s in args.seconds:
        for shape in args.shapes:
            pick = lambda e: next((r["x_real_time"] for r in results  # noqa: E731
                                   if r["engine"] == e and r["clip_s"] == s and r["shape"] == shape), None)
            v, h = pick("vllm"), pick("hf")
            print(json.dumps({"clip_s": s, "shape": shape, "vllm_x_rt": round(v, 1),
                              "hf_x_rt": round(h, 1) if h else None, "ratio": round(v / h, 2) if h else None,
                              "vllm_settings": over, "device": torch.cuda.get_device_name() if gpu else "cpu"}))


if __name__ == "__main__":
    main()
