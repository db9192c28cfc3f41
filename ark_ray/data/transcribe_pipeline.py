"""The batch job (jobs/transcribe.py): list the inputs, skip what is done, run the transcriber on
Ray Data, write keyed part files, report.

Why this shape: the job is one Ray Data pipeline, the same `build_transcriber` a user composes
into their own: the listing's rows become a Dataset (blocks of `files_per_block` rows), the
transcriber decodes them in CPU tasks and runs an autoscaled pool of engine actors, and a write
stage turns each block into one part file and a row of counts, which stream back to the driver's
progress bar. The driver holds the listing (paths and metadata, never audio) and the counts.

Nothing is lost or doubled: every input row leaves exactly one output row (a bad file or an
unusable manifest row becomes an error row naming the reason; silent audio is transcribed and
flagged `silent`); each part file is named by the hash of its keys (a retried write rewrites the
same file); a rerun into the same output skips the keys already written (dropping any duplicate
first). When a node is lost, Ray Data reruns its tasks and restarts its engines elsewhere and the
job goes on; once it ends, a last pass over the output's keys removes any row written twice by
work redone after the loss.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from typing import Callable, Optional

import pyarrow as pa

from ark_ray import metrics
from ark_ray.config import TranscribeConfig
from ark_ray.console import JobConsole, table
from ark_ray.data.listing import load_inputs
from ark_ray.data.part_files import OUTPUT_COLUMNS, clean_output, prepare_output, write_manifest, write_part
from ark_ray.data.row_files import table_of


#: Engine actors in a row that may die while starting before the job fails (Ray Data's default: 0).
ENGINE_INIT_DEATHS = 2


def inputs_table(rows: list[dict]) -> pa.Table:
    """The listing as one Arrow table (every row's columns, one type per column), so every block and
    every part file of every rerun has the same column types. Unusable manifest rows carry their
    reason in `error`/`error_detail` (the transcriber keeps it)."""
    out = []
    for r in rows:
        row = {k: v for k, v in r.items() if not k.startswith("_")}
        row["error"], row["error_detail"] = r.get("_error"), r.get("_error_detail")
        for name in OUTPUT_COLUMNS:                   # a manifest column the output would overwrite
            if name not in ("error", "error_detail"):
                row.pop(name, None)
        out.append(row)
    _uniform_types(out)
    t = table_of(out)
    casts = {"error": pa.string(), "error_detail": pa.string(), "begin_time": pa.float64(), "end_time": pa.float64()}
    for name, typ in casts.items():
        if name in t.column_names and t.schema.field(name).type != typ:
            t = t.set_column(t.column_names.index(name), name, t.column(name).cast(typ))
    return t


def _uniform_types(rows: list[dict]) -> None:
    """A column whose values Arrow cannot hold in one type (a number here, a string there, as
    hand-written manifests have) is written as JSON text, so one odd row cannot stop the job."""
    names = {k for m in rows for k in m}
    for name in names:
        try:
            pa.array([m.get(name) for m in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            for m in rows:
                if name in m and m[name] is not None and not isinstance(m[name], str):
                    m[name] = json.dumps(m[name], ensure_ascii=False, default=str)


def resolve_input(cfg: TranscribeConfig, console: Optional[JobConsole] = None) -> str:
    """`cfg.input`, with demo://heldout[-N] made on first use (a line every 10 s while it is)."""
    if not str(cfg.input).startswith("demo://"):
        return cfg.input
    from ark_ray.demo import heldout

    last = [0.0]

    def report(done: int, n: int) -> None:
        if console is not None and (done == n or time.perf_counter() - last[0] > 10):
            last[0] = time.perf_counter()
            console.line(f"  generating held-out demo audio (first run only): {done}/{n}")
    return heldout.resolve(cfg.input, progress=report)


def run_transcribe(cfg: TranscribeConfig, console: Optional[JobConsole] = None,
                   on_block: Optional[Callable[[int, float], None]] = None) -> dict:
    """List, skip what is done, transcribe and write on Ray Data; returns the summary.

    `console` gets the event lines and the progress bar (None: both on stdout; the bar only
    with cfg.progress). The driver records the ark_batch_* metrics as each part file lands;
    `on_block(rows, audio_s)` is called then too (benchmarks time the stream). The summary's
    `startup` holds each stage's first result in seconds since the job began."""
    import ray

    from ark_ray.data import job_events
    from ark_ray.data.transcriber import build_transcriber
    from ark_ray.runtime import init_ray

    t0 = time.perf_counter()
    console = console or JobConsole()
    say = console.line
    rows = load_inputs(resolve_input(cfg, console), cfg.extensions, cfg.s3)
    prepare_output(cfg.output, cfg.s3, cfg.overwrite)
    done, removed = clean_output(cfg.output, cfg.s3, retry_errors=cfg.retry_errors)
    todo = [r for r in rows if r["key"] not in done]
    startup = {"listed_s": time.perf_counter() - t0}
    summary = {"inputs": len(rows), "skipped_done": len(rows) - len(todo), "rows_written": 0, "error_rows": 0,
               "errors_by_reason": {}, "audio_hours": 0.0, "output": cfg.output}
    if removed:
        say(f"removed {removed} duplicate row(s) an interrupted earlier run left in {cfg.output}")
    if not todo:
        say(f"all {len(rows)} inputs are already done in {cfg.output}: nothing to transcribe (--overwrite redoes "
            "them, --retry_errors retries the error rows)")
    if todo:
        init_ray(cfg.ray)
        startup["ray_s"] = time.perf_counter() - t0
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False          # the job's own bar; Ray Data's stats go to job.log
        ctx.print_on_execution_start = False
        # an engine whose node dies while it starts is replaced, not fatal; one that fails to build
        # every time (a bad model) still fails the job, with its error, on the third try
        if 0 <= ctx.max_consecutive_actor_init_deaths < ENGINE_INIT_DEATHS:     # -1: unlimited, kept
            ctx.max_consecutive_actor_init_deaths = ENGINE_INIT_DEATHS
        channel = job_events.new_channel()
        transcribe = build_transcriber(cfg, events=channel)
        summary["engines"] = (f"{transcribe.min_engines}" if transcribe.min_engines == transcribe.max_engines
                              else f"{transcribe.min_engines}..{transcribe.max_engines}")
        say(f"{len(todo)} inputs to transcribe ({summary['skipped_done']} already done) with "
            f"{summary['engines']} {cfg.engine.backend} engine(s), {_engine_resources(transcribe.engine)} each, "
            f"blocks of {cfg.files_per_block}")
        t = inputs_table(todo)
        n = cfg.files_per_block
        # from_blocks: one block per files_per_block rows, its metadata computed here (from_arrow would
        # first run a remote task per block, and on a fresh cluster wait for a worker to start)
        ds = ray.data.from_blocks([t.slice(i, n) for i in range(0, t.num_rows, n)])
        ds = transcribe(ds).map_batches(
            write_part, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
            fn_kwargs=dict(output=cfg.output, fmt=cfg.format, label_field=cfg.label_field, s3=cfg.s3))
        watch = job_events.ClusterWatch(channel, say, t0=time.time() - (time.perf_counter() - t0))
        tally = _Tally(console.start_bar(len(todo), "transcribe", "file", disable=not cfg.progress), t0, on_block)
        try:
            for counts in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for c in counts.to_pylist():
                    startup.setdefault("first_written_s", time.perf_counter() - t0)
                    tally.add(c)
        finally:
            console.close_bar()
            watch.stop()
        summary.update(rows_written=tally.rows, error_rows=tally.errors)
        startup["last_written_s"] = time.perf_counter() - t0
        startup.update({k: v for k, v in watch.summary().items() if k.startswith("engine")})
        summary["nodes_lost"] = len(watch.lost)
        if watch.lost:             # work redone after a loss may have written a row twice
            _, twice = clean_output(cfg.output, cfg.s3)
            if twice:
                say(f"removed {twice} row(s) written twice by work redone after the node loss")
                summary["rows_written"] -= twice
        summary["errors_by_reason"] = dict(tally.reasons)
        summary["audio_hours"] = tally.audio_s / 3600
    if cfg.label_field:
        summary["manifest"], summary["manifest_rows"] = write_manifest(cfg.output, cfg.format, cfg.label_field, cfg.s3)
    summary["wall_s"] = time.perf_counter() - t0
    summary["x_real_time"] = summary["audio_hours"] * 3600 / summary["wall_s"]
    summary["startup"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in startup.items()}
    if summary["rows_written"]:  # Ray is up: the job's final speed
        metrics.record_batch_speed(summary["audio_hours"] * 3600, summary["wall_s"])
    return summary


class _Tally:
    """The counts rows of the part files as they land: totals, the progress bar, the metrics."""

    def __init__(self, bar, t0: float, on_block: Optional[Callable[[int, float], None]]):
        self.bar, self.t0, self.on_block = bar, t0, on_block
        self.rows = self.errors = 0
        self.audio_s = 0.0
        self.reasons: Counter = Counter()

    def add(self, c: dict) -> None:
        block_reasons = json.loads(c["reasons"])
        self.rows += c["rows"]
        self.errors += c["errors"]
        self.audio_s += c["audio_s"]
        self.reasons.update(block_reasons)
        wall = time.perf_counter() - self.t0
        self.bar.update(c["rows"])
        self.bar.set_postfix_str(f"{self.audio_s / 3600:.2f} h audio | {self.audio_s / wall:.1f}x real time | "
                                 f"{self.errors} errors", refresh=False)
        metrics.record_batch_block(c["rows"], c["audio_s"], block_reasons)
        metrics.record_batch_speed(self.audio_s, wall)
        if self.on_block is not None:
            self.on_block(c["rows"], c["audio_s"])


def _engine_resources(eng) -> str:
    if eng.num_gpus > 0:
        return f"{eng.num_gpus:g} GPU"
    return f"{eng.num_cpus:g} CPU"


def summary_rows(s: dict) -> list[tuple[str, str]]:
    """The closing table's rows."""
    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [(k, fmt(s[k])) for k in ("inputs", "skipped_done", "rows_written", "error_rows", "audio_hours", "wall_s",
                                     "x_real_time", "output", "manifest", "manifest_rows", "engines", "nodes_lost")
            if k in s]
    st = s.get("startup", {})
    for k in ("listed_s", "ray_s", "engines_ready_s", "engine_build_s", "first_written_s", "last_written_s"):
        if k in st:
            rows.append((f"start-up: {k}", fmt(st[k])))
    rows += [(f"errors: {reason}", str(n)) for reason, n in sorted(s.get("errors_by_reason", {}).items())]
    return rows


def format_summary(s: dict) -> str:
    return table(summary_rows(s))
