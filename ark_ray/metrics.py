"""Every Prometheus metric ark-ray exports, in one table, recorded through `ray.util.metrics`.

Why one table: the dashboards (dashboards/build.py), the docs and the tests all read `REGISTRY`,
so a metric cannot be recorded without being on a dashboard, or charted without being recorded.

Names follow `ark_<area>_<what>_<unit>`; counters end in `_total`. Ray's metrics agent serves
them with a `ray_` prefix (`ark_opd_loss` -> `ray_ark_opd_loss`; a histogram adds `_bucket`,
`_sum`, `_count`) on each node's metrics export port, next to labels it adds itself
(`SessionName`, `NodeAddress`, `Component`, `WorkerId`, ...).

Ray metric objects are created lazily, once per process, in the process that records (a driver,
task, actor or Serve replica), because they belong to that process's Ray core worker. Usage:

    from ark_ray import metrics
    metrics.record("ark_opd_loss", 0.42)
    metrics.record("ark_batch_error_rows_total", 3, {"reason": "silent"})
    metrics.record_serve_request("/v1/audio/transcriptions", 200, latency_s=0.8, audio_s=12.0)

`record` raises KeyError for an unknown name, ValueError for wrong tag keys or a bad value,
and RuntimeError when Ray is not initialised in the calling process (nothing would export it).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Mapping, Optional

Kind = Literal["counter", "gauge", "histogram"]

#: Ray's metrics agent exports user metrics under this namespace (ray/_private/telemetry).
PROMETHEUS_PREFIX = "ray_"

_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: what Ray is told when the metric is created."""

    name: str
    kind: Kind
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()  # histogram bucket upper bounds (seconds etc.)

    @property
    def area(self) -> str:
        return self.name.split("_")[1]

    @property
    def prometheus_name(self) -> str:
        """The name Prometheus stores (before a histogram's _bucket/_sum/_count)."""
        return PROMETHEUS_PREFIX + self.name

    def series(self) -> tuple[str, ...]:
        """Every series name this metric produces on the scrape endpoint."""
        base = self.prometheus_name
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


_SPECS = (
    # ---------------------------------------------------------------- on-policy distillation
    MetricSpec("ark_opd_step", "gauge", "Learner optimizer steps done in this run."),
    MetricSpec("ark_opd_policy_version", "gauge",
               "Student weight version last pushed to the rollout workers."),
    MetricSpec("ark_opd_loss", "gauge", "OPD loss of the last step (tau^2 * KL over the union + tail)."),
    MetricSpec("ark_opd_kl_nats", "gauge",
               "Forward KL(teacher || student) per token over the top-k union plus tail bucket."),
    MetricSpec("ark_opd_union_size_tokens", "gauge",
               "Mean size of the teacher-top-k union student-top-k id set per position."),
    MetricSpec("ark_opd_teacher_mass_ratio", "gauge",
               "Teacher probability mass on the union (1 - tail bucket), mean over positions."),
    MetricSpec("ark_opd_student_mass_ratio", "gauge",
               "Student probability mass on the union, mean over positions."),
    MetricSpec("ark_opd_learning_rate", "gauge", "Learner learning rate at the last step."),
    MetricSpec("ark_opd_staleness_versions", "gauge",
               "Mean policy-version lag of the trajectories the last step trained on."),
    MetricSpec("ark_opd_queue_depth_batches", "gauge",
               "Batches waiting or in flight per pipeline queue (rollout, teacher, learner).",
               ("queue",)),
    MetricSpec("ark_opd_stage_duration_seconds", "histogram",
               "Wall time of one batch in a pipeline stage (rollout, teacher, learner), and of each weight sync (sync).",
               ("stage",), _SECONDS_BUCKETS),
    MetricSpec("ark_opd_samples_per_second", "gauge",
               "Trained samples per second of wall time between the last two learner steps."),
    MetricSpec("ark_opd_samples_total", "counter", "Samples the learner trained on."),
    MetricSpec("ark_opd_rollout_wer_ratio", "gauge",
               "WER of the student's rollout transcripts against the references, last batch."),
    MetricSpec("ark_opd_dropped_stale_samples_total", "counter",
               "Trajectory samples dropped for being more than max_staleness versions old."),
    MetricSpec("ark_opd_recoveries_total", "counter",
               "Lost actors brought back mid-run, by role (rollout, teacher: Ray restarted it and its work was "
               "redone; learner: the group restarted from the last checkpoint).", ("role",)),
    MetricSpec("ark_opd_unmapped_positions_total", "counter",
               "Response tokens left out of the loss because the teacher's vocabulary has no such token "
               "(qwen3_asr teacher; 0 with a shared vocabulary)."),
    # ---------------------------------------------------------------- supervised fine-tuning
    MetricSpec("ark_sft_step", "gauge", "SFT learner steps done in this run (it goes back when the group restarts "
               "from a checkpoint)."),
    MetricSpec("ark_sft_loss", "gauge", "SFT token cross-entropy of the last step."),
    MetricSpec("ark_sft_samples_total", "counter", "Utterances the SFT learner trained on (steps trained again after "
               "a restart count again)."),
    MetricSpec("ark_sft_recoveries_total", "counter",
               "Restarts of the SFT learner group from its last checkpoint after a rank failed or was lost with its "
               "node, by role.", ("role",)),
    # ---------------------------------------------------------------- batch transcription
    MetricSpec("ark_batch_files_total", "counter", "Input files written as output rows (errors included)."),
    MetricSpec("ark_batch_audio_seconds_total", "counter", "Seconds of audio transcribed."),
    MetricSpec("ark_batch_error_rows_total", "counter",
               "Output rows carrying an error, by reason (AudioError.reason or engine_error).",
               ("reason",)),
    MetricSpec("ark_batch_speed_times_realtime", "gauge",
               "Audio seconds transcribed per wall-clock second since the job started."),
    # ---------------------------------------------------------------- serving
    MetricSpec("ark_serve_requests_total", "counter", "HTTP requests answered, by route and status code.",
               ("route", "status")),
    MetricSpec("ark_serve_request_latency_seconds", "histogram",
               "Time from request received to response complete, by route.",
               ("route",), _LATENCY_BUCKETS),
    MetricSpec("ark_serve_audio_seconds_total", "counter", "Seconds of audio in successful transcriptions."),
    MetricSpec("ark_serve_errors_total", "counter", "Requests answered with an error, by status code.",
               ("status",)),
    MetricSpec("ark_serve_model_requests_total", "counter",
               "Transcription requests by the model version they were routed to (the served model or a canary) "
               "and status (499: the client went away).", ("version", "status")),
    MetricSpec("ark_serve_model_latency_seconds", "histogram",
               "Transcription time by model version, from routing to the last byte.", ("version",), _LATENCY_BUCKETS),
    MetricSpec("ark_serve_window_retries_total", "counter",
               "Audio windows resubmitted to another replica because theirs was lost (node gone, actor died), "
               "by model version.", ("version",)),
)

