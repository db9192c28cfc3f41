"""The learner alone at real dimensions: peak GPU memory and step time per micro-batching and
activation-checkpointing setting, on one OPD batch (issue 13, item 7).

    GPU:  python bench/learner_memory.py --model /tmp/m06 --out $OUT/learner_memory.json
    CPU:  python bench/learner_memory.py --model preset:tiny --variants mb16 --steps 2   (smoke run)

Each variant starts its own learner group (one rank, ZeRO-2, bf16 with fp32 masters on GPU) and
trains `--steps` steps with the OPD loss on one fixed batch: `--batch` clips of `--min_s`..`--max_s`
s of noise, `--response` response tokens each, union of 2 x `--topk` ids with random teacher
buckets. Prints one JSON line per variant (peak_mem_gb: torch's peak allocation during a step;
step_s: mean over the steps after the first) and writes them all to `--out`.
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

VARIANTS = {  # name -> (micro_batch_size, gradient_checkpointing)
    "mb16": (16, False), "mb16_ckpt": (16, True), "mb4": (4, False), "mb4_ckpt": (4, True),
}


def opd_batch(model_dir: str, batch: int, min_s: float, max_s: float, response: int, topk: int,
              seed: int = 0) -> dict:
    """One OPD learner batch (the layout of TrajectoryBatch.to_learner_batch), random content."""
    from ark_ray.audio import SAMPLE_RATE
    from ark_ray.model.processor import ArkAsrProcessor

    proc = ArkAsrProcessor.from_pretrained(model_dir)
    vocab = len(proc.tokenizer)
    rng = np.random.default_rng(seed)
    waves = [(0.1 * rng.standard_normal(int(SAMPLE_RATE * rng.uniform(min_s, max_s)))).astype(np.float32)
             for _ in range(batch)]
    b = {k: v.numpy() for k, v in proc(waves, padding_side="right").items()}  # prompts only
    starts = b["attention_mask"].sum(1)
    width = int(starts.max()) + response
    ids = np.full((batch, width), 0, np.int64)
    att = np.zeros((batch, width), np.int64)
    for i, s in enumerate(starts):
        ids[i, :s] = b["input_ids"][i, :s]
        ids[i, s:s + response] = rng.integers(0, vocab, response)
        att[i, :s + response] = 1
    u = 2 * topk
    union = np.stack([[rng.choice(vocab, u, replace=False) for _ in range(response)] for _ in range(batch)])
    z = rng.standard_normal((batch, response, u + 1)) * 3          # teacher buckets + tail
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return {"input_ids": ids, "attention_mask": att, "input_features": b["input_features"],
            "feature_lengths": b["feature_lengths"], "response_start": starts.astype(np.int64),
            "union_ids": union.astype(np.int64), "teacher_logprobs": lp[..., :u].astype(np.float32),
            "teacher_tail_logprob": lp[..., u].astype(np.float32),
            "response_mask": np.ones((batch, response), bool)}


def run_variant(name: str, model_dir: str, batch: dict, steps: int, gpu: bool) -> dict:
    from ark_ray.config import LearnerConfig
    from ark_ray.opd.loss import OpdLoss
    from ark_ray.train.learner import LearnerGroup

    mbs, ckpt = VARIANTS[name]
    cfg = LearnerConfig(use_gpu=gpu, num_workers=1, zero_stage=2, lr=2e-5, micro_batch_size=mbs,
                        gradient_checkpointing=ckpt, num_gpus=1.0 if gpu else 0.0)
    t0 = time.perf_counter()
    g = LearnerGroup(model_dir, cfg, total_steps=steps, loss=OpdLoss(1.0))
    start_s = time.perf_counter() - t0
    try:
        stats, times = [], []
        for _ in range(steps):
            t = time.perf_counter()
            stats.append(g.train_step(batch))
            times.append(time.perf_counter() - t)
    finally:
        g.shutdown()
    timed = stats[1:] or stats
    return {"variant": name, "micro_batch_size": mbs, "gradient_checkpointing": ckpt,
            "batch": len(batch["input_ids"]), "seq_len": int(batch["input_ids"].shape[1]),
            "peak_mem_gb": max(s["peak_mem_gb"] for s in stats),
            "step_s": round(float(np.mean(times[1:] or times)), 3),
            **{k: round(float(np.mean([s[k] for s in timed])), 3) for k in ("forward_s", "backward_s", "optimizer_s")},
            "start_s": round(start_s, 1), "loss_first": stats[0]["loss"], "loss_last": stats[-1]["loss"]}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/m06", help="HF-format ARK-ASR dir, or preset:NAME (random, built here)")
    ap.add_argument("--variants", default="mb16,mb16_ckpt,mb4", help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=4, help="steps per variant (the first is not timed)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--min_s", type=float, default=3.0)
    ap.add_argument("--max_s", type=float, default=12.0)
    ap.add_argument("--response", type=int, default=48, help="response tokens per row (max_new_tokens)")
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--out", default=None, help="JSON list of the result rows")
    args = ap.parse_args(argv)

    import ray
    import torch

    gpu = torch.cuda.is_available()
    model_dir = args.model
    if model_dir.startswith("preset:"):
        from ark_ray.model.factory import save_random_model
        model_dir = tempfile.mkdtemp(prefix="learner-mem-")
        save_random_model(model_dir, args.model.split(":", 1)[1], seed=0)
    batch = opd_batch(model_dir, args.batch, args.min_s, args.max_s, args.response, args.topk)
    ray.init(num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for name in args.variants.split(","):
            rows.append(run_variant(name.strip(), model_dir, batch, args.steps, gpu))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"{'variant':<10} {'peak GB':>8} {'step s':>7} {'fwd s':>6} {'bwd s':>6} {'opt s':>6}")
    for r in rows:
        print(f"{r['variant']:<10} {r['peak_mem_gb']:>8.2f} {r['step_s']:>7.3f} {r['forward_s']:>6.3f} "
              f"{r['backward_s']:>6.3f} {r['optimizer_s']:>6.3f}")
    return rows


if __name__ == "__main__":
    main()
