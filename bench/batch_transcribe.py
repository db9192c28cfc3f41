"""Batch transcription benchmark: the Ray Data job beside the engine alone, cold and warm engine starts.

    GPU:  python bench/batch_transcribe.py --hours 10 --model_dir /tmp/m06 --out $OUT/batch10h.json
          python bench/batch_transcribe.py --hours 100 --model_dir /tmp/m06 --variants job_warm baseline
    CPU:  python bench/batch_transcribe.py --preset tiny --hours 0.05 --max_num_seqs 8 --baseline_clips 32

Real dimensions, random weights: a random model never emits EOS early, so every clip decodes
exactly --max_new_tokens tokens (48 ~ the transcript of a 15 s utterance).

The input (cached under --workdir, rebuilt only when its spec changes): --long_files FLAC files of
--long_s seconds of speech-like audio (make_corpus's generator: pool segments in random order and
gains plus each file's own noise floor), and a manifest of windows over them, each a random
length in [--min_s, --max_s] at a random offset, until --hours of audio. Every window is distinct
audio (no two start at the same sample) while the files stay few: 100 h of rows need 10.7 h of
files at the defaults, built in seconds on all CPUs, and the driver holds only the manifest rows.

Variants, in this order, each printed as one row (and all in RESULT_JSON):
  job_cold   jobs/transcribe.py's pipeline (run_transcribe) with an empty engine cache dir
             (--cache_dir, wiped first): a fresh node's first start;
  job_warm   the same again with that cache dir as the first run left it: a node that ran the job;
  baseline   one VllmEngine in this process on the first --baseline_clips windows, one transcribe
             call (as bench/transcribe_engine.py), same engine settings.
Per job variant: steady x real time (first written part file to the last), GPU busy over the same
window (nvidia-smi), end-to-end x real time (run_transcribe's wall time: listing, engine start,
decode, write; not Ray's own start, which a cluster under `ray job submit` has already paid) and
the engine's start (build time inside its actor, and when it was ready). `--record` appends the
rows to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ark_ray.audio import SAMPLE_RATE as SR  # noqa: E402


# ------------------------------------------------------------------ inputs


def _speechlike(seconds: float, seed: int, sr: int = SR) -> np.ndarray:
    """Voiced bursts: harmonics of a drifting f0 under a syllable-rate envelope (no noise)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6.3)), 0, None) ** 2
    wave = voiced * envelope
    return (wave / max(1e-6, np.abs(wave).max())).astype(np.float32)


_POOL: list = []


def _pool_init(pool_path: str) -> None:
    _POOL[:] = list(np.load(pool_path, allow_pickle=True))


def _pool_segment(args) -> np.ndarray:
    seconds, seed = args
    return _speechlike(seconds, seed)


def _write_file(args) -> float:
    """One corpus file: pool segments in a random order with random gains, cut, plus fresh noise."""
    import soundfile as sf

    path, seconds, seed = args
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    parts, have = [], 0
    while have < n:
        seg = _POOL[int(rng.integers(len(_POOL)))] * rng.uniform(0.3, 1.0)
        parts.append(seg)
        have += len(seg)
    wave = np.concatenate(parts)[:n] * 0.4 + 0.01 * rng.standard_normal(n).astype(np.float32)
    sf.write(path, np.clip(wave, -1, 1), SR, format="FLAC")
    return seconds