REGISTRY: Mapping[str, MetricSpec] = MappingProxyType({s.name: s for s in _SPECS})

_lock = threading.Lock()
_created: dict[str, Any] = {}          # name -> ray.util.metrics object, per process


def spec(name: str) -> MetricSpec:
    """The registry entry; KeyError naming the known metrics if `name` is not one."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; ark_ray.metrics.REGISTRY has: "
                       f"{', '.join(sorted(REGISTRY))}") from None


def _metric(s: MetricSpec):
    import ray
    from ray.util import metrics as rm

    if not ray.is_initialized():
        raise RuntimeError(f"cannot record {s.name}: Ray is not initialised in this process "
                           "(call ray.init() first, or record from a Ray task/actor/replica)")
    with _lock:
        m = _created.get(s.name)
        if m is None:
            if s.kind == "counter":
                m = rm.Counter(s.name, s.description, tag_keys=s.tag_keys)
            elif s.kind == "gauge":
                m = rm.Gauge(s.name, s.description, tag_keys=s.tag_keys)
            else:
                m = rm.Histogram(s.name, s.description, boundaries=list(s.boundaries), tag_keys=s.tag_keys)
            _created[s.name] = m
        return m


def _tags(s: MetricSpec, tags: Optional[Mapping[str, Any]]) -> dict[str, str]:
    given = dict(tags or {})
    if set(given) != set(s.tag_keys):
        raise ValueError(f"{s.name} takes tags {list(s.tag_keys)}, got {sorted(given)}")
    return {k: str(v) for k, v in given.items()}


def record(name: str, value: float, tags: Optional[Mapping[str, Any]] = None) -> None:
    """Record one value: a counter is incremented by it, a gauge set to it, a histogram observes it.

    Tag values may be any object (they are exported as str); the keys must be exactly the spec's.
    A counter takes a finite value >= 0 (an increment of 0 changes nothing and is allowed, so a
    caller can pass a count that happens to be zero); a histogram a finite value; a gauge any float
    (a NaN loss should be visible on the dashboard, not hidden).
    """
    s = spec(name)
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name}: value must be a real number, got {type(value).__name__}")
    try:
        value = float(value)  # int, float, numpy scalars
    except (TypeError, ValueError):
        raise TypeError(f"{name}: value must be a real number, got {type(value).__name__}") from None
    if s.kind != "gauge" and not math.isfinite(value):
        raise ValueError(f"{name}: {s.kind} value must be finite, got {value}")
    if s.kind == "counter" and value < 0:
        raise ValueError(f"{name}: a counter only goes up; got increment {value}")
    t = _tags(s, tags)
    m = _metric(s)
    if s.kind == "counter":
        if value > 0:
            m.inc(value, tags=t)
    elif s.kind == "gauge":
        m.set(value, tags=t)
    else:
        m.observe(value, tags=t)


# --------------------------------------------------------------------------------- helpers
class _StepTracker:
    """Per-process memory needed to turn the controller's cumulative figures into increments."""

    def __init__(self) -> None:
        self.last_time: Optional[float] = None
        self.last_dropped = 0


