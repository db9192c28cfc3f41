"""The OPD demo against its baselines, several seeds each (the figures in docs/benchmarks.md).

    python bench/demo_opd.py [--seeds 0 1 2] [--variants opd sft adapt_opd] [--write-baselines]

Variants, all from the demo student (`demo://student`) with the demo config's step budget
(steps x rollout_batch_size samples, learner lr):
  opd        the README's demo: `python jobs/opd.py --seed S` (OPD on unlabelled audio)
  sft        the same compute as plain SFT on the labelled data (the 40 `train_sample` clips,
             same steps, batch and lr; jobs/sft.py), scored on the demo's held-out set
  adapt_opd  teacher-data adaptation then OPD: the teacher transcribes the first half-budget of
             unlabelled clips, SFT on those labels for half the steps, then OPD for the other half
Each run's summary lands in runs/demo_bench/<variant>_s<seed>/; the table is printed and saved
as runs/demo_bench/results.json. --write-baselines stores the sft/adapt_opd means where the demo's
closing table reads them (jobs/configs/opd_tiny.baselines.json).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "runs" / "demo_bench"
PY = sys.executable


def sh(cmd: list[str], log: pathlib.Path) -> float:
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def opd(seed: int, out: pathlib.Path, extra: list[str] = ()) -> dict:
    if out.exists():   # an earlier or stopped run here: jobs/opd.py continues one only with --resume
        out.rename(out.with_name(f"{out.name}.earlier-{int(time.time())}"))
    s = sh([PY, "jobs/opd.py", f"--seed={seed}", f"--output_dir={out}", *extra], out.with_suffix(".term"))
    summ = json.loads((out / "summary.json").read_text())["summary"]
    return {"before": summ["student_wer_before"], "after": summ["student_wer_after"],
            "teacher": summ["teacher_wer"], "job_s": s, "train_s": summ["train_s"]}


def sft(seed: int, out: pathlib.Path, init: str, manifest: str, steps: int, batch: int, lr: float,
        held_out: tuple[str, int]) -> dict:
    if out.exists():   # an earlier run here: jobs/sft.py continues one only with --resume, so start afresh
        out.rename(out.with_name(f"{out.name}.earlier-{int(time.time())}"))
    s = sh([PY, "jobs/sft.py", f"--model={init}", f"--train_manifest={manifest}",
            f"--eval_manifest={held_out[0]}", f"--eval_max_samples={held_out[1]}", f"--steps={steps}",
            f"--batch_size={batch}", f"--learner.lr={lr}", f"--learner.seed={seed}", f"--seed={seed}",
            f"--output_dir={out}",
            "--export_dtype=float32", "--ray.num_cpus=4"], out.with_suffix(".term"))
    m = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    wer = m.get("dev_wer", m.get("summary", {}).get("dev_wer"))
    if wer is None:   # older jobs/sft.py: the closing table only
        for line in out.with_suffix(".term").read_text().splitlines():
            if line.startswith("| dev_wer |"):
                wer = float(line.split("|")[2])
    return {"after": wer, "job_s": s, "model": m.get("summary", {}).get("final_model") or str(out / "final")}


def finished_sft(out: pathlib.Path) -> dict | None:
    """A finished SFT run's result (its summary and exported model), or None."""
    f = out / "summary.json"
    s = json.loads(f.read_text()).get("summary", {}) if f.exists() else {}
    if s.get("dev_wer") is None or not pathlib.Path(s.get("final_model") or "/nonexistent").exists():
        return None
    return {"after": s["dev_wer"], "job_s": s.get("wall_s"), "model": s["final_model"]}


