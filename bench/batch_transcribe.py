"""Batch transcription benchmark: generated audio files on local disk -> jobs/transcribe.py's pipeline -> part files.

    GPU:  python bench/batch_transcribe.py --hours 10 --model_dir /tmp/m06 --out $OUT/batch.json
    CPU:  python bench/batch_transcribe.py --preset tiny --files 50 --backend hf --no_baseline

Real dimensions, random weights: a random model never emits EOS early, so every clip decodes
exactly --max_new_tokens tokens (48 ~ the transcript of a 15 s utterance).

The corpus (cached under --workdir, rebuilt only when its spec changes): a pool of distinct
speech-like segments (voiced harmonics of a drifting f0 under a syllable-rate envelope, 1-6 s)
is synthesised once in parallel; every file is then a different random sequence of pool
segments (random gains) cut to a length uniform in [--min_s, --max_s], plus its own fresh noise
floor, written as 16 kHz FLAC by all CPUs. So every file is distinct audio (vLLM cannot reuse an
encoder output between files) while synthesis stays cheap: 10 h takes well under a minute on 16
cores.

Reported: x real time end to end (the whole job: engine start-up, listing, decoding, writing)
and in steady state (first written block to last), GPU busy (nvidia-smi utilisation) over both
windows, each stage's start-up time, and the engine baseline: one VllmEngine in this process on
--baseline_clips files of the same corpus, timed like bench/transcribe_engine.py (one call),
with the same engine settings. `--record` appends the row to docs/benchmarks.md.
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


def engine_baseline(model_dir: str, engine_cfg, sampling, files: list[str]) -> dict:
    """The engine alone on the first `files` of the corpus: one transcribe call, as transcribe_engine.py."""
    from ark_ray.audio import load_audio
    from ark_ray.engines import make_engine

    waves = [load_audio(f) for f in files]
    engine = make_engine(model_dir, engine_cfg)
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
            "gpu_busy_pct": _round(gpu.busy(t, t1))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ark-asr-0.6b", choices=["tiny", "ark-asr-0.6b"])
    ap.add_argument("--hours", type=float, default=10.0, help="audio to generate (ignored with --files)")
    ap.add_argument("--files", type=int, default=None, help="generate this many files instead of --hours")
    ap.add_argument("--min_s", type=float, default=4.0)
    ap.add_argument("--max_s", type=float, default=26.0)
    ap.add_argument("--backend", default=None, choices=["vllm", "hf"], help="default: vllm if installed, else hf")
    ap.add_argument("--engines_per_gpu", type=int, default=1, help="engine actors sharing one GPU")
    ap.add_argument("--max_num_seqs", type=int, default=512, help="vLLM batch (GPU; CPU: 8)")
    ap.add_argument("--max_model_len", type=int, default=640)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--block_audio_s", type=float, default=240.0)
    ap.add_argument("--files_per_block", type=int, default=16)
    ap.add_argument("--engine_queue_audio_s", type=float, default=0.0, help="0: the job's default")
    ap.add_argument("--engine", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more EngineConfig keys for the job and the baseline, e.g. enforce_eager=true")
    ap.add_argument("--format", default="parquet", choices=["jsonl", "parquet"])
    ap.add_argument("--workdir", default="/tmp/ark-bench-batch")
    ap.add_argument("--model_dir", default=None, help="an existing model directory (default: random weights of --preset)")
    ap.add_argument("--baseline_clips", type=int, default=512, help="files of the corpus for the engine baseline")
    ap.add_argument("--no_baseline", action="store_true", help="skip the engine baseline")
    ap.add_argument("--out", default=None, help="also write the result JSON here")
    ap.add_argument("--record", action="store_true", help="append the result row to docs/benchmarks.md")
    args = ap.parse_args(argv)

    import importlib.util

    import ray
    import torch

    from ark_ray.config import TranscribeConfig, load_config
    from ark_ray.data.transcribe_pipeline import engine_plan, format_summary, run_transcribe
    from ark_ray.model.factory import save_random_model
    from ark_ray.runtime import init_ray

    gpu = torch.cuda.is_available()
    backend = args.backend or ("vllm" if importlib.util.find_spec("vllm") and
                               importlib.util.find_spec("ark_ray.engines.vllm_engine") else "hf")
    work = pathlib.Path(args.workdir)
    model_dir = pathlib.Path(args.model_dir) if args.model_dir else work / f"model-{args.preset}"
    if not (model_dir / "config.json").exists():
        save_random_model(model_dir, args.preset, seed=0, dtype=torch.bfloat16 if gpu else torch.float32)
    t = time.perf_counter()
    corpus = make_corpus(work / "audio", files=args.files, hours=None if args.files else args.hours,
                         min_s=args.min_s, max_s=args.max_s)
    corpus_s = time.perf_counter() - t
    print(f"corpus: {corpus['n_files']} files, {corpus['audio_s'] / 3600:.2f} h "
          f"({'cached' if corpus['cached'] else f'built in {corpus_s:.0f} s'})", flush=True)

    seqs = args.max_num_seqs if gpu else 8
    overrides = [
        f"--input={work / 'audio'}", f"--output={work / 'out'}", f"--model={model_dir}", f"--format={args.format}",
        "--overwrite", f"--engine.backend={backend}", f"--sampling.max_new_tokens={args.max_new_tokens}",
        f"--engine.max_num_seqs={seqs}", f"--engine.max_model_len={args.max_model_len}",
        f"--files_per_block={args.files_per_block}", f"--block_audio_s={args.block_audio_s}",
        f"--engine_queue_audio_s={args.engine_queue_audio_s}", f"--max_audio_s={max(3600.0, args.max_s)}",
        f"--engines_per_gpu={args.engines_per_gpu}",
    ] + [f"--engine.{kv}" for kv in args.engine]
    if gpu:
        overrides += ["--engine.num_gpus=1"]
    cfg = load_config(TranscribeConfig, None, overrides)

    init_ray()                                  # $RAY_ADDRESS if set, else a local Ray
    blocks: list[tuple[float, int, float]] = []
    try:
        n_engines, engine_cfg = engine_plan(cfg)
        with GpuSampler() as gpu_sampler:
            t0 = time.perf_counter()
            summary = run_transcribe(cfg, on_block=lambda rows, a: blocks.append((time.perf_counter(), rows, a)))
            t1 = time.perf_counter()
    finally:
        ray.shutdown()
    print(format_summary(summary), flush=True)

    audio_s = summary["audio_hours"] * 3600
    first, last = blocks[0][0], blocks[-1][0]
    steady_audio = sum(a for _, _, a in blocks[1:])
    result = {
        "preset": args.preset, "backend": backend, "machine": machine(), "files": summary["rows_written"],
        "audio_h": round(summary["audio_hours"], 3), "wall_s": round(t1 - t0, 2),
        "x_rt_end_to_end": round(audio_s / (t1 - t0), 1),
        "x_rt_steady": round(steady_audio / (last - first), 1) if last > first else None,
        "steady_s": round(last - first, 2), "blocks": len(blocks),
        "gpu_busy_total_pct": _round(gpu_sampler.busy(t0, t1)), "gpu_busy_steady_pct": _round(gpu_sampler.busy(first, last)),
        "startup": summary.get("startup"), "error_rows": summary["error_rows"], "engines": n_engines,
        "engines_per_gpu": args.engines_per_gpu, "max_num_seqs": seqs, "max_new_tokens": args.max_new_tokens,
        "block_audio_s": args.block_audio_s, "corpus": {k: corpus[k] for k in ("n_files", "audio_s", "pool_segments",
                                                                             "pool_audio_s", "cached")},
        "corpus_s": round(corpus_s, 1),
    }
    print("PIPELINE_JSON " + json.dumps(result), flush=True)    # kept even if the baseline fails
    if not args.no_baseline:
        files = sorted(str(p) for p in (work / "audio").glob("*.flac"))[:args.baseline_clips]
        single = __import__("dataclasses").replace(engine_cfg, num_gpus=1 if gpu else 0)
        try:
            _wait_gpu_memory_freed()
            result["engine_baseline"] = engine_baseline(str(model_dir), single, cfg.sampling, files)
        except Exception as ex:  # noqa: BLE001 - report the pipeline figures regardless
            result["engine_baseline"] = {"error": f"{type(ex).__name__}: {ex}"[:500]}
        if result["x_rt_steady"] and "x_rt" in result["engine_baseline"]:
            result["steady_vs_engine"] = round(result["x_rt_steady"] / result["engine_baseline"]["x_rt"], 3)
    result["targets"] = {"steady_vs_engine>=0.9": (result.get("steady_vs_engine") or 0) >= 0.9,
                         "gpu_busy_steady>=80": (result["gpu_busy_steady_pct"] or 0) >= 80,
                         "end_to_end>=1000x": result["x_rt_end_to_end"] >= 1000}
    cmd = "python bench/batch_transcribe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    base = result.get("engine_baseline")
    row = (f"| `{cmd}` | {result['machine']} | {backend}, {n_engines} engine(s), max_num_seqs {seqs}, "
           f"{args.max_new_tokens} new tokens, blocks {args.block_audio_s:g} s | {result['files']} files, "
           f"{result['audio_h']} h | **{result['x_rt_end_to_end']}x RT end to end** ({result['wall_s']} s wall), "
           f"**{_x(result['x_rt_steady'])} steady**"
           + (f" ({result.get('steady_vs_engine')} of the engine alone, {base['x_rt']}x)"
              if base and "x_rt" in base and result.get("steady_vs_engine") else "")
           + f", GPU busy {_pct(result['gpu_busy_steady_pct'])} steady / {_pct(result['gpu_busy_total_pct'])} "
           f"total; start-up {json.dumps(result['startup'])} |")
    print(row)
    print("RESULT_JSON " + json.dumps(result), flush=True)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.record:
        record(row)
    return result


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
    return "n/a (one block)" if v is None else f"{v}x"


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