def make_corpus(folder: pathlib.Path, *, files: int | None, hours: float | None, min_s: float, max_s: float,
                seed: int = 0, pool_size: int = 512) -> dict:
    """FLAC files with lengths uniform in [min_s, max_s] until `files` or `hours`; reused when unchanged."""
    spec = {"files": files, "hours": hours, "min_s": min_s, "max_s": max_s, "seed": seed, "pool": pool_size,
            "kind": "pool-mix-v1"}
    stamp = folder / "corpus.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == spec:
        return {**json.loads(stamp.read_text()), "cached": True}
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.flac"):
        old.unlink()
    rng = np.random.default_rng(seed)
    jobs, total = [], 0.0
    while (files is not None and len(jobs) < files) or (files is None and total < hours * 3600):
        secs = float(rng.uniform(min_s, max_s))
        jobs.append((str(folder / f"clip{len(jobs):06d}.flac"), secs, seed * 1_000_003 + len(jobs)))
        total += secs
    procs = max(1, (os.cpu_count() or 2) - 1)
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        segs = pool.map(_pool_segment, [(float(rng.uniform(1.0, 6.0)), seed * 7919 + i) for i in range(pool_size)])
    pool_path = folder / "pool.npy"
    arr = np.empty(len(segs), dtype=object)
    arr[:] = segs
    np.save(pool_path, arr, allow_pickle=True)
    with ctx.Pool(procs, initializer=_pool_init, initargs=(str(pool_path),)) as pool:
        pool.map(_write_file, jobs, chunksize=8)
    pool_path.unlink()
    info = {"spec": spec, "n_files": len(jobs), "audio_s": total, "pool_segments": pool_size,
            "pool_audio_s": float(sum(len(s) for s in segs) / SR), "build_s": round(time.perf_counter() - t0, 1)}
    stamp.write_text(json.dumps(info))
    return {**info, "cached": False}


# ------------------------------------------------------------------ GPU sampling


