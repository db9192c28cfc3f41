"""What a promotion's rollout and a lost replica cost under load, with real engines.

Deploys serve_configs/gpu.yaml (CPU: local.yaml) through the Serve controller with model A (a
random init of --preset unless --model-dir), one ArkTranscriber replica per GPU; closed-loop
clients post a 10 s clip throughout (each sends its next request when its answer arrives). After
--steady-s, the application is rolled onto model B (another random init) with jobs/promote.py's
rollout (serve/promote.py `roll_out`: `args.model` changes, Serve starts the new replicas before it
stops old ones, the old ones drain), and the run waits until every answer names B in its
X-Ark-Model-Version header. With --kill, one replica actor is then killed (`ray.kill`: its calls
fail as when its node vanishes) and the run waits until Serve has replaced it. Per phase (steady,
rollout, kill): requests, non-2xx, p50/p99 latency, the longest gap between two answers; and how
long the rollout took. The surge replica needs a free GPU: N replicas need N + 1 GPUs.

    # 2 GPUs (nvidia-h100-x2): one replica, rolled out with one surge replica, ~6 min
    python bench/serve_rollout.py --out-dir $OUT/serve_rollout 2>&1 | tee $OUT/serve_rollout.log
    # 4 GPUs (nvidia-h100-x4): two replicas rolled out, then one killed
    python bench/serve_rollout.py --replicas 2 --kill --out-dir $OUT/serve_rollout_x4
    # CPU smoke run (tiny random models, HF engines):
    python bench/serve_rollout.py --preset tiny --backend hf --clients 2 --steady-s 10
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import threading
import time

import numpy as np
import requests

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_load import make_clips, save_ray_logs  # noqa: E402

APP, MODEL = "bench-rollout", "ark-asr"


class Clients:
    """`n` closed-loop clients; every answer is (start, end, status, version header)."""

    def __init__(self, url: str, clips: list[bytes], n: int, max_new_tokens: int):
        self.url, self.clips, self.max_new = url, clips, max_new_tokens
        self.records: list[tuple] = []
        self.errors: list[str] = []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(n)]

    def _loop(self, i: int) -> None:
        k = i
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                r = requests.post(self.url + "/v1/audio/transcriptions", timeout=600,
                                  files={"file": ("clip.wav", self.clips[k % len(self.clips)], "audio/wav")},
                                  data={"model": MODEL, "max_completion_tokens": str(self.max_new)})
                rec = (t0, time.monotonic(), r.status_code, r.headers.get("x-ark-model-version"))
                if r.status_code != 200:
                    with self.lock:
                        self.errors.append(f"{r.status_code}: {r.text[:300]}")
            except requests.RequestException as e:
                rec = (t0, time.monotonic(), 0, None)
                with self.lock:
                    self.errors.append(f"transport: {e!r}"[:300])
            with self.lock:
                self.records.append(rec)
            k += len(self.threads)

    def start(self) -> "Clients":
        for t in self.threads:
            t.start()
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=600)

    def answers_since(self, t: float) -> list[tuple]:
        with self.lock:
            return [r for r in self.records if r[1] >= t]


def phase(records: list[tuple], t0: float, t1: float) -> dict:
    """Figures of the requests that ended in [t0, t1)."""
    rs = sorted(r for r in records if t0 <= r[1] < t1)
    if not rs:
        return {"requests": 0}
    lat = np.array([r[1] - r[0] for r in rs])
    ends = sorted(r[1] for r in rs)
    return {"requests": len(rs), "non_2xx": sum(r[2] != 200 for r in rs),
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p99_s": round(float(np.percentile(lat, 99)), 3),
            "max_s": round(float(lat.max()), 3),
            "longest_gap_s": round(max([b - a for a, b in zip(ends, ends[1:])] or [0.0]), 3),
            "versions": sorted({str(r[3]) for r in rs})}


def serve_config(args, model_dir: str) -> dict:
    import yaml

    cfg = yaml.safe_load(pathlib.Path(args.config).read_text())
    cfg["http_options"].update(host="127.0.0.1", port=args.port)
    cfg["proxy_location"] = "HeadOnly"
    (app,) = cfg["applications"]
    app.update(name=APP, route_prefix="/")
    a = app["args"]
    a.update(model=model_dir, model_version="A", model_name=MODEL, max_new_tokens=args.max_new_tokens,
             api_key_env=None)
    if args.backend:
        a["engine"]["backend"] = args.backend
    a["max_queued_requests"] = -1
    for d in app["deployments"]:           # fixed counts: the bench measures the rollout, not autoscaling
        d.pop("autoscaling_config", None)
        d["num_replicas"] = args.replicas if d["name"] == "ArkTranscriber" else 1
    return cfg


def wait(what: str, check, timeout_s: float) -> float:
    t0 = time.monotonic()
    print(f"waiting for {what} ...", flush=True)
    while not check():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="model A (default: a random init of --preset)")
    p.add_argument("--preset", default="ark-asr-0.6b")
    p.add_argument("--config", help="Serve config (default: serve_configs/gpu.yaml on GPU, local.yaml on CPU)")
    p.add_argument("--backend", choices=["vllm", "hf"], help="engine backend (default: the config's)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--steady-s", type=float, default=60.0, help="load before the rollout (and after the kill)")
    p.add_argument("--kill", action="store_true", help="after the rollout, kill one replica actor")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=18300)
    p.add_argument("--timeout-s", type=float, default=1200)
    p.add_argument("--out-dir", default=os.environ.get("OUT", "bench/results") + "/serve_rollout")
    args = p.parse_args(argv)

    import ray
    import torch
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    from ark_ray.config import PromoteConfig
    from ark_ray.model.factory import save_random_model
    from ark_ray.serve import control
    from ark_ray.serve.promote import Model, roll_out

    gpu = torch.cuda.is_available()
    args.config = args.config or str(REPO / "serve_configs" / ("gpu.yaml" if gpu else "local.yaml"))
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if gpu else "CPU"
    dtype = torch.bfloat16 if args.preset != "tiny" else torch.float32
    dirs = {}
    for name, seed in (("A", 0), ("B", 1)):
        if name == "A" and args.model_dir:
            dirs[name] = os.path.abspath(args.model_dir)
            continue
        d = tempfile.mkdtemp(prefix=f"rollout-{name}-")
        save_random_model(d, args.preset, dtype=dtype, seed=seed)
        dirs[name] = d
    clips = make_clips(10.0, 16)
    # CPU: logical CPUs oversubscribed (as the tests do) so that the replicas, the ingress and the
    # rollout's surge replica fit a small box (local.yaml asks 1 CPU a replica); GPU: the node's own
    cpus = {} if gpu else {"num_cpus": max(8, os.cpu_count() or 1)}
    ray.init(address="local", include_dashboard=False, log_to_driver=False, **cpus)
    result: dict = {"device": device, "replicas": args.replicas, "clients": args.clients}
    clients = None
    try:
        schema = ServeDeploySchema.model_validate(serve_config(args, dirs["A"]))
        client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=schema.proxy_location)
        client.deploy_apps(schema, _blocking=False)
        result["deploy_s"] = wait("the application", lambda: control.status(APP)[0] == "RUNNING", args.timeout_s)
        url = f"http://127.0.0.1:{args.port}"
        clients = Clients(url, clips, args.clients, args.max_new_tokens).start()
        t_steady = time.monotonic()
        time.sleep(args.steady_s)
        t_roll = time.monotonic()
        cfg = PromoteConfig(timeout_s=args.timeout_s, app=APP)
        result["rollout_s"] = round(roll_out(APP, control.app_config(APP), Model(dirs["B"], "B"), cfg, print), 1)
        wait("answers from B only", lambda: (lambda rs: len(rs) >= args.clients and all(r[3] == "B" for r in rs))(
            clients.answers_since(time.monotonic() - 5)), args.timeout_s)
        t_rolled = time.monotonic()
        phases = {"steady": (t_steady, t_roll), "rollout": (t_roll, t_rolled)}
        if args.kill:
            (replica, *_) = control.details().applications[APP].deployments["ArkTranscriber"].replicas
            ray.kill(ray.get_actor(replica.actor_name, namespace="serve"), no_restart=True)
            print(f"killed replica {replica.replica_id}")
            result["replaced_s"] = round(wait("a replacement replica", lambda: sum(
                r.state == "RUNNING" for r in control.details().applications[APP].deployments["ArkTranscriber"].replicas)
                == args.replicas and replica.replica_id not in [
                r.replica_id for r in control.details().applications[APP].deployments["ArkTranscriber"].replicas],
                args.timeout_s), 1)
            time.sleep(args.steady_s / 2)
            phases["kill"] = (t_rolled, time.monotonic())
        clients.close()
        result["phases"] = {k: phase(clients.records, a, b) for k, (a, b) in phases.items()}
        result["errors"] = clients.errors[:10]
    finally:
        if clients is not None:
            clients.close()
        save_ray_logs(out / "ray_logs")
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        (out / "serve_rollout.json").write_text(json.dumps(result, indent=1))
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