_opd = _StepTracker()


def record_opd_step(rec: Mapping[str, Any]) -> None:
    """Export one learner step, as the OPD controller logs it to metrics.jsonl.

    Keys read: step, version, kl, samples (required); loss (defaults to kl), union_size,
    teacher_mass, student_mass, lr, staleness, rollout_s, teacher_s, learner_s, sync_s, rollout_wer,
    unmapped_positions (this step's), dropped_stale (cumulative), samples_per_s (optional; None values are skipped, since e.g. a
    batch without references has no WER). Without samples_per_s the rate is measured between
    consecutive calls in this process, so it appears from the second step on.
    """
    missing = [k for k in ("step", "version", "kl", "samples") if rec.get(k) is None]
    if missing:
        raise KeyError(f"record_opd_step: step record lacks {missing}")
    now = time.monotonic()
    record("ark_opd_step", rec["step"])
    record("ark_opd_policy_version", rec["version"])
    record("ark_opd_kl_nats", rec["kl"])
    record("ark_opd_loss", rec["loss"] if rec.get("loss") is not None else rec["kl"])
    record("ark_opd_samples_total", rec["samples"])
    for key, name in (("union_size", "ark_opd_union_size_tokens"), ("teacher_mass", "ark_opd_teacher_mass_ratio"),
                      ("student_mass", "ark_opd_student_mass_ratio"), ("lr", "ark_opd_learning_rate"),
                      ("staleness", "ark_opd_staleness_versions"), ("rollout_wer", "ark_opd_rollout_wer_ratio")):
        if rec.get(key) is not None:
            record(name, rec[key])
    for stage in ("rollout", "teacher", "learner"):   # stage "sync": one per weight sync, by the controller
        if rec.get(f"{stage}_s") is not None:
            record("ark_opd_stage_duration_seconds", rec[f"{stage}_s"], {"stage": stage})
    if rec.get("unmapped_positions") is not None:
        record("ark_opd_unmapped_positions_total", rec["unmapped_positions"])
    if rec.get("dropped_stale") is not None:
        total = int(rec["dropped_stale"])
        record("ark_opd_dropped_stale_samples_total", max(0, total - _opd.last_dropped))
        _opd.last_dropped = total
    if rec.get("samples_per_s") is not None:
        record("ark_opd_samples_per_second", rec["samples_per_s"])
    elif _opd.last_time is not None and now > _opd.last_time:
        record("ark_opd_samples_per_second", rec["samples"] / (now - _opd.last_time))
    _opd.last_time = now


def record_opd_queues(**depths: int) -> None:
    """Queue depths of the async pipeline, e.g. record_opd_queues(rollout=2, teacher=1, learner=0)."""
    if not depths:
        raise ValueError("record_opd_queues needs at least one queue=depth")
    for queue, depth in depths.items():
        record("ark_opd_queue_depth_batches", depth, {"queue": queue})


def record_batch_block(files: int, audio_s: float, errors_by_reason: Mapping[str, int]) -> None:
    """One written block of a batch transcription job (the counts row `write_part` returns)."""
    record("ark_batch_files_total", files)
    record("ark_batch_audio_seconds_total", audio_s)
    for reason, n in errors_by_reason.items():
        record("ark_batch_error_rows_total", n, {"reason": reason})


def record_batch_speed(audio_s_total: float, wall_s: float) -> None:
    """Times real time so far: audio seconds done / wall seconds elapsed."""
    if wall_s <= 0:
        raise ValueError(f"wall_s must be > 0, got {wall_s}")
    record("ark_batch_speed_times_realtime", audio_s_total / wall_s)


def record_serve_request(route: str, status: int, latency_s: float, audio_s: Optional[float] = None) -> None:
    """One answered HTTP request: count, latency, audio seconds (on success) and errors (>= 400)."""
    status = int(status)
    record("ark_serve_requests_total", 1, {"route": route, "status": status})
    record("ark_serve_request_latency_seconds", latency_s, {"route": route})
    if status >= 400:
        record("ark_serve_errors_total", 1, {"status": status})
    elif audio_s is not None:
        record("ark_serve_audio_seconds_total", audio_s)


def record_model_request(version: str, status: int, latency_s: float) -> None:
    """One transcription routed to model `version` (served or canary): count and latency."""
    record("ark_serve_model_requests_total", 1, {"version": version, "status": int(status)})
    record("ark_serve_model_latency_seconds", latency_s, {"version": version})


def markdown_table() -> str:
    """The registry as a Markdown table (docs/deploy.md embeds it; a test keeps them equal)."""
    lines = ["| Prometheus name | kind | tags | meaning |", "|---|---|---|---|"]
    for s in _SPECS:
        lines.append(f"| `{s.prometheus_name}` | {s.kind} | {', '.join(s.tag_keys) or '-'} | {s.description} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
