"""OPD throughput: the async pipeline against `--mode sync` (one stage at a time), in one run.

    GPU:  python bench/opd_throughput.py --steps 20                 (real dims, jobs/configs/opd_ark06.yaml)
    CPU:  python bench/opd_throughput.py --preset tiny --steps 6    (smoke run, jobs/configs/opd_tiny.yaml)

One OpdController (rollout on vLLM, teacher scorer, DeepSpeed learner) serves both modes, so they
share actors, weights and warm caches: `--warmup` sync steps (not timed: CUDA graphs, allocator),
then `--steps` learner steps in each mode, in `--order` (async first by default; the calls it
left in flight are drained before the next mode starts). Random weights: a random model never
emits EOS, so every clip decodes sampling.max_new_tokens tokens and every step does the same
work. Real dimensions without a Qwen download: the tiny tokenizer with vocab_size 163958.

Reported per mode: trained samples per wall second over the mode's steps (stale samples dropped
by the async pipeline do not count), GPU busy fraction over the same window (NVML utilisation,
the share of time a kernel ran, sampled every 200 ms; nvidia-smi when pynvml is missing; n/a on
CPU), mean stage times and queue depths from metrics.jsonl; then the async/sync ratio.
Extra `--key=value` arguments override the OPD config (e.g. --sync_every=2).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {"ark-asr-0.6b": REPO / "jobs/configs/opd_ark06.yaml", "tiny": REPO / "jobs/configs/opd_tiny.yaml"}
REAL_VOCAB = 163958   # ARK-ASR's vocabulary size; the tiny tokenizer covers the first ~1.1k ids


# ------------------------------------------------------------------ GPU busy sampling


class GpuBusy:
    """Utilisation of every visible GPU every `period_s`, timestamped; no GPU: no samples."""

    def __init__(self, period_s: float = 0.2):
        self.period_s = period_s
        self.samples: list[tuple[float, float]] = []   # (perf_counter, mean utilisation 0..1)
        self.source = "n/a"
        self._stop = threading.Event()
        self._proc = None

    def __enter__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            if handles:
                self.source = "nvml"
                threading.Thread(target=self._poll_nvml, args=(pynvml, handles), daemon=True).start()
                return self
        except Exception:  # no pynvml, no driver: try nvidia-smi
            pass
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", str(int(self.period_s * 1000))],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            return self
        self.source = "nvidia-smi"
        threading.Thread(target=self._read_smi, daemon=True).start()
        return self

    def _poll_nvml(self, pynvml, handles) -> None:
        while not self._stop.wait(self.period_s):
            util = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
            self.samples.append((time.perf_counter(), float(np.mean(util)) / 100))

    def _read_smi(self) -> None:
        # one line per GPU per period; consecutive lines within a period are averaged by busy()
        for line in self._proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip()) / 100))
            except ValueError:
                continue

    def busy(self, t0: float, t1: float) -> float | None:
        vals = [u for t, u in self.samples if t0 <= t <= t1]
        return round(float(np.mean(vals)), 3) if vals else None

    def __exit__(self, *exc):
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()


# ------------------------------------------------------------------ inputs


def ensure_models(student: pathlib.Path, teacher: pathlib.Path, preset: str, gpu: bool,
                  teacher_overrides: dict) -> None:
    """Random-weight student and teacher of `preset` where no checkpoint is (one shared tokenizer)."""
    import torch

    from ark_ray.demo.corpus import vocabulary_texts
    from ark_ray.model.factory import save_random_model
    from ark_ray.model.processor import ArkAsrProcessor
    from ark_ray.model.tokenizer import build_tiny_tokenizer

    missing = [p for p in (student, teacher) if not (p / "config.json").exists()]
    if not missing:
        return
    have = student if student not in missing else (teacher if teacher not in missing else None)
    tok = (ArkAsrProcessor.from_pretrained(str(have)).tokenizer if have is not None
           else build_tiny_tokenizer(vocabulary_texts(), vocab_size=1024))
    extra = {"vocab_size": REAL_VOCAB} if preset != "tiny" else {}
    dtype = torch.bfloat16 if gpu else torch.float32
    for path in missing:
        t = time.perf_counter()
        over = dict(extra, **(teacher_overrides if path == teacher else {}))
        save_random_model(path, preset, tokenizer=tok, seed=1 if path == teacher else 2, dtype=dtype, **over)
        print(f"random {preset} model {'(teacher) ' if path == teacher else ''}-> {path} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)


def synthetic_manifest(folder: pathlib.Path, clips: int, min_s: float, max_s: float) -> pathlib.Path:
    """Speech-like FLAC clips (bench/batch_transcribe.py's generator) and an unlabelled manifest."""
    from bench.batch_transcribe import make_corpus

    make_corpus(folder / "audio", files=clips, hours=None, min_s=min_s, max_s=max_s)
    import soundfile as sf

    path = folder / "manifest.jsonl"
    with open(path, "w") as f:
        for p in sorted((folder / "audio").glob("*.flac")):
            f.write(json.dumps({"id": p.stem, "audio": str(p), "duration": sf.info(str(p)).duration}) + "\n")
    return path


# ------------------------------------------------------------------ one mode


def run_mode(ctl, mode: str, steps: int, gpu: GpuBusy) -> dict:
    """`steps` learner steps in `mode` on the running controller; figures over exactly that window."""
    first = len(ctl.history)
    dropped0 = ctl.dropped_stale
    ctl.cfg.steps = ctl.step + steps
    t0 = time.perf_counter()
    (ctl.run_async if mode == "async" else ctl.run_sync)()
    t1 = time.perf_counter()
    ctl.drain()
    recs = ctl.history[first:]
    samples = sum(r["samples"] for r in recs)

    def mean(key):
        vals = [r[key] for r in recs if r.get(key) is not None]
        return round(float(np.mean(vals)), 3) if vals else None

    return {
        "mode": mode, "steps": len(recs), "samples": samples, "wall_s": round(t1 - t0, 2),
        "samples_per_s": round(samples / (t1 - t0), 3), "gpu_busy": gpu.busy(t0, t1),
        "dropped_stale": ctl.dropped_stale - dropped0,
        "rollout_s": mean("rollout_s"), "teacher_s": mean("teacher_s"), "learner_s": mean("learner_s"),
        "queue_rollout": mean("queue_rollout"), "queue_teacher": mean("queue_teacher"),
        "queue_learner": mean("queue_learner"), "staleness": mean("staleness"),
        "kl_first": recs[0]["kl"] if recs else None, "kl_last": recs[-1]["kl"] if recs else None,
        "sync_s": mean("sync_s"), "peak_mem_gb": max([r.get("peak_mem_gb") or 0 for r in recs] or [0]) or None,
    }


def bench_env() -> bool:
    """The offline, quiet environment the benchmark's actors inherit; True when a GPU is visible."""
    import torch

    gpu = torch.cuda.is_available()
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                 "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(k, v)
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return gpu


def machine(gpu: bool) -> str:
    import platform

    import torch

    if gpu:
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"CPU only ({platform.processor() or platform.machine()}), {os.cpu_count()} cores"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--preset", default="ark-asr-0.6b", choices=list(CONFIGS))
    ap.add_argument("--config", default=None, help="OPD config (default: by preset, see above)")
    ap.add_argument("--steps", type=int, default=20, help="learner steps timed in each mode")
    ap.add_argument("--warmup", type=int, default=1, help="sync steps before timing (not reported)")
    ap.add_argument("--order", default="async,sync", help="modes in the order they run")
    ap.add_argument("--corpus", default=None, choices=["synthetic", "demo"],
                    help="synthetic speech-like clips (default for real dims) or assets/demo_corpus (tiny)")
    ap.add_argument("--clips", type=int, default=128, help="synthetic clips (reused round-robin)")
    ap.add_argument("--min_s", type=float, default=3.0)
    ap.add_argument("--max_s", type=float, default=12.0)
    ap.add_argument("--teacher_overrides", default="{}",
                    help='JSON ArkAsrConfig overrides for the random teacher, e.g. a bigger decoder: '
                         '\'{"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, '
                         '"num_attention_heads": 16, "num_key_value_heads": 8}\'')
    ap.add_argument("--seed_row", action="store_true",
                    help="also time the shape of open-audio-opd's OPD training script: HF generate rollouts, "
                         "HF teacher, one stage at a time (sync mode, new actors)")
    ap.add_argument("--workdir", default="/tmp/ark-bench-opd")
    ap.add_argument("--out", default=None, help="result JSON (default: WORKDIR/opd_throughput_PRESET.json)")
    args, overrides = ap.parse_known_args(argv)

    gpu = bench_env()

    import ray

    from ark_ray.config import OpdConfig, load_config, parse_overrides
    from ark_ray.opd.controller import OpdController
    from ark_ray.runtime import init_ray

    work = pathlib.Path(args.workdir)
    modes = [m.strip() for m in args.order.split(",") if m.strip()]
    if sorted(modes) != ["async", "sync"]:
        raise SystemExit(f"--order must name async and sync once each, got {args.order!r}")
    corpus = args.corpus or ("demo" if args.preset == "tiny" else "synthetic")
    over: dict = {"output_dir": str(work / f"run-{args.preset}-{int(time.time())}"), "eval_manifest": None,
                  "eval_every": 0, "save_every": 0, "resume": False,
                  "steps": args.warmup + len(modes) * args.steps}          # the learner's LR schedule length
    if args.preset == "tiny":  # the tiny config names the trained demo models; a benchmark wants random ones
        over.update(student=str(work / "models-tiny/student"), teacher=str(work / "models-tiny/teacher"))
    if corpus == "synthetic":
        over["train_manifest"] = str(synthetic_manifest(work / "corpus", args.clips, args.min_s, args.max_s))
    else:
        over["train_manifest"] = str(REPO / "assets/demo_corpus/train_sample.jsonl")
    user = parse_overrides(overrides)
    cfg = load_config(OpdConfig, args.config or CONFIGS[args.preset], {**over, **user})
    for key in ("student", "teacher", "train_manifest"):   # actors may not share the driver's cwd
        p = pathlib.Path(getattr(cfg, key))
        setattr(cfg, key, str(p if p.is_absolute() else (REPO / p)))
    ensure_models(pathlib.Path(cfg.student), pathlib.Path(cfg.teacher), args.preset, gpu,
                  json.loads(args.teacher_overrides))

    init_ray(cfg.ray)
    results: dict = {}
    t_start = time.perf_counter()
    with GpuBusy() as sampler:
        ctl = OpdController(cfg)
        try:
            startup_s = time.perf_counter() - t_start
            print(f"actors up in {startup_s:.0f} s; {args.warmup} warm-up step(s)", flush=True)
            if args.warmup:
                run_mode(ctl, "sync", args.warmup, sampler)
            for mode in modes:
                print(f"--- {mode}: {args.steps} steps", flush=True)
                results[mode] = run_mode(ctl, mode, args.steps, sampler)
                print(json.dumps(results[mode]), flush=True)
            ctl.weights.wait()   # the last weight push lands first
            summary_startup = dict(ctl.startup)
        finally:
            ctl.shutdown()
        if args.seed_row:   # open-audio-opd's shape on the same models and data: HF rollouts, sync
            seed_cfg = load_config(OpdConfig, args.config or CONFIGS[args.preset],
                                   {**over, **user, "output_dir": over["output_dir"] + "-seed",
                                    "rollout_engine": {**user.get("rollout_engine", {}), "backend": "hf"},
                                    "staged_startup": False})
            for key in ("student", "teacher", "train_manifest"):
                setattr(seed_cfg, key, getattr(cfg, key))
            ctl = OpdController(seed_cfg)
            try:
                print(f"--- seed shape (HF rollouts, sync): {args.steps} steps", flush=True)
                if args.warmup:
                    run_mode(ctl, "sync", args.warmup, sampler)
                results["seed"] = run_mode(ctl, "sync", args.steps, sampler)
                print(json.dumps(results["seed"]), flush=True)
            finally:
                ctl.shutdown()
        ray.shutdown()
    a, s = results["async"]["samples_per_s"], results["sync"]["samples_per_s"]
    result = {
        "preset": args.preset, "machine": machine(gpu), "gpu_busy_source": sampler.source,
        "config": {k: getattr(cfg, k) for k in ("rollout_batch_size", "topk", "sync_every", "max_staleness",
                                                "max_inflight", "num_rollout_workers", "num_teacher_workers")}
        | {"max_new_tokens": cfg.sampling.max_new_tokens, "corpus": corpus,
           "rollout_gpus": cfg.rollout_engine.num_gpus, "teacher_gpus": cfg.teacher_engine.num_gpus,
           "learner_gpus": cfg.learner.num_gpus if cfg.learner.use_gpu else 0},
        "startup_s": round(startup_s, 1), "startup": {k: round(v, 1) for k, v in summary_startup.items()},
        "async": results["async"], "sync": results["sync"],
        "async_over_sync": round(a / s, 3) if s else None,
    }
    if "seed" in results:
        result["seed"] = results["seed"]
        result["async_over_seed"] = round(a / results["seed"]["samples_per_s"], 3)
    out = pathlib.Path(args.out or work / f"opd_throughput_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    busy = {m: ("n/a" if results[m]["gpu_busy"] is None else f"{results[m]['gpu_busy']:.0%}") for m in modes}
    print(f"\nasync {a:.3f} samples/s (GPU busy {busy['async']}), sync {s:.3f} samples/s "
          f"(GPU busy {busy['sync']}): async/sync = {result['async_over_sync']}x  -> {out}")
    print("RESULT_JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