def teacher_labels(unlabelled: str, n: int, out: pathlib.Path) -> pathlib.Path:
    """The first n unlabelled clips with the teacher's greedy transcript as their text (the
    `text` field, so that jobs/sft.py reads the held-out set's references as usual)."""
    from ark_ray.audio import load_audio
    from ark_ray.config import SamplingConfig
    from ark_ray.data.manifest import read_manifest
    from ark_ray.engines.hf import HFEngine

    rows = read_manifest(unlabelled, text_field=None)[:n]
    eng = HFEngine(str(REPO / "assets/models/teacher"), device="cpu", dtype="float32")
    hyps = [t.text for t in eng.transcribe([load_audio(r["audio"]) for r in rows], SamplingConfig(max_new_tokens=48))]
    out.mkdir(parents=True, exist_ok=True)
    m = out / "teacher_labelled.jsonl"
    m.write_text("".join(json.dumps({"id": r["id"], "audio": r["audio"], "text": h}) + "\n"
                         for r, h in zip(rows, hyps) if h.strip()))
    return m


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["opd", "sft", "adapt_opd"])
    ap.add_argument("--write-baselines", action="store_true")
    ap.add_argument("--results", default=str(OUT / "results.json"),
                    help="this invocation's results; the table merges every runs/demo_bench/results*.json")
    ap.add_argument("--table-only", action="store_true", help="print the table of the results so far")
    a = ap.parse_args(argv)

    from ark_ray.config import OpdConfig, load_config
    from ark_ray.demo import heldout, student, unlabelled
    from ark_ray.runtime import cpu_env_defaults

    cpu_env_defaults()
    cfg = load_config(OpdConfig, REPO / "jobs/configs/opd_tiny.yaml", {})
    steps, batch, lr = cfg.steps, cfg.rollout_batch_size, cfg.learner.lr
    init = str(student.ensure())
    unl = unlabelled.resolve(cfg.train_manifest)
    held_out = (heldout.resolve(cfg.eval_manifest), cfg.eval_max_samples)   # the demo's own held-out set
    results: dict = {}
    path = pathlib.Path(a.results)
    if path.exists():
        results = json.loads(path.read_text())
    for v in ([] if a.table_only else a.variants):   # variant by variant: the demo's own seeds first
        for seed in a.seeds:
            key = f"{v}_s{seed}"
            t0 = time.perf_counter()
            if v == "opd":
                r = opd(seed, OUT / key)
            elif v == "sft":
                r = sft(seed, OUT / key, init, "assets/demo_corpus/train_sample.jsonl", steps, batch, lr, held_out)
            else:
                half = steps // 2
                # a finished adaptation half is kept (a run stopped in its OPD half resumes there)
                ad = finished_sft(OUT / key / "adapt")
                if ad is None:
                    m = teacher_labels(unl, half * batch, OUT / key)
                    ad = sft(seed, OUT / key / "adapt", init, str(m), half, batch, lr, held_out)
                r = opd(seed, OUT / key / "opd", [f"--student={ad['model']}", f"--steps={steps - half}"])
                r["adapted"] = ad["after"]
            r["wall_s"] = time.perf_counter() - t0
            results[key] = r
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
            print(json.dumps({key: r}), flush=True)
    for f in sorted(OUT.glob("results*.json")):   # runs of other invocations (e.g. run side by side)
        results = {**json.loads(f.read_text()), **results}
    # the student's WER before any training is the demo run's (greedy, deterministic)
    befores = [r["before"] for k, r in results.items() if k.startswith("opd_s") and r.get("before") is not None]
    before = befores[0] if befores else None
    teacher = next((r["teacher"] for r in results.values() if r.get("teacher") is not None), None)
    rows = {}
    print(f"\n| variant | seeds | student WER before | after (per seed) | mean after | relative cut | teacher |")
    print("|---|---|---|---|---|---|---|")
    for v in ("opd", "sft", "adapt_opd"):
        got = [(k, r) for k, r in sorted(results.items()) if k.startswith(f"{v}_s")]
        if not got or before is None:
            continue
        afters = [r["after"] for _, r in got]
        mean = sum(afters) / len(afters)
        cuts = [(before - x) / before for x in afters]
        rows[v] = {"before": before, "after": mean, "cut": (before - mean) / before, "min_cut": min(cuts),
                   "seeds": [int(k.split("_s")[-1]) for k, _ in got]}
        print(f"| {v} | {len(got)} | {before:.3f} | {', '.join(f'{x:.3f}' for x in afters)} | {mean:.3f} | "
              f"{(before - mean) / before:.1%} (min {min(cuts):.1%}) | {teacher or 0:.3f} |")
    if a.write_baselines:
        names = {"sft": "same-compute SFT on the 40 labelled clips",
                 "adapt_opd": "teacher-data adaptation, then OPD"}
        b = {"student": "demo://student", "steps": steps, "rollout_batch_size": batch,
             "eval_manifest": cfg.eval_manifest, "seeds": sorted({s for r in rows.values() for s in r["seeds"]}),
             "source": "bench/demo_opd.py", "rows": {names[k]: rows[k] for k in names if k in rows}}
        f = REPO / "jobs/configs/opd_tiny.baselines.json"
        f.write_text(json.dumps(b, indent=1) + "\n")
        print(f"baselines -> {f}")


if __name__ == "__main__":
    main()
