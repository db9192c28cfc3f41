"""Grafana dashboards for ark-ray, defined as code; writes ark_{opd,sft,batch,serve}.json next to this file.

Why code: every PromQL expression is built from `ark_ray.metrics.REGISTRY`, so a renamed or
removed metric fails here (and in tests/test_dashboards.py) instead of leaving an empty panel.
Same idea as Ray's own dashboards (ray/dashboard/modules/metrics/dashboards/*_panels.py).

    python dashboards/build.py           # regenerate the JSON
    python dashboards/build.py --check   # exit 1 if the committed JSON is out of date

Each dashboard has a `datasource` variable (any Prometheus that scrapes Ray's metrics port) and
a `SessionName` variable (one Ray cluster session; Ray labels every series with it).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Optional

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from ark_ray.metrics import REGISTRY  # noqa: E402

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
FILTER = 'SessionName=~"$SessionName"'
RATE = "$__rate_interval"


def m(name: str, suffix: str = "", extra: str = "") -> str:
    """A selector for a registered metric, e.g. m("ark_opd_loss") -> ray_ark_opd_loss{SessionName=~...}."""
    s = REGISTRY[name]  # KeyError for a metric that does not exist
    if suffix and s.kind != "histogram":
        raise ValueError(f"{name} is a {s.kind}; only histograms have {suffix}")
    labels = FILTER + (", " + extra if extra else "")
    return f"{s.prometheus_name}{suffix}{{{labels}}}"


def quantile(q: float, name: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({m(name, '_bucket')}[{RATE}])))"


def mean_of(name: str, by: str) -> str:
    return (f"sum by ({by}) (rate({m(name, '_sum')}[{RATE}])) / "
            f"sum by ({by}) (rate({m(name, '_count')}[{RATE}]))")


@dataclass
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]          # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"                # or "stat"
    width: int = 12
    height: int = 8
    min: Optional[float] = None
    max: Optional[float] = None
    extra_defaults: dict = field(default_factory=dict)


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    variable_metric: str                    # a metric always present, to list SessionName values
    panels: list[Panel]


OPD = Dashboard(
    "ark-opd", "ARK-Ray / OPD training",
    "On-policy distillation: loss, KL, union statistics, staleness, pipeline queues and throughput.",
    "ark_opd_step",
    [
        Panel("Learner step and policy version", "Optimizer steps done and the student weight version the "
              "rollout workers sample with. The gap between them is set by sync_every.",
              [(f"max({m('ark_opd_step')})", "step"), (f"max({m('ark_opd_policy_version')})", "policy version")]),
        Panel("Loss and KL", "OPD loss (tau^2 * KL) and the forward KL(teacher||student) in nats per token, "
              "over the top-k union plus the tail bucket.",
              [(f"avg({m('ark_opd_loss')})", "loss"), (f"avg({m('ark_opd_kl_nats')})", "KL (nats)")]),
        Panel("Union size", "Mean |teacher top-k U student top-k| per position: k when the two agree, "
              "up to 2k when they disagree.", [(f"avg({m('ark_opd_union_size_tokens')})", "tokens")]),
        Panel("Probability mass on the union", "Teacher and student mass on the union ids; the teacher's "
              "remainder is the tail bucket.",
              [(f"avg({m('ark_opd_teacher_mass_ratio')})", "teacher"),
               (f"avg({m('ark_opd_student_mass_ratio')})", "student")], unit="percentunit", min=0, max=1),
        Panel("Staleness", "Mean policy-version lag of the trajectories each step trained on.",
              [(f"avg({m('ark_opd_staleness_versions')})", "versions behind")]),
        Panel("Dropped stale samples", "Trajectory samples dropped for exceeding max_staleness.",
              [(f"sum(increase({m('ark_opd_dropped_stale_samples_total')}[{RATE}]))", "dropped"),
               (f"sum({m('ark_opd_dropped_stale_samples_total')})", "total")]),
        Panel("Unmapped positions", "Response tokens out of the loss because the teacher's vocabulary has no "
              "such token (qwen3_asr teacher through the token-string map; stays 0 with a shared vocabulary).",
              [(f"sum(increase({m('ark_opd_unmapped_positions_total')}[{RATE}]))", "unmapped"),
               (f"sum({m('ark_opd_unmapped_positions_total')})", "total")]),
        Panel("Recoveries", "Actors brought back after a node was lost, by role: rollout and teacher (Ray "
              "restarted the actor, its work was redone) and learner (the group restarted from the last "
              "checkpoint). Each one is also a line on the job's console and a record in metrics.jsonl.",
              [(f"sum by (role) (increase({m('ark_opd_recoveries_total')}[{RATE}]))", "{{role}}"),
               (f"sum({m('ark_opd_recoveries_total')})", "total")]),
        Panel("Pipeline queues", "Batches in flight or waiting per stage. A full rollout queue with an empty "
              "learner queue means the teacher is the bottleneck.",
              [(f"sum by (queue) ({m('ark_opd_queue_depth_batches')})", "{{queue}}")]),
        Panel("Stage time per batch", "Median, p95 and mean wall time of one batch in rollout, teacher "
              "scoring and the learner step. Ray's exporter sums histograms from bucket midpoints, so the "
              "mean is approximate; the quantiles are the usual bucket interpolation.",
              [(quantile(0.5, "ark_opd_stage_duration_seconds", "stage"), "{{stage}} p50"),
               (quantile(0.95, "ark_opd_stage_duration_seconds", "stage"), "{{stage}} p95"),
               (mean_of("ark_opd_stage_duration_seconds", "stage"), "{{stage}} mean")], unit="s"),
        Panel("Throughput", "Trained samples per second (gauge from the controller, and the rate of the "
              "trained-samples counter).",
              [(f"avg({m('ark_opd_samples_per_second')})", "samples/s (controller)"),
               (f"sum(rate({m('ark_opd_samples_total')}[{RATE}]))", "samples/s (counter rate)")]),
        Panel("Rollout WER", "WER of the student's own rollouts against the references: a free, noisy "
              "training-set estimate of the student.",
              [(f"avg({m('ark_opd_rollout_wer_ratio')})", "WER")], unit="percentunit", min=0),
        Panel("Learning rate", "Learner learning rate (warmup and decay schedule).",
              [(f"avg({m('ark_opd_learning_rate')})", "lr")], unit="sci"),
    ],
)

SFT = Dashboard(
    "ark-sft", "ARK-Ray / SFT training",
    "Supervised fine-tuning on Ray Train: step, loss, trained utterances and learner-group recoveries.",
    "ark_sft_step",
    [
        Panel("Learner step", "SFT steps done; it goes back to the checkpoint's step when the learner group "
              "restarts, then climbs again.", [(f"max({m('ark_sft_step')})", "step")]),
        Panel("Loss", "Token cross-entropy of the last step.", [(f"avg({m('ark_sft_loss')})", "loss")]),
        Panel("Utterances per second", "Rate of trained utterances (steps trained again after a restart count "
              "again).", [(f"sum(rate({m('ark_sft_samples_total')}[{RATE}]))", "utterances/s")]),
        Panel("Recoveries", "Restarts of the learner group from its last checkpoint after a rank failed or was "
              "lost with its node.",
              [(f"sum by (role) ({m('ark_sft_recoveries_total')})", "{{role}}")], kind="stat"),
    ],
)

BATCH = Dashboard(
    "ark-batch", "ARK-Ray / Batch transcription",
    "Ray Data transcription jobs: files and audio done, speed, error rows by reason.",
    "ark_batch_files_total",
    [
        Panel("Files written", "Output rows written (errors included).",
              [(f"sum({m('ark_batch_files_total')})", "files")], kind="stat", width=6),
        Panel("Audio transcribed", "Hours of audio transcribed.",
              [(f"sum({m('ark_batch_audio_seconds_total')}) / 3600", "hours")], kind="stat", width=6),
        Panel("Error rows", "Rows that carry an error instead of a transcript.",
              [(f"sum({m('ark_batch_error_rows_total')})", "error rows")], kind="stat", width=6),
        Panel("Times real time", "Audio seconds per wall second since the job started (driver's view).",
              [(f"max({m('ark_batch_speed_times_realtime')})", "x real time")], kind="stat", width=6),
        Panel("Files per second", "Rate at which rows are written.",
              [(f"sum(rate({m('ark_batch_files_total')}[{RATE}]))", "files/s")]),
        Panel("Audio seconds per second", "Instantaneous speed: audio seconds transcribed per wall second.",
              [(f"sum(rate({m('ark_batch_audio_seconds_total')}[{RATE}]))", "x real time (rate)"),
               (f"max({m('ark_batch_speed_times_realtime')})", "x real time (since start)")]),
        Panel("Error rows by reason", "New error rows per reason (AudioError reasons, engine_error).",
              [(f"sum by (reason) (increase({m('ark_batch_error_rows_total')}[{RATE}]))", "{{reason}}")]),
        Panel("Error ratio", "Share of rows that are errors.",
              [(f"sum(rate({m('ark_batch_error_rows_total')}[{RATE}])) / "
                f"sum(rate({m('ark_batch_files_total')}[{RATE}]))", "errors / files")], unit="percentunit", min=0),
    ],
)

MODEL_5XX = m("ark_serve_model_requests_total", extra='status=~"5.."')

SERVE = Dashboard(
    "ark-serve", "ARK-Ray / Serving",
    "The OpenAI-compatible transcription endpoint: traffic, latency, audio served and errors.",
    "ark_serve_requests_total",
    [
        Panel("Requests per second", "Answered requests by route and status code.",
              [(f"sum by (route, status) (rate({m('ark_serve_requests_total')}[{RATE}]))", "{{route}} {{status}}")],
              unit="reqps"),
        Panel("Latency", "Request latency quantiles by route (received to response complete). The mean "
              "is approximate: Ray's exporter sums histograms from bucket midpoints.",
              [(quantile(0.5, "ark_serve_request_latency_seconds", "route"), "{{route}} p50"),
               (quantile(0.95, "ark_serve_request_latency_seconds", "route"), "{{route}} p95"),
               (quantile(0.99, "ark_serve_request_latency_seconds", "route"), "{{route}} p99"),
               (mean_of("ark_serve_request_latency_seconds", "route"), "{{route}} mean")], unit="s"),
        Panel("Errors by status code", "Error responses per second by HTTP status (4xx: client, 429/503: "
              "overload, 5xx: server).",
              [(f"sum by (status) (rate({m('ark_serve_errors_total')}[{RATE}]))", "{{status}}")], unit="reqps"),
        Panel("Error ratio", "Share of requests answered with an error.",
              [(f"sum(rate({m('ark_serve_errors_total')}[{RATE}])) / "
                f"sum(rate({m('ark_serve_requests_total')}[{RATE}]))", "errors / requests")],
              unit="percentunit", min=0),
        Panel("Audio served", "Audio seconds transcribed per wall second, over all replicas.",
              [(f"sum(rate({m('ark_serve_audio_seconds_total')}[{RATE}]))", "audio s / s")]),
        Panel("Requests in window", "Requests answered in the selected time range, by status.",
              [(f"sum by (status) (increase({m('ark_serve_requests_total')}[$__range]))", "{{status}}")],
              kind="stat"),
        Panel("Transcriptions by model version", "Transcriptions per second by the model version they went to "
              "(the served model, and a canary while jobs/promote.py runs one) and status.",
              [(f"sum by (version, status) (rate({m('ark_serve_model_requests_total')}[{RATE}]))",
                "{{version}} {{status}}")], unit="reqps"),
        Panel("Error ratio by model version", "Share of each version's transcriptions answered with a server "
              "error (5xx): a canary worse than the served model shows here first.",
              [(f"sum by (version) (rate({MODEL_5XX}[{RATE}])) / "
                f"sum by (version) (rate({m('ark_serve_model_requests_total')}[{RATE}]))", "{{version}}")],
              unit="percentunit", min=0),
        Panel("Latency by model version", "Transcription latency quantiles per model version.",
              [(quantile(0.5, "ark_serve_model_latency_seconds", "version"), "{{version}} p50"),
               (quantile(0.95, "ark_serve_model_latency_seconds", "version"), "{{version}} p95")], unit="s"),
        Panel("Windows retried after replica loss", "Audio windows the ingress resubmitted to another replica "
              "because theirs was lost (node gone, actor died, stopped past its drain time); the client saw "
              "no error unless every attempt failed.",
              [(f"sum by (version) (increase({m('ark_serve_window_retries_total')}[{RATE}]))", "{{version}}")]),
    ],
)

DASHBOARDS = {"ark_opd.json": OPD, "ark_sft.json": SFT, "ark_batch.json": BATCH, "ark_serve.json": SERVE}


def _panel_json(p: Panel, pid: int, x: int, y: int) -> dict:
    defaults: dict = {"unit": p.unit, **p.extra_defaults}
    if p.min is not None:
        defaults["min"] = p.min
    if p.max is not None:
        defaults["max"] = p.max
    out = {
        "id": pid, "type": p.kind, "title": p.title, "description": p.description,
        "datasource": DATASOURCE, "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                     "legendFormat": legend, "range": True}
                    for i, (expr, legend) in enumerate(p.targets)],
    }
    if p.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    return out


def render(d: Dashboard) -> dict:
    """The Grafana dashboard model (import it, or provision it from a folder)."""
    panels, x, y, row_h = [], 0, 0, 0
    for i, p in enumerate(d.panels, start=1):
        if x + p.width > 24:
            x, y, row_h = 0, y + row_h, 0
        panels.append(_panel_json(p, i, x, y))
        x, row_h = x + p.width, max(row_h, p.height)
    session_query = f"label_values({REGISTRY[d.variable_metric].series()[0]}, SessionName)"
    return {
        "uid": d.uid, "title": d.title, "description": d.description, "tags": ["ark-ray", "ray"],
        "schemaVersion": SCHEMA_VERSION, "version": 1, "editable": True, "graphTooltip": 1,
        "timezone": "browser", "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
            {"name": "SessionName", "label": "Ray session", "type": "query", "datasource": DATASOURCE,
             "definition": session_query, "query": {"query": session_query, "refId": "SessionName"},
             "includeAll": True, "allValue": ".+", "multi": True, "current": {}, "hide": 0, "refresh": 2,
             "regex": "", "sort": 2, "options": []},
        ]},
        "annotations": {"list": []}, "links": [], "panels": panels,
    }


def dumps(d: Dashboard) -> str:
    return json.dumps(render(d), indent=2) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed JSON differs")
    ap.add_argument("--out", type=pathlib.Path, default=HERE, help="folder to write into")
    args = ap.parse_args(argv)
    stale = []
    for fname, d in DASHBOARDS.items():
        path, text = args.out / fname, dumps(d)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(fname)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python dashboards/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
