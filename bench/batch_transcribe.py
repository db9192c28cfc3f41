"""Batch transcription benchmark: generated audio files on local disk -> jobs' Ray Data pipeline -> part files.

    GPU:  python bench/batch_transcribe.py --hours 1 --preset ark-asr-0.6b
    CPU:  python bench/batch_transcribe.py --preset tiny --files 50

Real dimensions, random weights: a random model never emits EOS early, so every clip decodes
exactly --max_new_tokens tokens (48 ~ the transcript of a 15 s utterance). Reported: audio
seconds per wall second (x real time) over the whole run (engine start-up included) and over
the streaming window (first to last written block), GPU busy % (nvidia-smi's utilisation:
the share of time a kernel was running) over both, and files/s. `--record` appends the row to
docs/benchmarks.md.
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


# ------------------------------------------------------------------ inputs


def _speechlike(seconds: float, seed: int, sr: int = 16000) -> np.ndarray:
    """Voiced bursts (harmonics of a drifting f0 under a syllable-rate envelope) over room noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6.3)), 0, None) ** 2
    wave = 0.2 * voiced * envelope + 0.01 * rng.standard_normal(n)
    return (wave / max(1e-6, np.abs(wave).max()) * 0.5).astype(np.float32)


def _write_one(args) -> float:
    import soundfile as sf

    path, seconds, seed = args
    sf.write(path, _speechlike(seconds, seed), 16000, format="FLAC")
    return seconds


def make_corpus(folder: pathlib.Path, *, files: int | None, hours: float | None, min_s: float, max_s: float,
                seed: int = 0) -> dict:
    """FLAC files with lengths uniform in [min_s, max_s] until `files` or `hours`; reused when unchanged."""
    spec = {"files": files, "hours": hours, "min_s": min_s, "max_s": max_s, "seed": seed}
    stamp = folder / "corpus.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == spec:
        return json.loads(stamp.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.flac"):
        old.unlink()
    rng = np.random.default_rng(seed)
    jobs, total = [], 0.0
    while (files is not None and len(jobs) < files) or (files is None and total < hours * 3600):
        secs = float(rng.uniform(min_s, max_s))
        jobs.append((str(folder / f"clip{len(jobs):06d}.flac"), secs, seed * 1_000_003 + len(jobs)))
        total += secs
    with mp.get_context("spawn").Pool(max(1, (os.cpu_count() or 2) - 1)) as pool:
        pool.map(_write_one, jobs, chunksize=8)
    info = {"spec": spec, "n_files": len(jobs), "audio_s": total}
    stamp.write_text(json.dumps(info))
    return info


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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ark-asr-0.6b", choices=["tiny", "ark-asr-0.6b"])
    ap.add_argument("--hours", type=float, default=1.0, help="audio to generate (ignored with --files)")
    ap.add_argument("--files", type=int, default=None, help="generate this many files instead of --hours")
    ap.add_argument("--min_s", type=float, default=4.0)
    ap.add_argument("--max_s", type=float, default=26.0)
    ap.add_argument("--backend", default=None, choices=["vllm", "hf"], help="default: vllm if installed, else hf")
    ap.add_argument("--engines_per_gpu", type=int, default=2,
                    help="engine actors sharing one GPU (one featurizes while another decodes)")
    ap.add_argument("--batch_size", type=int, default=None, help="clips per engine call (default 256 GPU, 8 CPU)")
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--files_per_block", type=int, default=16)
    ap.add_argument("--format", default="parquet", choices=["jsonl", "parquet"])
    ap.add_argument("--workdir", default="/tmp/ark-bench-batch")
    ap.add_argument("--model_dir", default=None, help="an existing model directory (default: random weights of --preset)")
    ap.add_argument("--record", action="store_true", help="append the result row to docs/benchmarks.md")
    args = ap.parse_args(argv)

    import importlib.util

    import ray
    import torch

    from ark_ray.config import TranscribeConfig, load_config
    from ark_ray.data.transcribe_pipeline import format_summary, run_transcribe
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
    print(f"corpus: {corpus['n_files']} files, {corpus['audio_s'] / 3600:.2f} h ({time.perf_counter() - t:.0f} s)")

    n_gpus = torch.cuda.device_count() if gpu else 0
    per_gpu = max(1, args.engines_per_gpu)
    overrides = [
        f"--input={work / 'audio'}", f"--output={work / 'out'}", f"--model={model_dir}", f"--format={args.format}",
        "--overwrite", f"--engine.backend={backend}", f"--sampling.max_new_tokens={args.max_new_tokens}",
        f"--batch_size={args.batch_size or (256 if gpu else 8)}", f"--files_per_block={args.files_per_block}",
        f"--max_audio_s={max(3600.0, args.max_s)}",
    ]
    if gpu:
        overrides += [f"--engine.num_gpus={1 / per_gpu}", f"--num_engines={n_gpus * per_gpu}",
                      f"--engine.gpu_memory_utilization={0.85 / per_gpu:.3f}", "--engine.max_num_seqs=256"]
    cfg = load_config(TranscribeConfig, None, overrides)

    init_ray()                                  # $RAY_ADDRESS if set, else a local Ray
    blocks: list[tuple[float, int, float]] = []
    try:
        with GpuSampler() as gpu_sampler:
            t0 = time.perf_counter()
            summary = run_transcribe(cfg, on_block=lambda rows, a: blocks.append((time.perf_counter(), rows, a)))
            t1 = time.perf_counter()
    finally:
        ray.shutdown()
    print(format_summary(summary))

    audio_s = summary["audio_hours"] * 3600
    first, last = blocks[0][0], blocks[-1][0]
    stream_audio = sum(a for _, _, a in blocks[1:])
    result = {
        "preset": args.preset, "backend": backend, "machine": machine(), "files": summary["rows_written"],
        "audio_h": round(summary["audio_hours"], 3), "wall_s": round(t1 - t0, 2),
        "x_rt_total": round(audio_s / (t1 - t0), 1),
        "x_rt_stream": round(stream_audio / (last - first), 1) if last > first else None,
        "files_per_s": round(summary["rows_written"] / (t1 - t0), 2),
        "gpu_busy_total_pct": gpu_sampler.busy(t0, t1), "gpu_busy_stream_pct": gpu_sampler.busy(first, last),
        "error_rows": summary["error_rows"], "engines": cfg.num_engines or 1, "batch_size": cfg.batch_size,
        "max_new_tokens": args.max_new_tokens,
    }
    cmd = "python bench/batch_transcribe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    row = (f"| `{cmd}` | {result['machine']} | {result['backend']}, {result['engines']} engine(s), batch "
           f"{result['batch_size']}, {args.max_new_tokens} new tokens | {result['files']} files, "
           f"{result['audio_h']} h | {result['x_rt_total']}x RT total ({result['wall_s']} s wall), "
           f"{_x(result['x_rt_stream'])} RT streaming, {result['files_per_s']} files/s, GPU busy "
           f"{_pct(result['gpu_busy_total_pct'])} total / {_pct(result['gpu_busy_stream_pct'])} streaming |")
    print(row)
    print("RESULT_JSON " + json.dumps(result))
    if args.record:
        record(row)
    return result


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
