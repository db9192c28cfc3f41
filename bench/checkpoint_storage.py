"""Checkpoints through the run folder: seconds and bytes to save (every rank stages its DeepSpeed
files on its node and uploads them) and to resume (every rank downloads its own and loads them),
into a local folder and into S3 (issue 25, shared storage).

    CPU:  python bench/checkpoint_storage.py --model preset:tiny --ranks 2
    GPU:  python bench/checkpoint_storage.py --model /tmp/m06 --ranks 1 --out $OUT/checkpoint_storage.json

`--target local` writes to a temp folder; `--target s3` to a moto S3 server this script starts on
loopback (the real protocol, in-memory: it measures our path, not a cloud link), or to `--s3_uri`
(a real bucket; credentials from the AWS_* environment). Each target: a learner group (ZeRO-2)
takes one OPD step, saves step 1 (`save_s`: all ranks' save + upload, `commit_s`: state file +
`latest`), shuts down; a fresh group then loads it (`load_s`: all ranks' download + load).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def run_target(target: str, uri: str, s3cfg, model_dir: str, batch: dict, ranks: int, gpu: bool) -> dict:
    from ark_ray.config import LearnerConfig
    from ark_ray.data.run_storage import RunStorage
    from ark_ray.opd.loss import OpdLoss
    from ark_ray.train.checkpoints import Checkpoints
    from ark_ray.train.learner import LearnerGroup

    storage = RunStorage(uri, s3cfg)
    ckpts = Checkpoints(storage, keep=1)
    cfg = LearnerConfig(use_gpu=gpu, num_workers=ranks, zero_stage=2, lr=2e-5, num_gpus=1.0 if gpu else 0.0)
    g = LearnerGroup(model_dir, cfg, total_steps=4, loss=OpdLoss(1.0))
    try:
        g.train_step(batch)
        t0 = time.perf_counter()
        saved = g.save_checkpoint(storage, ckpts.begin(1), {"opd_step": 1})
        t1 = time.perf_counter()
        ckpts.commit(1, {"opd_state.json": {"step": 1}})
        t2 = time.perf_counter()
    finally:
        g.shutdown()
    g = LearnerGroup(model_dir, cfg, total_steps=4, loss=OpdLoss(1.0))
    try:
        t3 = time.perf_counter()
        client = g.load_checkpoint(storage, ckpts.dir(ckpts.latest()))
        load_s = time.perf_counter() - t3
    finally:
        g.shutdown()
    assert client["opd_step"] == 1
    size = sum(r["bytes"] for r in saved)
    return {"target": target, "ranks": ranks, "bytes": size, "files": sum(len(r["files"]) for r in saved),
            "save_s": round(t1 - t0, 2), "commit_s": round(t2 - t1, 3), "load_s": round(load_s, 2),
            "save_MBps": round(size / 2**20 / (t1 - t0), 1), "load_MBps": round(size / 2**20 / load_s, 1)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preset:tiny", help="HF-format ARK-ASR dir, or preset:NAME (random, built here)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--target", default="local,s3", help="comma list of local, s3")
    ap.add_argument("--s3_uri", default=None, help="a real s3://bucket/prefix instead of the loopback moto server")
    ap.add_argument("--out", default=None, help="JSON list of the result rows")
    args = ap.parse_args(argv)

    import ray
    import torch

    from bench.learner_memory import opd_batch

    gpu = torch.cuda.is_available()
    model_dir = args.model
    if model_dir.startswith("preset:"):
        from ark_ray.model.factory import save_random_model
        model_dir = tempfile.mkdtemp(prefix="ckpt-bench-")
        save_random_model(model_dir, args.model.split(":", 1)[1], seed=0)
    batch = opd_batch(model_dir, 4 * args.ranks, 2.0, 4.0, 16, 8)
    server, s3cfg, rows = None, None, []
    ray.init(num_gpus=torch.cuda.device_count() if gpu else 0, include_dashboard=False, log_to_driver=False)
    try:
        for target in args.target.split(","):
            if target == "local":
                uri = tempfile.mkdtemp(prefix="ckpt-bench-run-")
            elif args.s3_uri:
                uri = args.s3_uri
            else:
                import boto3
                from moto.server import ThreadedMotoServer

                from ark_ray.config import S3Config
                from ark_ray.net import free_port

                port = free_port()
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
                server.start()
                s3cfg = S3Config(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="bench",
                                 secret_access_key="bench", region="us-east-1")
                boto3.client("s3", endpoint_url=s3cfg.endpoint_url, aws_access_key_id="bench",
                             aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="bench")
                uri = "s3://bench/run"
            rows.append(run_target(target, uri, s3cfg, model_dir, batch, args.ranks, gpu))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"{'target':<7} {'ranks':>5} {'MiB':>8} {'save s':>7} {'commit s':>8} {'load s':>7}")
    for r in rows:
        print(f"{r['target']:<7} {r['ranks']:>5} {r['bytes'] / 2**20:>8.1f} {r['save_s']:>7.2f} "
              f"{r['commit_s']:>8.3f} {r['load_s']:>7.2f}")
    return rows


if __name__ == "__main__":
    main()
