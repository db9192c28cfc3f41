"""Sweep VllmEngine's throughput knobs on one GPU: a table of x real time per setting.

    python bench/engine_sweep.py --model_dir /tmp/m06 [--seconds 30] [--clips 768] [--budget_s 330]

Each setting runs in a fresh process (a fresh engine: clean memory, no state carried over), on
the same random clips, greedy, 3.5 new tokens per audio second. "x2 engines" starts two engines
on the card (each with its own share of memory), lines them up on a barrier once both are warm,
and counts their audio over the wall time from the first start to the last finish.
The grid runs in order and stops launching settings once the budget would be exceeded (the
rows left out are listed). Writes sweep.json and the log under $OUT (or ./runs/).

Settings are EngineConfig keys: max_num_seqs, max_num_batched_tokens (0: vLLM's default),
enable_chunked_prefill, encoder_attention, encoder_compile, gpu_memory_utilization.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# (name, EngineConfig overrides, engines on the card); the first row is the baseline
GRID = [
    ("seqs256 tok16k", dict(max_num_seqs=256, max_num_batched_tokens=16384), 1),
    ("seqs512 tok32k", dict(max_num_seqs=512, max_num_batched_tokens=32768), 1),
    ("seqs1024 tok64k", dict(max_num_seqs=1024, max_num_batched_tokens=65536), 1),
    ("seqs512 tok32k x2 engines", dict(max_num_seqs=512, max_num_batched_tokens=32768,
                                       gpu_memory_utilization=0.42), 2),
    ("seqs512 tok32k no-chunked", dict(max_num_seqs=512, max_num_batched_tokens=32768,
                                       enable_chunked_prefill=False), 1),
    ("seqs512 tok32k eager-enc", dict(max_num_seqs=512, max_num_batched_tokens=32768, encoder_compile=False), 1),
    ("seqs512 tok32k padded-enc", dict(max_num_seqs=512, max_num_batched_tokens=32768,
                                       encoder_attention="padded", encoder_compile=False), 1),
]


def out_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("OUT") or "runs/engine_sweep")
    d.mkdir(parents=True, exist_ok=True)
    return d


def one(spec: dict) -> None:
    """Child process: one engine, warm-up, (barrier), timed runs; one JSON line on stdout."""
    from bench.profile_engine import clips
    from ark_ray.config import EngineConfig, SamplingConfig
    from ark_ray.engines.vllm_engine import VllmEngine

    t0 = time.time()
    cfg = EngineConfig(backend="vllm", max_model_len=640, **spec["cfg"])
    eng = VllmEngine(spec["model_dir"], cfg)
    res = {"start_s": round(time.time() - t0, 1), "runs": []}
    for s in spec["seconds"]:
        eng.transcribe(clips(16, s, 1), SamplingConfig(max_new_tokens=int(round(3.5 * s))))
    if spec.get("barrier"):  # start the timed runs together once every engine is warm
        mark = pathlib.Path(spec["barrier"])
        pathlib.Path(f"{mark}.{spec['rank']}").touch()
        deadline = time.time() + 180
        while len(list(mark.parent.glob(mark.name + ".*"))) < spec["engines"]:
            if time.time() > deadline:
                raise RuntimeError("the other engine never got ready (see its log above)")
            time.sleep(0.05)
    for s in spec["seconds"]:
        audio = clips(spec["clips"], s, 100 + spec.get("rank", 0))
        t = time.time()
        eng.transcribe(audio, SamplingConfig(max_new_tokens=int(round(3.5 * s))))
        res["runs"].append({"clip_s": s, "t0": t, "t1": time.time(), "audio_s": spec["clips"] * s})
    eng.close()
    print("RESULT " + json.dumps(res), flush=True)


def launch(name: str, over: dict, engines: int, args, log) -> dict:
    barrier = str(out_dir() / f"barrier-{int(time.time() * 1000)}") if engines > 1 else None
    procs = []
    for rank in range(engines):
        spec = {"model_dir": args.model_dir, "cfg": over, "seconds": args.seconds, "engines": engines,
                "clips": args.clips // engines, "barrier": barrier, "rank": rank}
        procs.append(subprocess.Popen([sys.executable, __file__, "--one", json.dumps(spec)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))  # its own group: a kill takes vLLM's children too
    results, failed = [], None
    for p in procs:
        try:
            out, _ = p.communicate(timeout=args.per_setting_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out = p.communicate()[0] + f"\ntimed out after {args.per_setting_timeout_s:g} s"
        log.write(f"===== {name} (rc {p.returncode})\n{out}\n")
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            failed = (out.strip().splitlines() or ["no output"])[-1][:200]
        else:
            results.append(json.loads(lines[-1][len("RESULT "):]))
    row = {"setting": name, "engines": engines, **over}
    if failed:
        row["error"] = failed
        return row
    row["start_s"] = max(r["start_s"] for r in results)
    for i, s in enumerate(args.seconds):
        runs = [r["runs"][i] for r in results]
        wall = max(r["t1"] for r in runs) - min(r["t0"] for r in runs)
        row[f"x_rt_{s:g}s"] = round(sum(r["audio_s"] for r in runs) / wall, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model_dir")
    ap.add_argument("--seconds", type=float, nargs="+", default=[30.0])
    ap.add_argument("--clips", type=int, default=768)
    ap.add_argument("--only", nargs="*", help="run only the grid rows whose name contains one of these")
    ap.add_argument("--budget_s", type=float, default=330.0, help="stop launching settings past this")
    ap.add_argument("--per_setting_timeout_s", type=float, default=240.0)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if args.one:
        one(json.loads(args.one))
        return
    if not args.model_dir:
        ap.error("--model_dir is required")
    grid = [g for g in GRID if not args.only or any(o in g[0] for o in args.only)]
    t_start, rows, skipped, longest = time.time(), [], [], 0.0
    with open(out_dir() / "sweep.log", "w") as log:
        for name, over, engines in grid:
            if time.time() - t_start + longest > args.budget_s:
                skipped.append(name)
                continue
            t = time.time()
            rows.append(launch(name, over, engines, args, log))
            longest = max(longest, time.time() - t)
            print(json.dumps(rows[-1]), flush=True)
    keys = [f"x_rt_{s:g}s" for s in args.seconds]
    print("\n| setting | " + " | ".join(f"x real time, {s:g} s clips" for s in args.seconds) + " | engine start s |")
    print("|---|" + "---|" * (len(keys) + 1))
    for r in rows:
        vals = [str(r.get(k, r.get("error", "-"))) for k in keys]
        print(f"| {r['setting']} | " + " | ".join(vals) + f" | {r.get('start_s', '-')} |")
    if skipped:
        print(f"not run (budget {args.budget_s:g} s): {', '.join(skipped)}")
    (out_dir() / "sweep.json").write_text(json.dumps({"rows": rows, "skipped": skipped, "clips": args.clips,
                                                      "seconds": args.seconds}, indent=1))


if __name__ == "__main__":
    main()
