"""The batch job against an earlier revision of itself, same input, model and settings, in one run.

    python bench/batch_vs_previous.py --rev d1ff9c1 --input demo://heldout --repeats 2 [-- --key=value ...]

The earlier revision is checked out into a temporary `git worktree` (removed afterwards) and
both trees run `python jobs/transcribe.py` as a user would: a fresh local Ray each, the same
flags (after `--`), outputs in temporary folders. Runs alternate (new, old, new, old, ...) so a
machine whose load drifts treats both alike. Reported per tree: the job's own wall time and x real
time (from its SUMMARY_JSON line), the same without its local Ray's start (`startup.ray_s`: what
a cluster under `ray job submit` has already paid, and on a loaded machine the noisiest part),
and the process's wall time; the best and the median of the repeats. Why: issue 26 asks the Ray Data job to be at least as fast as the previous driver
(d1ff9c1, hand-written Ray tasks and actors) on the 300 held-out demo clips.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


#: What Ray says when a local head could not start within its fixed 30 s (a loaded machine): that
#: run is tried again rather than counted.
RAY_START_TIMEOUT = "timed out during startup"


def run_job(tree: pathlib.Path, args: list[str], out: pathlib.Path, timeout_s: float, tries: int = 3) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("RAY_ADDRESS", None)
    for attempt in range(tries):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(tree / "jobs" / "transcribe.py"), *args, f"--output={out}",
                               "--overwrite", "--progress=false"], cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        wall = time.perf_counter() - t0
        if proc.returncode == 0 or RAY_START_TIMEOUT not in proc.stdout + proc.stderr or attempt == tries - 1:
            break
        print(f"{tree}: Ray did not start in time (machine load {os.getloadavg()[0]:.0f}); again", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY_JSON ")][-1]
    s = json.loads(line[len("SUMMARY_JSON "):])
    ray_s = (s.get("startup") or {}).get("ray_s") or 0.0
    return {"process_s": round(wall, 1), "job_s": round(s["wall_s"], 1), "ray_s": round(ray_s, 1),
            "after_ray_s": round(s["wall_s"] - ray_s, 1), "x_rt": round(s["x_real_time"], 2),
            "rows": s["rows_written"], "errors": s["error_rows"], "startup": s.get("startup")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="d1ff9c1", help="the earlier revision")
    ap.add_argument("--input", default="demo://heldout", help="what both transcribe (demo:// is resolved here)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout_s", type=float, default=1800)
    ap.add_argument("--record", action="store_true", help="append the row to docs/benchmarks.md")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then job flags for both trees")
    a = ap.parse_args(argv)
    flags = [f for f in a.rest if f != "--"]
    inp = a.input
    if inp.startswith("demo://"):
        from ark_ray.demo import heldout

        inp = heldout.resolve(inp)
    args = [f"--input={inp}", *flags]
    work = pathlib.Path(tempfile.mkdtemp(prefix="ark-vs-prev-"))
    old_tree = work / "previous"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_tree), a.rev], check=True,
                   capture_output=True)
    runs: dict = {"new": [], "previous": []}
    try:
        for i in range(a.repeats):
            for name, tree in (("new", REPO), ("previous", old_tree)):
                r = run_job(tree, args, work / f"out-{name}", a.timeout_s)
                runs[name].append(r)
                print(f"run {i + 1} {name}: {json.dumps(r)}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_tree)], capture_output=True)
    result = {"rev": a.rev, "input": a.input, "flags": flags, "runs": runs}
    for name, rs in runs.items():
        result[name] = {"job_s_best": min(r["job_s"] for r in rs), "job_s_median": statistics.median(r["job_s"] for r in rs),
                        "after_ray_s_median": statistics.median(r["after_ray_s"] for r in rs),
                        "x_rt_best": max(r["x_rt"] for r in rs)}
    result["new_vs_previous"] = round(result["previous"]["job_s_median"] / result["new"]["job_s_median"], 3)
    result["new_vs_previous_after_ray"] = round(result["previous"]["after_ray_s_median"]
                                                / result["new"]["after_ray_s_median"], 3)
    cmd = "python bench/batch_vs_previous.py " + " ".join(argv if argv is not None else sys.argv[1:])
    row = (f"| `{cmd}` | {_machine()} | {' '.join(flags) or 'the job defaults'} | {runs['new'][0]['rows']} rows "
           f"({a.input}) | job wall time, median of {a.repeats} "
           f"(best): new **{result['new']['job_s_median']} s** ({result['new']['job_s_best']} s, "
           f"{result['new']['x_rt_best']}x RT), previous {a.rev} **{result['previous']['job_s_median']} s** "
           f"({result['previous']['job_s_best']} s, {result['previous']['x_rt_best']}x RT): new / previous speed "
           f"**{result['new_vs_previous']}x**; without the local Ray's start (a cluster has it up already) "
           f"{result['new']['after_ray_s_median']} s against {result['previous']['after_ray_s_median']} s: "
           f"**{result['new_vs_previous_after_ray']}x** |")
    print(row)
    print("RESULT_JSON " + json.dumps(result), flush=True)
    if a.record:
        sys.path.insert(0, str(REPO / "bench"))
        from batch_transcribe import record

        record(row)
    return result


def _machine() -> str:
    load = os.getloadavg()[0]
    return f"{os.cpu_count()}-core CPU, load average {load:.0f} at the end"


if __name__ == "__main__":
    main()
