"""OPD's object-store bytes and driver memory, step by step, on a 20 000-clip manifest.

    python bench/opd_object_store.py [--clips 20000] [--steps 40] [--batch 32] [--window_mb 16] \
        [--label after] [--out runs/opd_object_store.jsonl]

Issue 25's target: once the input's first window fills, the object store and the driver's RSS stay
flat (the mean of the last 5 steps within 1.2x of steps 6-10) however many clips go by; the
controller before Ray Data input (AudioStore: every decoded clip pinned for the whole run) grew
with every clip used. To measure that one, run this same script with PYTHONPATH on a checkout of
the commit before (3ff974d) and `--label before`: it only uses what both controllers have.

The manifest: `--clips` one-second segments, 20 distinct ones per file, of the demo's unlabelled
audio (demo://unlabelled, made on first use), so it costs seconds to write and Ray Data decodes
every clip from disk. A tiny random student and teacher, the rollout engine on HF (`--engine`),
no evaluation, no checkpoint until the end. After every learner step: the cluster's plasma bytes
in use and object count (the raylet's store stats, Ray's `memory_summary` numbers, exact bytes)
and the driver's RSS. Prints a table and the ratios; appends one JSON line to `--out`. Joins
$RAY_ADDRESS when set, else starts a local Ray with `--cpus`. Rows: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))   # after $PYTHONPATH: the "before" run points it at an older checkout


def make_manifest(path: pathlib.Path, clips: int, per_file: int = 20) -> pathlib.Path:
    from ark_ray.data.manifest import read_manifest
    from ark_ray.demo import unlabelled

    src = read_manifest(unlabelled.resolve("demo://unlabelled"), text_field=None)
    rows = []
    for i in range(clips):
        r = src[(i // per_file) % len(src)]
        begin = 0.01 * (i % per_file)
        rows.append({"id": f"{r['id']}@{i}", "audio": r["audio"], "begin_time": round(begin, 3),
                     "end_time": round(begin + 1.0, 3), "language": "en"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rss_mb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=20000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--window_mb", type=float, default=16.0, help="input.window_mb (the new input path only)")
    p.add_argument("--engine", default="hf", help="rollout engine backend (hf | vllm)")
    p.add_argument("--cpus", type=int, default=6, help="local Ray's CPUs (when $RAY_ADDRESS is unset)")
    p.add_argument("--label", default="after")
    p.add_argument("--workdir", default=str(REPO / "runs/bench_opd_object_store"))
    p.add_argument("--out", default=str(REPO / "runs/opd_object_store.jsonl"))
    a = p.parse_args(argv)

    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    from ark_ray.config import OpdConfig, RayConfig, load_config
    from ark_ray.model.factory import make_tokenizer, save_random_model
    from ark_ray.opd.controller import OpdController
    from ark_ray.runtime import init_ray

    work = pathlib.Path(a.workdir)
    manifest = make_manifest(work / f"manifest_{a.clips}.jsonl", a.clips)
    models = work / "models"
    if not (models / "teacher" / "config.json").exists():
        tok = make_tokenizer("tiny")
        save_random_model(models / "teacher", "tiny", tokenizer=tok, seed=1, initializer_range=0.2)
        save_random_model(models / "student", "tiny", tokenizer=tok, seed=2, initializer_range=0.2)
    over = {"student": str(models / "student"), "teacher": str(models / "teacher"),
            "output_dir": str(work / f"run_{a.label}_{int(time.time())}"), "train_manifest": str(manifest),
            "eval_manifest": None, "steps": a.steps, "rollout_batch_size": a.batch, "save_every": 0,
            "rollout_engine": {"backend": a.engine, "max_num_seqs": 8, "max_model_len": 512},
            "sampling": {"max_new_tokens": 6}, "topk": 4}
    if "input" in OpdConfig.__dataclass_fields__:
        over["input"] = {"window_mb": a.window_mb}
    cfg = load_config(OpdConfig, REPO / "jobs/configs/opd_tiny.yaml", over)
    init_ray(RayConfig(num_cpus=a.cpus))
    state = get_state_from_address(ray.get_runtime_context().gcs_address)

    def store() -> tuple[float, float, int]:
        """(MiB in use, MiB of primary copies: objects something refers to, object count); freed
        objects leave `in use` in batches, a second or so later."""
        s = get_memory_info_reply(state).store_stats
        return s.object_store_bytes_used / 2**20, s.object_store_bytes_primary_copy / 2**20, int(s.num_local_objects)

    rec = []
    t0 = time.perf_counter()
    ctl = OpdController(cfg)
    before_mb = store()[0]

    def on_step(r: dict) -> None:
        mb, primary, n = store()
        rec.append({"step": r["step"], "store_mb": mb, "primary_mb": primary, "objects": n,
                    "driver_rss_mb": rss_mb(), "t": time.perf_counter() - t0})
        print(f"step {r['step']:3d}  store {mb:8.2f} MiB (primary copies {primary:8.2f})  objects {n:5d}  "
              f"driver RSS {rec[-1]['driver_rss_mb']:7.1f} MiB", flush=True)

    ctl.on_step = on_step
    try:
        ctl.run()
    finally:
        ctl.shutdown()
    res = {"label": a.label, "clips": a.clips, "steps": a.steps, "batch": a.batch, "engine": a.engine,
           "window_mb": over.get("input", {}).get("window_mb"), "store_mb_after_startup": before_mb,
           "wall_s": time.perf_counter() - t0}
    lines = [f"{a.label}: {a.steps} steps x {a.batch} clips of {a.clips}"]
    for key, what in (("store_mb", "object store in use"), ("primary_mb", "primary copies"),
                      ("driver_rss_mb", "driver RSS")):
        xs = [r[key] for r in rec]
        early, late = sum(xs[5:10]) / 5, sum(xs[-5:]) / 5
        slope = float(np.polyfit([r["step"] for r in rec[5:]], xs[5:], 1)[0])
        res[key] = {"steps_6to10": early, "last5": late, "ratio": late / max(early, 1e-9), "mb_per_step": slope}
        lines.append(f"  {what:20s} {early:8.1f} MiB (steps 6-10) -> {late:8.1f} MiB (last 5): x{late / max(early, 1e-9):.2f}, "
                     f"{slope:+.3f} MiB/step")
    res["per_step"] = rec
    print("\n" + "\n".join(lines))
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
