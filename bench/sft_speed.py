"""SFT speed on Ray Train: start-up and steady-state steps/s of a jobs/sft.py run.

    python bench/sft_speed.py [--out runs/bench_sft] -- <jobs/sft.py arguments>

e.g. on one GPU (the demo student's config; its train set is made first, see docs/training.md):

    python bench/sft_speed.py -- --config jobs/configs/sft_student_demo.yaml --steps=200 --eval_every=0

Runs the job (a fresh output folder each time), then reads its metrics.jsonl: the steady rate is
taken from each step's own time (`data_s` waiting for featurized audio + `step_s` collate and
learner step) over the steps after the first 10; the rest of the job's time (Ray Train's start-up:
workers, DeepSpeed, the first Ray Data blocks; checkpoints, export, eval) is `other_s`. Prints one
JSON line.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_sft", help="output_dir of the job (emptied first)")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the steady rate")
    ap.add_argument("job_args", nargs="*", help="arguments of jobs/sft.py (after --)")
    a = ap.parse_args(argv)
    out = pathlib.Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "jobs" / "sft.py"), *a.job_args, f"--output_dir={out}"],
                   cwd=REPO, check=True)
    job_s = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in recs if "step" in r and r.get("event") is None]
    steady = [r["data_s"] + r["step_s"] for r in steps[a.warmup:]] or [r["data_s"] + r["step_s"] for r in steps]
    summary = json.loads((out / "summary.json").read_text())["summary"]
    train_s = sum(r["data_s"] + r["step_s"] for r in steps)
    result = {"steps": len(steps), "steps_per_s": round(1 / statistics.median(steady), 3),
              "samples_per_step": steps[-1]["samples"] + steps[-1]["error_rows"],
              "data_wait_share": round(sum(r["data_s"] for r in steps) / max(train_s, 1e-9), 3),
              "job_s": round(job_s, 1), "other_s": round(job_s - train_s, 1),
              "peak_mem_gb": max(r.get("peak_mem_gb", 0) for r in steps),
              "last_loss": summary.get("last_loss"), "dev_wer": summary.get("dev_wer")}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
