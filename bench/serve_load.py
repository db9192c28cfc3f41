"""Load test: our Ray Serve endpoint vs `vllm serve`'s own /v1/audio/transcriptions, same model, same run.

For each server, a 10 s clip is posted by 1, 8 and 64 concurrent clients (closed loop: each client
sends its next request when the previous answer arrives); we report p50/p99 latency and
requests/s, then throughput at saturation (the highest concurrency). The servers run one after
the other on the same GPU, with the same weights, greedy decoding and the same token limit.

    # on a GPU node (real dimensions, random weights unless --model-dir is given):
    python bench/serve_load.py --preset ark-asr-0.6b --out bench/results/serve_load.json
    # CPU smoke run (tiny model, HF engine, no vLLM baseline):
    python bench/serve_load.py --preset tiny --backend hf --no-vllm-baseline --concurrency 1,4 --requests 8

Targets (issue 7): Serve throughput >= 0.9x vLLM's; p50 < 150 ms at 1 client.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import pathlib
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ark_ray.audio import SAMPLE_RATE, load_audio  # noqa: E402


def make_clip(seconds: float) -> bytes:
    """`seconds` of the bundled demo speech (test split, concatenated) as 16 kHz WAV bytes."""
    corpus = REPO / "assets" / "demo_corpus"
    waves, total = [], 0
    for line in (corpus / "test.jsonl").read_text().splitlines():
        wave = load_audio(corpus / json.loads(line)["audio"])
        waves.append(wave)
        total += len(wave)
        if total >= seconds * SAMPLE_RATE:
            break
    wave = np.concatenate(waves)[: int(seconds * SAMPLE_RATE)]
    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def closed_loop(url: str, model: str, clip: bytes, concurrency: int, requests: int,
                      headers: dict, max_tokens: int) -> dict:
    """`concurrency` clients share `requests` posts; latency of each successful one."""
    import httpx

    lat: list[float] = []
    errors: dict[str, int] = {}
    left = requests
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 8)) as client:
        async def worker():
            nonlocal left
            while left > 0:
                left -= 1
                t0 = time.perf_counter()
                r = await client.post(url, headers=headers, files={"file": ("clip.wav", clip, "audio/wav")},
                                      data={"model": model, "response_format": "json", "temperature": "0",
                                            "max_completion_tokens": str(max_tokens)})
                dt = time.perf_counter() - t0
                if r.status_code == 200:
                    lat.append(dt)
                else:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    a = np.array(lat) if lat else np.array([np.nan])
    return {"concurrency": concurrency, "requests": requests, "ok": len(lat), "errors": errors,
            "p50_ms": float(np.percentile(a, 50) * 1000), "p99_ms": float(np.percentile(a, 99) * 1000),
            "req_per_s": len(lat) / wall, "wall_s": wall}


def wait_healthy(url: str, timeout_s: float) -> None:
    import httpx

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def run_levels(name: str, base: str, args, clip: bytes, headers: dict) -> list[dict]:
    url = base + "/v1/audio/transcriptions"
    asyncio.run(closed_loop(url, args.model_name, clip, 2, 4, headers, args.max_new_tokens))  # warm-up
    rows = []
    for c in args.levels:
        n = max(args.requests, 4 * c)
        row = asyncio.run(closed_loop(url, args.model_name, clip, c, n, headers, args.max_new_tokens))
        row["server"] = name
        rows.append(row)
        print(json.dumps(row), flush=True)
    sat = asyncio.run(closed_loop(url, args.model_name, clip, args.saturation, max(args.requests, 4 * args.saturation),
                                  headers, args.max_new_tokens))
    sat.update(server=name, saturation=True, audio_s_per_s=sat["req_per_s"] * args.clip_s)
    rows.append(sat)
    print(json.dumps(sat), flush=True)
    return rows


def bench_vllm(args, model_dir: str, clip: bytes) -> list[dict]:
    from ark_ray.vllm_plugin.server import vllm_openai_server

    extra = ["--served-model-name", args.model_name, "--max-model-len", "1024",
             "--max-num-seqs", str(args.max_num_seqs), "--dtype", "bfloat16" if args.gpu else "auto"]
    if args.gpu:
        extra += ["--gpu-memory-utilization", "0.85"]
    with vllm_openai_server(model_dir, args.vllm_port, extra, timeout_s=900) as server:
        return run_levels("vllm serve", server.url, args, clip, {})


def bench_serve(args, model_dir: str, clip: bytes) -> list[dict]:
    import ray
    from ray import serve

    from ark_ray.serve import build_app

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.serve_port})
        gpu = args.gpu
        serve.run(build_app({
            "model_dir": model_dir, "model_name": args.model_name, "max_new_tokens": args.max_new_tokens,
            "engine": {"backend": args.backend, "num_gpus": 1 if gpu else 0, "num_cpus": 1,
                       "max_num_seqs": args.max_num_seqs, "dtype": "bfloat16" if gpu else "auto"},
            "max_batch_size": args.max_num_seqs, "max_ongoing_requests": 2 * args.max_num_seqs,
            "max_queued_requests": -1, "batch_wait_timeout_s": args.batch_wait_s, "api_key_env": None,
        }), name="bench", route_prefix="/")
        base = f"http://127.0.0.1:{args.serve_port}"
        wait_healthy(base + "/health", 600)
        return run_levels("ray serve (ark_ray.serve)", base, args, clip, {})
    finally:
        serve.shutdown()
        ray.shutdown()


def markdown(rows: list[dict], args, device: str) -> str:
    lines = [f"Device: {device}; model: {args.preset if not args.model_dir else args.model_dir}; "
             f"clip {args.clip_s:g} s; greedy, max {args.max_new_tokens} tokens.", "",
             "| server | clients | p50 ms | p99 ms | req/s | errors |", "|---|---|---|---|---|---|"]
    for r in rows:
        c = f"{r['concurrency']} (saturation)" if r.get("saturation") else str(r["concurrency"])
        lines.append(f"| {r['server']} | {c} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['req_per_s']:.2f} | "
                     f"{sum(r['errors'].values())} |")
    sat = {r["server"]: r["req_per_s"] for r in rows if r.get("saturation")}
    if len(sat) == 2:
        ours, theirs = sat["ray serve (ark_ray.serve)"], sat["vllm serve"]
        lines += ["", f"Saturation throughput ratio (Serve / vLLM): {ours / theirs:.2f}x"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="HF-format ARK-ASR directory (default: random weights of --preset)")
    p.add_argument("--preset", default="ark-asr-0.6b", help="preset for the random model (tiny, ark-asr-0.6b)")
    p.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="engine of the Serve replicas")
    p.add_argument("--model-name", default="ark-asr")
    p.add_argument("--clip-s", type=float, default=10.0)
    p.add_argument("--concurrency", default="1,8,64", help="comma-separated client counts")
    p.add_argument("--saturation", type=int, default=128, help="clients for the saturation run")
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least 4 per client)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--batch-wait-s", type=float, default=0.005)
    p.add_argument("--serve-port", type=int, default=18100)
    p.add_argument("--vllm-port", type=int, default=18200)
    p.add_argument("--no-vllm-baseline", action="store_true", help="skip `vllm serve` (e.g. on CPU)")
    p.add_argument("--out", help="write all rows as JSON here")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.concurrency.split(",") if x]

    import torch

    args.gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if args.gpu else "CPU"
    model_dir = args.model_dir
    if model_dir is None:
        from ark_ray.model.factory import save_random_model
        model_dir = tempfile.mkdtemp(prefix="serve-bench-")
        save_random_model(model_dir, args.preset, dtype=torch.bfloat16 if args.preset != "tiny" else torch.float32)
    clip = make_clip(args.clip_s)
    rows = []
    if not args.no_vllm_baseline:
        rows += bench_vllm(args, model_dir, clip)
    rows += bench_serve(args, model_dir, clip)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    print(markdown(rows, args, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
