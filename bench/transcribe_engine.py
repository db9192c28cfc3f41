"""Engine benchmark: VllmEngine vs HFEngine (the seed's path: batch 40, fp16) in one run.

    python bench/transcribe_engine.py --preset ark-asr-0.6b --seconds 10 30 --clips 160

Real dimensions, random weights (a random model rarely emits EOS, so every clip decodes
max_new_tokens: 35 for 10 s clips, 105 for 30 s, the transcript length of real speech).
Reports audio-seconds per wall-second for each engine and the ratio.
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


def clips(n: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for _ in range(n)]


def timed(engine, audio, sampling) -> float:
    t0 = time.perf_counter()
    engine.transcribe(audio, sampling)
    return sum(len(a) for a in audio) / 16000 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ark-asr-0.6b")
    ap.add_argument("--seconds", type=float, nargs="+", default=[10.0, 30.0])
    ap.add_argument("--clips", type=int, default=160)
    ap.add_argument("--hf_clips", type=int, default=80)
    ap.add_argument("--model_dir", default=None)
    args = ap.parse_args()
    import torch

    from ark_ray.config import EngineConfig, SamplingConfig
    from ark_ray.engines import make_engine
    from ark_ray.model.factory import save_random_model

    model_dir = args.model_dir or tempfile.mkdtemp(prefix="ark-bench-")
    if args.model_dir is None:
        save_random_model(model_dir, args.preset, dtype=torch.bfloat16)
    gpu = torch.cuda.is_available()
    results = []
    vllm = make_engine(model_dir, EngineConfig(backend="vllm", max_num_seqs=256, max_model_len=640))
    for s in args.seconds:
        sp = SamplingConfig(max_new_tokens=int(round(3.5 * s)))
        timed(vllm, clips(8, s, 1), sp)  # warm-up
        results.append({"engine": "vllm", "clip_s": s, "x_real_time": timed(vllm, clips(args.clips, s), sp)})
        print(results[-1], flush=True)
    vllm.close()
    del vllm
    hf = make_engine(model_dir, EngineConfig(backend="hf", dtype="float16" if gpu else "float32", max_num_seqs=40))
    for s in args.seconds:
        sp = SamplingConfig(max_new_tokens=int(round(3.5 * s)))
        timed(hf, clips(4, s, 1), sp)
        results.append({"engine": "hf", "clip_s": s, "x_real_time": timed(hf, clips(args.hf_clips, s), sp)})
        print(results[-1], flush=True)
    for s in args.seconds:
        v = next(r for r in results if r["engine"] == "vllm" and r["clip_s"] == s)["x_real_time"]
        h = next(r for r in results if r["engine"] == "hf" and r["clip_s"] == s)["x_real_time"]
        print(json.dumps({"clip_s": s, "vllm_x_rt": round(v, 1), "hf_x_rt": round(h, 1), "ratio": round(v / h, 2),
                          "device": torch.cuda.get_device_name() if gpu else "cpu"}))


if __name__ == "__main__":
    main()
