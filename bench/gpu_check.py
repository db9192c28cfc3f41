"""GPU check of OPD at real dimensions: every weight sync lands, exactly, on every path it takes.

    python -m bench.gpu_check                      # one card: learner, rollout and teacher share it (ipc)
    python -m bench.gpu_check --layout split       # two cards: learner on one, rollout + teacher on the other (NCCL)

Builds a real-dims random student and teacher once (cached under --workdir), starts the OPD
actors (start-up timed from the controller's creation), then runs --steps async and --steps sync
learner steps with a weight sync after every step. After each sync it waits until every rollout
worker reports the new version and compares sha1 digests of a few parameters read back from the
vLLM engine with the learner's (cast to the engine's dtype); it also checks each sync changed them.
Prints the sync times, samples/s per mode and start-up time as one JSON line (GPU_CHECK ...);
exits 1 on any mismatch. Run it whenever GPU-facing code changes.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHECKED = ["model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight",
           "model.layers.0.mlp.down_proj.weight", "model.norm.weight",
           "audio_encoder.whisper.layers.0.fc1.weight", "audio_encoder.adapting.0.weight"]

LAYOUTS = {
    # one card: fractions of it (the opd_ark06 config)
    "shared": {},
    # two cards: the learner alone on one, the rollout engine and the teacher on the other
    "split": {"learner": {"num_gpus": 1.0}, "rollout_engine": {"num_gpus": 0.6, "gpu_memory_utilization": 0.4},
              "teacher_engine": {"num_gpus": 0.4}, "staged_startup": False},
}


def zero_parity(model_dir: str, batch_size: int = 16, steps: int = 2) -> dict:
    """ZeRO-2 with two learner ranks (one card each) against one rank: the same losses on the same
    batch (the second step's loss shows the first update agreed too)."""
    import numpy as np

    from ark_ray.audio import SAMPLE_RATE
    from ark_ray.config import LearnerConfig
    from ark_ray.model.processor import ArkAsrProcessor
    from ark_ray.train.learner import LearnerGroup

    proc = ArkAsrProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    words = ["call", "alice", "play", "music", "move", "left", "open", "the", "door", "seven", "three"]
    waves = [(0.1 * rng.standard_normal(int(rng.uniform(3, 12) * SAMPLE_RATE))).astype(np.float32) for _ in range(batch_size)]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(4, 12)))) for _ in range(batch_size)]
    batch = {k: v.numpy() for k, v in proc(waves, texts=texts, padding_side="right").items()}
    losses = {}
    for world in (1, 2):
        cfg = LearnerConfig(num_workers=world, use_gpu=True, zero_stage=2, lr=1e-5, warmup_steps=0,
                            micro_batch_size=batch_size, num_gpus=1.0, num_cpus=2)
        t = time.perf_counter()
        group = LearnerGroup(model_dir, cfg, total_steps=steps)
        try:
            losses[world] = [group.train_step(batch)["loss"] for _ in range(steps)]
        finally:
            group.shutdown()
        print(f"ZeRO-2, {world} rank(s): losses {losses[world]} ({time.perf_counter() - t:.0f} s)", flush=True)
    rel = max(abs(a - b) / abs(a) for a, b in zip(losses[1], losses[2]))
    return {"losses_1_rank": losses[1], "losses_2_ranks": losses[2], "max_rel_diff": rel, "ok": rel <= 2e-3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--layout", default="shared", choices=list(LAYOUTS))
    ap.add_argument("--steps", type=int, default=3, help="learner steps in each mode")
    ap.add_argument("--preset", default="ark-asr-0.6b", choices=["ark-asr-0.6b", "tiny"])
    ap.add_argument("--workdir", default="/tmp/ark")
    ap.add_argument("--models", default=None, help="folder with student/ and teacher/ (built there when missing; "
                    "default WORKDIR/models-PRESET)")
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--bench_steps", type=int, default=0,
                    help="then time this many async and sync steps on the same actors, syncs unchecked "
                         "(bench/opd_throughput.py's figures without a second start-up)")
    ap.add_argument("--zero_parity", action="store_true",
                    help="only compare ZeRO-2 losses with 1 and 2 learner ranks (needs 2 GPUs)")
    args, extra = ap.parse_known_args(argv)

    from bench.opd_throughput import CONFIGS, bench_env, ensure_models, synthetic_manifest

    gpu = bench_env()
    import ray

    from ark_ray.config import OpdConfig, load_config, parse_overrides
    from ark_ray.opd.controller import OpdController
    from ark_ray.runtime import init_ray

    work = pathlib.Path(args.workdir)
    models = pathlib.Path(args.models) if args.models else work / f"models-{args.preset}"
    over = {"student": str(models / "student"), "teacher": str(models / "teacher"),
            "output_dir": str(work / f"run-{args.layout}-{int(time.time())}"), "eval_manifest": None,
            "eval_every": 0, "save_every": 0, "sync_every": 1, "steps": 2 * args.steps,
            "train_manifest": str(synthetic_manifest(work / "corpus", args.clips, 3.0, 12.0)),
            "learner": {"lr": 1e-4, "warmup_steps": 0}}
    for k, v in LAYOUTS[args.layout].items():
        over[k] = {**over.get(k, {}), **v} if isinstance(v, dict) else v
    user = parse_overrides(extra)
    cfg = load_config(OpdConfig, CONFIGS[args.preset], over)
    if user:
        cfg = load_config(OpdConfig, CONFIGS[args.preset], {**over, **user})
    ensure_models(models / "student", models / "teacher", args.preset, gpu, {})

    init_ray(cfg.ray)
    if args.zero_parity:
        res = zero_parity(cfg.student)
        print("ZERO_PARITY " + json.dumps(res), flush=True)
        ray.shutdown()
        return 0 if res["ok"] else 1
    failures: list[str] = []
    checks: list[dict] = []
    t0 = time.perf_counter()
    ctl = OpdController(cfg)
    startup_s = time.perf_counter() - t0
    print(f"actors up in {startup_s:.1f} s ({json.dumps({k: round(v, 1) for k, v in ctl.startup.items()})}); "
          f"weight sync: {ctl.weights.describe()}", flush=True)
    dtype = ctl.weights.dtype
    if not gpu:   # vLLM's CPU backend repacks decoder linears for oneDNN: their read-back differs in layout
        CHECKED[:] = [n for n in CHECKED if not n.startswith("model.layers.")]
    learner0 = ray.get(ctl.learner.workers[0].weight_digests.remote(CHECKED, dtype))
    shapes = {n: s for n, (_, s) in learner0.items()}
    previous = {n: d for n, (d, _) in learner0.items()}
    engine0 = ray.get(ctl.rollouts[0].weight_digests.remote(shapes))
    if engine0 != previous:
        failures.append("before any sync the engine does not hold the learner's initial weights")
    push = ctl.sync_weights

    def checked_sync() -> None:
        nonlocal previous
        push()
        rec = ctl.weights.wait()           # every worker reports the version, or this raises
        ctl.last_sync = rec
        want = {n: d for n, (d, _) in ray.get(ctl.learner.workers[0].weight_digests.remote(CHECKED, dtype)).items()}
        got = ray.get([w.weight_digests.remote(shapes) for w in ctl.rollouts])
        versions = ray.get([w.get_version.remote() for w in ctl.rollouts])
        bad = [f"worker {i}: {n}" for i, g in enumerate(got) for n in CHECKED if g[n] != want[n]]
        changed = sum(want[n] != previous[n] for n in CHECKED)
        ok = not bad and changed > 0 and all(v == ctl.version for v in versions)
        checks.append({"version": ctl.version, "sync_s": round(rec["sync_s"], 3), "modes": rec["modes"],
                       "changed": changed, "ok": ok})
        print(f"  sync v{ctl.version}: {rec['modes']} {rec['sync_s']:.3f} s (export {rec['export_s']:.3f}, "
              f"load {rec['load_s']:.3f}), {rec['bytes'] / 2**30:.2f} GiB, worker versions {versions}, "
              f"{changed}/{len(CHECKED)} checked tensors changed, {'OK' if ok else 'MISMATCH ' + str(bad)}", flush=True)
        if not ok:
            failures.append(f"v{ctl.version}: mismatched {bad}, changed {changed}, versions {versions}")
        previous = want

    ctl.sync_weights = checked_sync
    modes: dict = {}
    bench: dict = {}
    try:
        for mode in ("async", "sync"):
            first, n0 = len(ctl.history), ctl.samples_trained
            ctl.cfg.steps = ctl.step + args.steps
            t = time.perf_counter()
            (ctl.run_async if mode == "async" else ctl.run_sync)()
            wall = time.perf_counter() - t
            ctl.drain()
            recs = ctl.history[first:]
            modes[mode] = {"steps": len(recs), "samples_per_s": round((ctl.samples_trained - n0) / wall, 3),
                           "kl_last": recs[-1]["kl"] if recs else None,
                           "peak_mem_gb": max([r.get("peak_mem_gb") or 0 for r in recs] or [0])}
            print(f"{mode}: {json.dumps(modes[mode])}", flush=True)
        if args.bench_steps:
            from bench.opd_throughput import GpuBusy, run_mode

            ctl.sync_weights = push
            ctl.cfg.steps = ctl.step + 2 * args.bench_steps   # (the LR schedule only)
            with GpuBusy() as sampler:
                for mode in ("async", "sync"):
                    bench[mode] = run_mode(ctl, mode, args.bench_steps, sampler)
                    print(f"bench {mode}: {json.dumps(bench[mode])}", flush=True)
            ctl.weights.wait()
            bench["async_over_sync"] = round(bench["async"]["samples_per_s"] / bench["sync"]["samples_per_s"], 3)
    except Exception as e:
        failures.append(f"run failed: {type(e).__name__}: {e}")
        raise
    finally:
        ctl.shutdown()
        ray.shutdown()
        syncs = [c["sync_s"] for c in checks]
        result = {"layout": args.layout, "preset": args.preset, "startup_s": round(startup_s, 1),
                  "startup": {k: round(v, 1) for k, v in ctl.startup.items()},
                  "syncs": len(checks), "sync_s": syncs, "sync_s_median": sorted(syncs)[len(syncs) // 2] if syncs else None,
                  "modes": modes, "bench": bench, "ok": not failures and len(checks) >= 2 * args.steps, "failures": failures}
        print("GPU_CHECK " + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