class GpuSampler:
    """nvidia-smi utilisation every 100 ms, with timestamps (no GPU: no samples)."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._proc = None

    def __enter__(self):
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            return self
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                _, util = line.split(",")
                self.samples.append((time.perf_counter(), float(util)))
            except ValueError:
                continue

    def busy(self, t0: float, t1: float) -> float | None:
        vals = [u for t, u in self.samples if t0 <= t <= t1]
        return float(np.mean(vals)) if vals else None

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()


# ------------------------------------------------------------------ run


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return f"{n}x {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    except ImportError:
        pass
    return f"CPU only ({platform.processor() or platform.machine()}), {os.cpu_count()} cores"


def make_window_corpus(folder: pathlib.Path, *, hours: float, min_s: float, max_s: float, long_files: int,
                       long_s: float, seed: int = 0) -> dict:
    """`long_files` files of `long_s` seconds (make_corpus) and a manifest of windows over them until
    `hours` of audio; the manifest is rebuilt when its spec changes, the files when theirs does."""
    files = make_corpus(folder / "long", files=long_files, hours=None, min_s=long_s, max_s=long_s, seed=seed)
    spec = {"hours": hours, "min_s": min_s, "max_s": max_s, "long": files["spec"], "kind": "windows-v1"}
    manifest = folder / f"windows-{hours:g}h.jsonl"
    stamp = manifest.with_suffix(".json")
    if manifest.exists() and stamp.exists() and json.loads(stamp.read_text()).get("spec") == spec:
        return {**json.loads(stamp.read_text()), "manifest": str(manifest), "cached": files["cached"]}
    rng = np.random.default_rng(seed + 1)
    paths = sorted(str(p) for p in (folder / "long").glob("*.flac"))
    total, n = 0.0, 0
    with open(manifest, "w") as f:
        while total < hours * 3600:
            dur = float(rng.uniform(min_s, max_s))
            begin = float(rng.uniform(0, long_s - dur - 0.01))
            f.write(json.dumps({"audio": paths[int(rng.integers(len(paths)))], "begin_time": round(begin, 4),
                                "end_time": round(begin + dur, 4)}) + "\n")
            total += dur
            n += 1
    info = {"spec": spec, "rows": n, "audio_s": total, "files": len(paths), "files_audio_s": len(paths) * long_s}
    stamp.write_text(json.dumps(info))
    return {**info, "manifest": str(manifest), "cached": False}


PREVIOUS = ("the previous driver (hand-written Ray tasks and actors), 10 h on 1x H200: steady 3316-4493x RT, "
            "GPU busy 58 % steady, end to end 191x RT, engine build 157-170 s (rows above)")


#: Part files a run must write before its first-to-last rate means a steady state.
MIN_STEADY_PARTS = 10


def job_variant(name: str, cfg, cache_dir: pathlib.Path) -> dict:
    """run_transcribe once, timing each part file as it lands; GPU busy over the steady window."""
    import shutil

    from ark_ray.data.transcribe_pipeline import run_transcribe

    if name == "job_cold":
        shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    blocks: list[tuple[float, int, float]] = []
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        summary = run_transcribe(cfg, on_block=lambda rows, a: blocks.append((time.perf_counter(), rows, a)))
        t1 = time.perf_counter()
    audio_s = summary["audio_hours"] * 3600
    first, last = blocks[0][0], blocks[-1][0]
    st = summary.get("startup", {})
    return {"variant": name, "files": summary["rows_written"], "audio_h": round(summary["audio_hours"], 3),
            "error_rows": summary["error_rows"], "wall_s": round(t1 - t0, 2),
            "x_rt_end_to_end": round(audio_s / (t1 - t0), 1),
            "x_rt_steady": (round(sum(a for _, _, a in blocks[1:]) / (last - first), 1)
                            if len(blocks) >= MIN_STEADY_PARTS and last > first else None),
            "steady_s": round(last - first, 2), "part_files": len(blocks),
            "gpu_busy_steady_pct": _round(gpu.busy(first, last)), "gpu_busy_total_pct": _round(gpu.busy(t0, t1)),
            "engine_build_s": (st.get("engine_build_s") or [None])[0],
            "engine_ready_s": (st.get("engines_ready_s") or [None])[0],
            "first_written_s": st.get("first_written_s"), "startup": st}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ark-asr-0.6b", choices=["tiny", "ark-asr-0.6b"])
    ap.add_argument("--hours", type=float, default=10.0, help="audio in the manifest")
    ap.add_argument("--min_s", type=float, default=4.0)
    ap.add_argument("--max_s", type=float, default=26.0)
    ap.add_argument("--long_files", type=int, default=64, help="files the windows are cut from")
    ap.add_argument("--long_s", type=float, default=600.0, help="length of each of those files")
    ap.add_argument("--variants", nargs="+", default=["job_cold", "job_warm", "baseline"],
                    choices=["job_cold", "job_warm", "baseline"])
    ap.add_argument("--backend", default=None, choices=["vllm", "hf"], help="default: vllm if installed, else hf")
    ap.add_argument("--engines_per_gpu", type=int, default=1, help="engine actors sharing one GPU")
    ap.add_argument("--max_num_seqs", type=int, default=512, help="vLLM batch")
    ap.add_argument("--max_model_len", type=int, default=640)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--files_per_block", type=int, default=32)
    ap.add_argument("--engine_calls", type=int, default=0, help="0: the job's default")
    ap.add_argument("--engine", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more EngineConfig keys for the job and the baseline, e.g. enforce_eager=true")
    ap.add_argument("--format", default="parquet", choices=["jsonl", "parquet"])
    ap.add_argument("--workdir", default="/tmp/ark-bench-batch")
    ap.add_argument("--cache_dir", default=None, help="the job's engine caches (default: <workdir>/engine-cache); "
                    "job_cold empties it first")
    ap.add_argument("--model_dir", default=None, help="an existing model directory (default: random weights of --preset)")
    ap.add_argument("--baseline_clips", type=int, default=512, help="windows for the engine baseline")
    ap.add_argument("--out", default=None, help="also write the result JSON here")
    ap.add_argument("--record", action="store_true", help="append the rows to docs/benchmarks.md")
    args = ap.parse_args(argv)

    import dataclasses
    import importlib.util

    import ray
    import torch

    from ark_ray.config import TranscribeConfig, load_config
    from ark_ray.data.transcriber import engine_calls, engine_pool
    from ark_ray.model.factory import save_random_model
    from ark_ray.runtime import init_ray

    gpu = torch.cuda.is_available()
    backend = args.backend or ("vllm" if importlib.util.find_spec("vllm") and
                               importlib.util.find_spec("ark_ray.engines.vllm_engine") else "hf")
    work = pathlib.Path(args.workdir)
    cache_dir = pathlib.Path(args.cache_dir or work / "engine-cache")
    model_dir = pathlib.Path(args.model_dir) if args.model_dir else work / f"model-{args.preset}"
    if not (model_dir / "config.json").exists():
        save_random_model(model_dir, args.preset, seed=0, dtype=torch.bfloat16 if gpu else torch.float32)
    t = time.perf_counter()
    corpus = make_window_corpus(work / "windows", hours=args.hours, min_s=args.min_s, max_s=args.max_s,
                                long_files=args.long_files, long_s=args.long_s)
    corpus_s = time.perf_counter() - t
    print(f"input: {corpus['rows']} windows, {corpus['audio_s'] / 3600:.2f} h, over {corpus['files']} files of "
          f"{args.long_s:g} s ({'cached' if corpus['cached'] else f'built in {corpus_s:.0f} s'})", flush=True)

    overrides = [
        f"--input={corpus['manifest']}", f"--output={work / 'out'}", f"--model={model_dir}", f"--format={args.format}",
        "--overwrite", f"--engine.backend={backend}", f"--sampling.max_new_tokens={args.max_new_tokens}",
        f"--engine.max_num_seqs={args.max_num_seqs}", f"--engine.max_model_len={args.max_model_len}",
        f"--files_per_block={args.files_per_block}", f"--engine_calls={args.engine_calls}",
        f"--max_audio_s={max(3600.0, args.max_s)}", f"--engines_per_gpu={args.engines_per_gpu}",
        f"--engine.cache_dir={cache_dir}", "--progress=false",
    ] + [f"--engine.{kv}" for kv in args.engine]
    if gpu:
        overrides += ["--engine.num_gpus=1"]
    cfg = load_config(TranscribeConfig, None, overrides)

    rows: list[dict] = []
    jobs = [v for v in args.variants if v != "baseline"]
    if jobs:
        init_ray()                                  # $RAY_ADDRESS if set, else a local Ray
        try:
            least, most, engine_cfg = engine_pool(cfg)
            for name in jobs:
                r = job_variant(name, cfg, cache_dir)
                r.update(engines=f"{least}..{most}" if least != most else str(most), engine_calls=engine_calls(cfg))
                rows.append(r)
                print("VARIANT_JSON " + json.dumps(r), flush=True)
        finally:
            ray.shutdown()
    if "baseline" in args.variants:
        manifest = [json.loads(line) for line in open(corpus["manifest"])][:args.baseline_clips]
        single = dataclasses.replace(cfg.engine, num_gpus=1 if gpu else 0, cache_dir=str(cache_dir))
        try:
            _wait_gpu_memory_freed()
            b = engine_baseline(str(model_dir), single, cfg.sampling, manifest)
        except Exception as ex:  # noqa: BLE001 - report the job's figures regardless
            b = {"error": f"{type(ex).__name__}: {ex}"[:500]}
        rows.append({"variant": "baseline", **b})
        print("VARIANT_JSON " + json.dumps(rows[-1]), flush=True)

    base = next((r for r in rows if r["variant"] == "baseline" and "x_rt" in r), None)
    for r in rows:
        if r["variant"] != "baseline" and base and r.get("x_rt_steady"):
            r["steady_vs_engine"] = round(r["x_rt_steady"] / base["x_rt"], 3)
    result = {"preset": args.preset, "backend": backend, "machine": machine(), "hours": args.hours,
              "max_num_seqs": args.max_num_seqs, "max_new_tokens": args.max_new_tokens,
              "files_per_block": args.files_per_block, "corpus": {k: corpus[k] for k in ("rows", "audio_s", "files",
                                                                                       "files_audio_s", "cached")},
              "corpus_s": round(corpus_s, 1), "variants": rows, "previous": PREVIOUS}
    result["targets"] = _targets(rows, args.hours)
    cmd = "python bench/batch_transcribe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table_rows = [_row(cmd, result, r) for r in rows]
    print("\n".join(table_rows))
    print(f"previous: {PREVIOUS}")
    print("RESULT_JSON " + json.dumps(result), flush=True)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.record:
        for row in table_rows:
            record(row)
    return result


def engine_baseline(model_dir: str, engine_cfg, sampling, rows: list[dict]) -> dict:
    """The engine alone on the manifest's first rows: one transcribe call, as transcribe_engine.py."""
    from ark_ray.audio import load_audio
    from ark_ray.engines import make_engine

    waves = [load_audio(r["audio"], begin_time=r["begin_time"], end_time=r["end_time"]) for r in rows]
    t = time.perf_counter()
    engine = make_engine(model_dir, engine_cfg)
    build_s = time.perf_counter() - t
    try:
        engine.transcribe(waves[:8], sampling)                  # warm-up
        with GpuSampler() as gpu:
            t = time.perf_counter()
            engine.transcribe(waves, sampling)
            t1 = time.perf_counter()
    finally:
        engine.close()
    dt = t1 - t
    audio_s = sum(len(w) for w in waves) / SR
    return {"clips": len(waves), "audio_s": round(audio_s, 1), "wall_s": round(dt, 2), "x_rt": round(audio_s / dt, 1),
            "gpu_busy_pct": _round(gpu.busy(t, t1)), "engine_build_s": round(build_s, 1)}


