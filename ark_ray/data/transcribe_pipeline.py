"""Batch transcription on Ray: inputs (paths) -> decode (CPU tasks) -> engine actors -> part files.

Why this shape: decoding and resampling are CPU work spread over tasks so the engine actors
(one or more per GPU) only run the model. The engines are created when the job starts and load
while the inputs are listed and decoded; then every block moves on as soon as its stage is
done (no barrier between stages), the driver keeping each engine supplied with queued audio.
The driver holds paths, object refs and per-block counts, never waveforms.

Nothing is lost or doubled: every input row leaves exactly one output row (a bad file or an
unusable manifest row becomes an error row naming the reason; silent audio is transcribed and
flagged `silent`), each block is written as one part file named by the hash of
its input keys (a retried task rewrites the same file), and a rerun into the same output reads
the keys already written and skips them (dropping any duplicate first).

The stages live beside this driver: `decode_stage` (container sniffing and decoding),
`engine_stage` (the engine actors) and `part_files` (writing, resume, the label manifest).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pickle
import time
from collections import Counter
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from ark_ray import metrics
from ark_ray.config import ConfigError, EngineConfig, SamplingConfig, TranscribeConfig
from ark_ray.data.decode_stage import decode_block
from ark_ray.data.listing import load_inputs
from ark_ray.data.part_files import (OUTPUT_FIELDS, done_keys, list_parts, prepare_output, write_batch,
                                     write_manifest)
from ark_ray.data.row_files import table_of
from ark_ray.data.s3 import resolve
from ark_ray.runtime import engine_actor_options, init_ray


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def _items_and_schema(rows: list[dict], label_field: Optional[str]) -> tuple[list[dict], pa.Schema]:
    """Pipeline items (key, audio, segment, pickled metadata) and the fixed output schema.

    The schema comes from all input rows, so every part file (of every rerun) has the same
    column types even when a block's values are all null.
    """
    metas, items = [], []
    for r in rows:
        meta = {k: v for k, v in r.items() if k not in ("key", "_error", "_error_detail")}
        metas.append(meta)
        items.append({"key": r["key"], "audio": r["audio"],
                      "begin_time": float("nan") if r.get("begin_time") is None else float(r["begin_time"]),
                      "end_time": float("nan") if r.get("end_time") is None else float(r["end_time"]),
                      "row_error": r.get("_error", ""), "row_error_detail": r.get("_error_detail", ""),
                      "meta": meta})
    _uniform_types(metas)
    for it, meta in zip(items, metas):
        it["meta"] = pickle.dumps(meta)
    out_names = {f.name for f in OUTPUT_FIELDS}
    fields = []
    for f in table_of(metas).schema:
        if f.name in out_names:
            continue
        if label_field and f.name == label_field:
            f = f.with_name(f"reference_{label_field}")
        fields.append(f)
    fields += OUTPUT_FIELDS
    if label_field and label_field not in out_names:
        fields.append(pa.field(label_field, pa.string()))
    return items, pa.schema(fields)


def _uniform_types(metas: list[dict]) -> None:
    """A column whose values Arrow cannot hold in one type (a number here, a string there, as
    hand-written manifests have) is written as JSON text, so one odd row cannot stop the job."""
    names = {k for m in metas for k in m}
    for name in names:
        try:
            pa.array([m.get(name) for m in metas])
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            for m in metas:
                if name in m and m[name] is not None and not isinstance(m[name], str):
                    m[name] = json.dumps(m[name], ensure_ascii=False, default=str)


def engine_plan(cfg: TranscribeConfig) -> tuple[int, EngineConfig]:
    """(engine actors, each one's EngineConfig): `engines_per_gpu` engines share each GPU."""
    eng = cfg.engine
    if eng.num_gpus <= 0:
        return max(1, cfg.num_engines), eng
    eng = dataclasses.replace(eng, num_gpus=eng.num_gpus / cfg.engines_per_gpu)
    if cfg.num_engines > 0:
        return cfg.num_engines, eng
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < eng.num_gpus:
        raise ConfigError(f"engine.num_gpus={cfg.engine.num_gpus} but the cluster has {gpus:g} GPUs "
                          "(set engine.num_gpus=0 for CPU engine actors)")
    return max(1, int(math.floor(gpus / eng.num_gpus + 1e-6))), eng


def start_engines(n: int, model_dir: str, eng: EngineConfig, sampling: SamplingConfig) -> list:
    """Create the engine actors now; they load while the driver lists and the CPUs decode.

    A dead engine actor is restarted and its unfinished calls are retried (the part files
    make a retried block harmless).
    """
    import ray

    from ark_ray.data.engine_stage import EngineStage

    # a CPU engine: memory= model + sized KV cache, and its environment whatever the cluster's
    actor = ray.remote(EngineStage).options(**engine_actor_options(model_dir, eng), max_concurrency=ENGINE_CALLS,
                                            max_restarts=3, max_task_retries=3)
    return [actor.remote(model_dir, eng, sampling) for _ in range(n)]


def stop_engines(engines: list, timeout_s: float = 60.0) -> None:
    import ray

    try:
        ray.wait([e.close.remote() for e in engines], num_returns=len(engines), timeout=timeout_s)
    finally:
        for e in engines:
            ray.kill(e, no_restart=True)


#: Calls an engine actor runs at once (threads); the driver's audio budget decides how many it gets.
ENGINE_CALLS = 128



def _block_of(items: list[dict]) -> dict:
    return {"key": np.array([it["key"] for it in items], dtype=object),
            "audio": np.array([it["audio"] for it in items], dtype=object),
            "begin_time": np.array([it["begin_time"] for it in items], np.float64),
            "end_time": np.array([it["end_time"] for it in items], np.float64),
            "row_error": np.array([it["row_error"] for it in items], dtype=object),
            "row_error_detail": np.array([it["row_error_detail"] for it in items], dtype=object),
            "meta": np.array([it["meta"] for it in items], dtype=object)}


class _Blocks:
    """Cuts the inputs into blocks lazily: the first `files_per_block` files each, then as many
    files as make `block_audio_s` seconds at the mean duration decoded so far."""

    def __init__(self, items: list[dict], cfg: TranscribeConfig):
        self.items, self.pos, self.cfg = items, 0, cfg
        self.files, self.audio_s = 0, 0.0

    def seen(self, rows: int, audio_s: float) -> None:
        self.files += rows
        self.audio_s += audio_s

    def __bool__(self) -> bool:
        return self.pos < len(self.items)

    def next(self) -> list[dict]:
        n = self.cfg.files_per_block
        if self.cfg.block_audio_s > 0 and self.audio_s > 0:
            n = max(1, int(round(self.cfg.block_audio_s / (self.audio_s / self.files))))
        out = self.items[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def stream(items: list[dict], engines: list, cfg: TranscribeConfig, schema: pa.Schema,
           label_field: Optional[str], t0: float, on_written: Callable[[dict], None]) -> dict:
    """Decode tasks -> engine actors -> write tasks, each block moving on as soon as it is ready.

    The driver holds only object refs and counts. Decoding runs ahead of the engines by at most
    `decode_ahead` blocks; each engine is handed blocks until `engine_queue_audio_s` seconds
    of audio wait at it (the least loaded first), so it never runs dry while blocks decode,
    transfer and get written. Returns the stage times (seconds since `t0`).
    """
    import ray

    decode = ray.remote(decode_block).options(num_cpus=1, num_returns=2, max_retries=3)
    write = ray.remote(write_batch).options(num_cpus=0.25, max_retries=3)
    ahead = cfg.decode_ahead if cfg.decode_ahead > 0 else 2 * _cluster_cpus()
    queue_s = cfg.engine_queue_audio_s if cfg.engine_queue_audio_s > 0 else 40.0 * cfg.engine.max_num_seqs
    blocks = _Blocks(items, cfg)
    times: dict = {"engines_ready_s": [None] * len(engines)}
    ready_refs = {e.ready.remote(): i for i, e in enumerate(engines)}
    decoding: dict = {}       # info ref -> block ref
    decoded: list = []        # (block ref, audio_s) waiting for an engine
    at_engine: dict = {}      # result ref -> (engine index, audio_s)
    writing: set = set()
    load = [0.0] * len(engines)
    write_kwargs = {"output": cfg.output, "fmt": cfg.format, "schema": schema, "label_field": label_field,
                    "s3": cfg.s3}

    def mark(name: str) -> None:
        times.setdefault(name, time.perf_counter() - t0)

    while blocks or decoding or decoded or at_engine or writing:
        while blocks and len(decoding) + len(decoded) < ahead:
            info, block = decode.remote(_block_of(blocks.next()), cfg.s3, cfg.max_audio_s, cfg.silence_dbfs,
                                        cfg.silent_is_error)
            decoding[info] = block
        while decoded:
            i = min(range(len(engines)), key=load.__getitem__)
            ref, audio_s = decoded[0]
            if load[i] > 0 and load[i] + audio_s > queue_s:
                break
            decoded.pop(0)
            load[i] += audio_s
            at_engine[engines[i].transcribe_block.remote(ref)] = (i, audio_s)
        refs = list(ready_refs) + list(decoding) + list(at_engine) + list(writing)
        done, _ = ray.wait(refs, num_returns=1, timeout=1.0, fetch_local=False)
        if not done:
            continue
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        for ref in done:
            if ref in ready_refs:
                i = ready_refs.pop(ref)
                timing = ray.get(ref)             # raises if the engine could not start
                times["engines_ready_s"][i] = round(time.perf_counter() - t0, 2)
                times.setdefault("engine_build_s", []).append(round(timing["build_s"], 2))
            elif ref in decoding:
                info = ray.get(ref)
                mark("first_decoded_s")
                blocks.seen(info["rows"], info["audio_s"])
                decoded.append((decoding.pop(ref), info["audio_s"]))
            elif ref in at_engine:
                i, audio_s = at_engine.pop(ref)
                load[i] -= audio_s
                mark("first_transcribed_s")
                writing.add(write.remote(ref, **write_kwargs))
            else:
                writing.discard(ref)
                mark("first_written_s")
                counts = ray.get(ref)
                times["last_written_s"] = time.perf_counter() - t0
                on_written(counts)
    return times     # an engine still starting when the last block landed keeps None


def _is_rerun(cfg: TranscribeConfig) -> bool:
    """The output already holds part files that this run will keep."""
    if cfg.overwrite:
        return False
    fs, root = resolve(cfg.output, cfg.s3)
    return bool(list_parts(fs, root))


def run_transcribe(cfg: TranscribeConfig, on_block: Optional[Callable[[int, float], None]] = None) -> dict:
    """Start the engines, list, skip what is done, stream the blocks; returns the summary.

    The engine actors are created first: they load while the inputs are listed and decoded.
    The driver records the ark_batch_* metrics as each block's part file lands (files, audio
    seconds, error rows by reason) and the speed so far (the last value is the summary's).
    `on_block(rows, audio_s)` is called as each part file lands (benchmarks time the stream).
    The summary's `startup` holds each stage's first result in seconds since the job began.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    label_field = cfg.label_field
    model_dir = cfg.model_dir()
    cfg.engine.check_installed()
    engines: list = []
    startup: dict = {}
    if not _is_rerun(cfg):            # a rerun lists first: it may have nothing left to do
        init_ray(cfg.ray)
        startup["ray_s"] = time.perf_counter() - t0
        n, eng = engine_plan(cfg)
        engines = start_engines(n, model_dir, eng, cfg.sampling)
    try:
        rows = load_inputs(cfg.input, cfg.extensions, cfg.s3)
        prepare_output(cfg.output, cfg.s3, cfg.overwrite)
        done = done_keys(cfg.output, cfg.s3, retry_errors=cfg.retry_errors)
        startup["listed_s"] = time.perf_counter() - t0
        todo = [r for r in rows if r["key"] not in done]
        summary = {"inputs": len(rows), "skipped_done": len(rows) - len(todo), "rows_written": 0,
                   "error_rows": 0, "errors_by_reason": {}, "audio_hours": 0.0, "output": cfg.output}
        if todo:
            if not engines:
                init_ray(cfg.ray)
                n, eng = engine_plan(cfg)
                engines = start_engines(n, model_dir, eng, cfg.sampling)
            items, schema = _items_and_schema(rows, label_field)
            todo_keys = {r["key"] for r in todo}
            items = [it for it in items if it["key"] in todo_keys]
            reasons: Counter = Counter()
            audio = [0.0]
            with tqdm(total=len(items), unit="file", desc="transcribe", disable=not cfg.progress) as bar:
                def written(c: dict) -> None:
                    block_reasons = json.loads(c["reasons"])
                    summary["rows_written"] += c["rows"]
                    summary["error_rows"] += c["errors"]
                    audio[0] += c["audio_s"]
                    reasons.update(block_reasons)
                    bar.update(c["rows"])
                    bar.set_postfix(audio_h=f"{audio[0] / 3600:.2f}", errors=summary["error_rows"])
                    metrics.record_batch_block(c["rows"], c["audio_s"], block_reasons)
                    metrics.record_batch_speed(audio[0], time.perf_counter() - t0)
                    if on_block is not None:
                        on_block(c["rows"], c["audio_s"])

                startup.update(stream(items, engines, cfg, schema, label_field, t0, written))
            summary["errors_by_reason"] = dict(reasons)
            summary["audio_hours"] = audio[0] / 3600
            summary["engines"] = len(engines)
    finally:
        if engines:
            stop_engines(engines)
    if label_field:
        summary["manifest"], summary["manifest_rows"] = write_manifest(cfg.output, cfg.format, label_field, cfg.s3)
    summary["wall_s"] = time.perf_counter() - t0
    summary["x_real_time"] = summary["audio_hours"] * 3600 / summary["wall_s"]
    summary["startup"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in startup.items()}
    if summary["rows_written"]:  # Ray is up: the job's final speed
        metrics.record_batch_speed(summary["audio_hours"] * 3600, summary["wall_s"])
    return summary


def format_summary(s: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for k in ("inputs", "skipped_done", "rows_written", "error_rows", "audio_hours", "wall_s",
              "x_real_time", "output", "manifest", "manifest_rows"):
        if k not in s:
            continue
        v = s[k]
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    if s.get("engines"):
        lines.append(f"| engines | {s['engines']} |")
    for stage, v in s.get("startup", {}).items():
        lines.append(f"| start-up: {stage} | {v} |")
    for reason, n in sorted(s.get("errors_by_reason", {}).items()):
        lines.append(f"| errors: {reason} | {n} |")
    return "\n".join(lines)
