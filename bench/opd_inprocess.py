"""Synchronous OPD in one process, for searching the demo's shape quickly (about a minute a run on
one core, against three for the real job): the same pieces as jobs/opd.py — the student on
`HFEngine` (sampled rollouts with their top-k ids), `TeacherScorer`, `OpdLoss`, the data order of
`DataPositions` and the learner's LR schedule — with plain AdamW in place of the DeepSpeed learner
actor and the learner's own weights in the rollout engine (on-policy; `--stale K` rolls out with the
weights of K steps before, as the async job's bounded staleness does).

    python bench/opd_inprocess.py --seed 0 --batch 32 --steps 56 --temperature 0.7 \
        [--big_eval demo://heldout-200] [--out runs/opd_inprocess.jsonl]

Prints held-out WER by step (the bundled test set; dev; and `--big_eval`, a larger labelled manifest
such as the first N clips of the demo's held-out set, `demo://heldout-N`), and appends one JSON line
per run to `--out`. The rows it produced are in docs/benchmarks.md ("Shape search").
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="data order, and the torch seed of the rollouts")
    p.add_argument("--steps", type=int, default=56)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--stale", type=int, default=0, help="roll out with the weights of this many steps before")
    p.add_argument("--eval_every", type=int, default=14)
    p.add_argument("--student", default="demo://student")
    p.add_argument("--teacher", default=str(REPO / "assets/models/teacher"))
    p.add_argument("--train_manifest", default="demo://unlabelled")
    p.add_argument("--big_eval", default=None, help="a larger labelled manifest (or demo://heldout-N), "
                   "scored at every evaluation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "runs/opd_inprocess.jsonl"))
    a = p.parse_args(argv)

    import numpy as np
    import torch

    from ark_ray.audio import load_audio
    from ark_ray.config import LearnerConfig, SamplingConfig
    from ark_ray.data.clip_stream import ClipBatch, DataPositions
    from ark_ray.data.manifest import read_manifest
    from ark_ray.demo import heldout, student as demo_student, unlabelled
    from ark_ray.engines.hf import HFEngine
    from ark_ray.model import ArkAsrForConditionalGeneration
    from ark_ray.opd.controller import _wer
    from ark_ray.opd.loss import OpdLoss
    from ark_ray.opd.teacher import TeacherScorer
    from ark_ray.opd.trajectory import TrajectoryBatch
    from ark_ray.train.learner import lr_lambda

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    student_dir = demo_student.resolve(a.student)
    rows = read_manifest(unlabelled.resolve(a.train_manifest), text_field=None)

    def clips(rs):
        return [load_audio(r["audio"], begin_time=r.get("begin_time"), end_time=r.get("end_time")) for r in rs]

    evals = {"test": read_manifest(str(REPO / "assets/demo_corpus/test.jsonl")),
             "dev": read_manifest(str(REPO / "assets/demo_corpus/dev.jsonl"))}
    if a.big_eval:
        evals["big"] = read_manifest(heldout.resolve(a.big_eval))
    eval_waves = {k: clips(v) for k, v in evals.items()}
    model = ArkAsrForConditionalGeneration.from_pretrained(student_dir, dtype=torch.float32)
    engine = HFEngine(student_dir, device="cpu", dtype="float32", model=model)
    teacher = TeacherScorer(a.teacher, student_dir, a.topk)
    pad = engine.processor.token_ids.pad
    greedy = SamplingConfig(max_new_tokens=a.max_new_tokens)
    sampling = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, logprobs_topk=a.topk)

    def evaluate(step: int) -> dict:
        model.eval()
        out = {"step": step}
        for k, rs in evals.items():
            hyps = [t.text for t in engine.transcribe(eval_waves[k], greedy)]
            out[k] = _wer([r["text"] for r in rs], hyps)
        print(" ".join(f"{k} {v:.3f}" if k != "step" else f"step {v:3d}" for k, v in out.items()), flush=True)
        return out

    lcfg = LearnerConfig(lr=a.lr, warmup_steps=a.warmup, min_lr_ratio=a.min_lr_ratio)   # the learner's AdamW
    opt = torch.optim.AdamW(model.parameters(), lr=lcfg.lr, betas=tuple(lcfg.betas), weight_decay=lcfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(lcfg, a.steps))
    loss_fn = OpdLoss(1.0)
    data = DataPositions(len(rows), a.seed)
    res = {"args": vars(a), "evals": [evaluate(0)], "kl": []}
    past = []   # the weights of the last `stale` steps
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        positions = list(range((step - 1) * a.batch, step * a.batch))
        rs = [rows[data.row(q)] for q in positions]
        waves = clips(rs)
        engine.model = past[0] if a.stale and len(past) == a.stale else model
        engine.model.eval()
        outs = engine.transcribe(waves, sampling)
        engine.model = model
        batch = TrajectoryBatch.from_rollouts(
            sample_ids=[r["id"] for r in rs], positions=positions, audio_refs=[r["id"] for r in rs],
            prompt_ids=[t.prompt_ids for t in outs], responses=[t.token_ids for t in outs],
            student_topk=[t.topk_ids for t in outs], policy_version=step, reference_texts=[""] * len(rs),
            pred_texts=[t.text for t in outs], k=a.topk)
        batch = teacher.score(batch, ClipBatch(positions=positions, ids=[r["id"] for r in rs], texts=[""] * len(rs),
                                               waves=waves, columns={}))
        lb = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.to_learner_batch(pad).items()}
        lb["input_features"] = lb["input_features"].float()
        if a.stale:   # the weights before this update: K steps behind when rolling out K updates later
            past = (past + [copy.deepcopy(model)])[-a.stale:]
        model.train()
        loss_sum, _ = loss_fn(model, lb)
        tokens = loss_fn.tokens(lb)
        (loss_sum / tokens).backward()
        if lcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), lcfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        res["kl"].append(float(loss_sum.detach()) / tokens)
        if step % a.eval_every == 0 or step == a.steps:
            res["evals"].append(evaluate(step))
    res["train_s"] = time.perf_counter() - t0
    first, last = res["evals"][0], res["evals"][-1]
    res["cut"] = {k: 1 - last[k] / first[k] for k in evals}
    print("relative cut: " + ", ".join(f"{k} {v:.1%}" for k, v in res["cut"].items()))
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    ray.shutdown()
    return res


if __name__ == "__main__":
    main()