def _targets(rows: list[dict], hours: float) -> dict:
    """Issue 26's targets (an H200): steady >= 0.95x the engine, GPU busy >= 85 % steady, end to end at
    100 h >= 2500x, a warm engine start <= 40 s."""
    out = {}
    for r in rows:
        v = r["variant"]
        if v == "baseline":
            continue
        out[f"{v}: steady_vs_engine>=0.95"] = (r.get("steady_vs_engine") or 0) >= 0.95
        out[f"{v}: gpu_busy_steady>=85"] = (r.get("gpu_busy_steady_pct") or 0) >= 85
        if hours >= 100:
            out[f"{v}: end_to_end>=2500x"] = r["x_rt_end_to_end"] >= 2500
        if v == "job_warm":
            out["job_warm: engine_build<=40s"] = (r.get("engine_build_s") or 1e9) <= 40
    return out


def _row(cmd: str, result: dict, r: dict) -> str:
    setup = (f"{result['backend']}, max_num_seqs {result['max_num_seqs']}, {result['max_new_tokens']} new tokens, "
             f"blocks of {result['files_per_block']}")
    if r["variant"] == "baseline":
        if "x_rt" not in r:
            return f"| `{cmd}` | {result['machine']} | baseline (engine alone) | - | failed: {r.get('error')} |"
        return (f"| `{cmd}` | {result['machine']} | baseline: one VllmEngine, one call; {setup} | {r['clips']} windows, "
                f"{r['audio_s'] / 3600:.2f} h | **{r['x_rt']}x RT**, GPU busy {_pct(r['gpu_busy_pct'])}, "
                f"engine build {r['engine_build_s']} s |")
    return (f"| `{cmd}` | {result['machine']} | {r['variant']}: Ray Data job, {r['engines']} engine(s), "
            f"{r['engine_calls']} blocks each; {setup} | {r['files']} windows, {r['audio_h']} h | "
            f"**steady {_x(r['x_rt_steady'])}**" + (f" ({r['steady_vs_engine']} of the engine alone)"
                                                    if r.get("steady_vs_engine") else "")
            + f", GPU busy {_pct(r['gpu_busy_steady_pct'])} steady / {_pct(r['gpu_busy_total_pct'])} total; "
            f"**end to end {r['x_rt_end_to_end']}x RT** ({r['wall_s']} s wall); engine build {r['engine_build_s']} s, "
            f"ready at {r['engine_ready_s']} s, first part file at {r['first_written_s']} s; {r['error_rows']} error rows |")


def _wait_gpu_memory_freed(limit_mib: float = 4096, timeout_s: float = 60) -> None:
    """Until every GPU holds less than `limit_mib` (the pipeline's engine processes have exited)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return
        used = [float(x) for x in out.split() if x.strip()]
        if not used or max(used) < limit_mib:
            return
        time.sleep(1)


def _round(v):
    return None if v is None else round(v, 1)


def _x(v) -> str:
    return f"n/a (< {MIN_STEADY_PARTS} part files)" if v is None else f"{v}x"


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0f} %"


SECTION = "## Batch transcription"
HEADER = ("| command | machine | setup | input | figure |\n|---|---|---|---|---|")


def record(row: str, path: pathlib.Path = REPO / "docs" / "benchmarks.md") -> None:
    """Append `row` to the batch table of docs/benchmarks.md (creating the section if needed)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{HEADER}\n"
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    end = len(text) if nxt < 0 else nxt
    section = text[start:end].rstrip("\n") + "\n" + row + "\n"
    path.write_text(text[:start] + section + ("\n" + text[end:].lstrip("\n") if nxt >= 0 else ""))


if __name__ == "__main__":
    main()
