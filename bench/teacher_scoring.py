"""Teacher scoring throughput: a Qwen3-ASR-1.7B-shaped random teacher on vLLM vs HF (issue 18).

    source bench/gpu_env.sh && python bench/teacher_scoring.py --student /tmp/m06 --out $OUT

Scores the same synthetic trajectories with both engines through `Qwen3AsrTeacher.score_batch` (the
TeacherScorer's code path): random clips of `--min_s`..`--max_s` seconds, student responses of
`--tokens_per_s` tokens a second of audio (the student's own tokenizer, EOS last) with random
student top-k ids. The teacher checkpoint (real 1.7B dims, vocab 151936, bf16, random weights, the
tokenizer derived from the student's) is written once under --teacher_dir. HF runs first (groups of
--hf_batch clips by duration) and is freed before vLLM starts (prompt_logprobs, one call). Prints one
JSON line: audio-seconds scored per second for each engine and the ratio; the log and the JSON go
to --out. Target: vLLM >= 3x HF.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_batch(tok, n: int, min_s: float, max_s: float, tps: float, k: int, seed: int):
    from ark_ray.audio import SAMPLE_RATE
    from ark_ray.opd.trajectory import TrajectoryBatch

    rng = np.random.default_rng(seed)
    secs = rng.uniform(min_s, max_s, n)
    text_ids = np.array([i for s, i in tok.get_vocab().items() if not s.startswith("<")])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    resps = [list(rng.choice(text_ids, max(1, int(round(d * tps))))) + [eos] for d in secs]
    topk = [np.concatenate([np.asarray(r)[:, None], rng.choice(text_ids, (len(r), k - 1))], 1) for r in resps]
    waves = [(rng.standard_normal(int(d * SAMPLE_RATE)) * 0.05).astype(np.float32) for d in secs]
    batch = TrajectoryBatch.from_rollouts(
        sample_ids=[f"c{i}" for i in range(n)], positions=list(range(n)), audio_refs=[""] * n,
        prompt_ids=[[0]] * n, responses=resps, student_topk=topk, policy_version=0,
        reference_texts=[""] * n, pred_texts=["hello"] * n, k=k)
    return batch, waves, float(secs.sum())


def timed(teacher, batch, waves, reps: int):
    teacher.score_batch(batch.select(np.arange(len(batch)) < 8), waves[:8])   # warm-up
    best, out = None, None
    for _ in range(reps):
        t = time.perf_counter()
        out = teacher.score_batch(batch, waves)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--student", default="/tmp/m06")
    ap.add_argument("--teacher_dir", default="/tmp/ark/qwen3_asr_1.7b_random")
    ap.add_argument("--preset", default="qwen3-asr-1.7b")
    ap.add_argument("--clips", type=int, default=512)
    ap.add_argument("--min_s", type=float, default=2.0)
    ap.add_argument("--max_s", type=float, default=20.0)
    ap.add_argument("--tokens_per_s", type=float, default=3.5)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--hf_batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--gpu_memory_utilization", type=float, default=0.6)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=out / "teacher_scoring.log", level=logging.INFO)
    log = logging.getLogger("teacher_scoring")

    import torch

    from ark_ray.model.processor import ArkAsrProcessor
    from ark_ray.opd.qwen3_random import write_random_qwen3_asr
    from ark_ray.opd.qwen3_teacher import Qwen3AsrTeacher

    t0 = time.perf_counter()
    tdir = pathlib.Path(a.teacher_dir)
    if not (tdir / "config.json").exists():
        write_random_qwen3_asr(tdir, a.student, a.preset, "bfloat16", device="cuda" if torch.cuda.is_available() else "cpu")
        torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    sp = ArkAsrProcessor.from_pretrained(a.student)
    st = sp.tokenizer
    allowed = sp.allowed_token_mask(len(st)).numpy()
    batch, waves, audio_s = make_batch(st, a.clips, a.min_s, a.max_s, a.tokens_per_s, a.topk, 0)
    res = {"bench": "teacher_scoring", "teacher": a.preset, "clips": a.clips, "audio_s": round(audio_s, 1),
           "topk": a.topk, "response_tokens": int(batch.response_mask.sum()), "build_s": round(build_s, 1),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    outs = {}
    for eng in a.engines.split(","):
        t = time.perf_counter()
        q = Qwen3AsrTeacher(str(tdir), st, allowed, a.topk, engine=eng, max_batch=a.hf_batch,
                            engine_opts={"gpu_memory_utilization": a.gpu_memory_utilization, "max_model_len": 1024,
                                         "max_num_seqs": 256, "enforce_eager": True})
        res[f"{eng}_startup_s"] = round(time.perf_counter() - t, 1)
        dt, outs[eng] = timed(q, batch, waves, a.reps)
        res[f"{eng}_s"] = round(dt, 2)
        res[f"{eng}_audio_s_per_s"] = round(audio_s / dt, 1)
        log.info("%s: %.2f s for %.0f audio s", eng, dt, audio_s)
        if eng == "vllm":
            q.llm = None
        del q
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "hf" in outs and "vllm" in outs:
        res["vllm_over_hf"] = round(res["vllm_audio_s_per_s"] / res["hf_audio_s_per_s"], 2)
        (uh, lh, _, sh), (uv, lv, _, sv) = outs["hf"], outs["vllm"]
        # bf16 engines differ in kernels: report (not assert) how close the shared entries are
        d = [abs(float(lh[i, t][uh[i, t] == u][0]) - float(lv[i, t, j]))
             for i, t, j in zip(*np.nonzero(uv >= 0)) for u in [uv[i, t, j]] if (uh[i, t] == u).any()]
        res["scored_equal"] = bool((sh == sv).all())
        res["median_abs_dlogp_bf16"] = round(float(np.median(d)), 4) if d else None
    res["total_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(res)
    print(line, flush=True)
    (out / "teacher_scoring.json").write_text(line + "\n")


if __name__ == "__main__":
    main()
