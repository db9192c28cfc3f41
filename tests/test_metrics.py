"""ark_ray.metrics: the registry's rules, input checking, and a real scrape of Ray's exporter."""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from ark_ray import metrics
from ark_ray.metrics import REGISTRY, MetricSpec

NAME = re.compile(r"^ark_(opd|batch|serve)_[a-z][a-z0-9_]*[a-z0-9]$")


def test_registry_follows_the_naming_rules():
    assert len(REGISTRY) >= 20
    for name, s in REGISTRY.items():
        assert isinstance(s, MetricSpec) and s.name == name
        assert NAME.match(name), name
        assert s.kind in ("counter", "gauge", "histogram")
        assert (s.kind == "counter") == name.endswith("_total"), name
        assert s.description and s.description[0].isupper(), name
        assert all(re.match(r"^[a-z_]+$", k) for k in s.tag_keys), name
        if s.kind == "histogram":
            assert s.boundaries and all(b > 0 for b in s.boundaries)
            assert list(s.boundaries) == sorted(set(s.boundaries)), name
        else:
            assert s.boundaries == ()
        assert s.prometheus_name == "ray_" + name


def test_registry_covers_every_area_the_design_names():
    need = {
        "ark_opd_step", "ark_opd_loss", "ark_opd_kl_nats", "ark_opd_union_size_tokens",
        "ark_opd_teacher_mass_ratio", "ark_opd_student_mass_ratio", "ark_opd_staleness_versions",
        "ark_opd_queue_depth_batches", "ark_opd_stage_duration_seconds", "ark_opd_samples_per_second",
        "ark_opd_rollout_wer_ratio", "ark_opd_dropped_stale_samples_total", "ark_opd_policy_version",
        "ark_batch_files_total", "ark_batch_audio_seconds_total", "ark_batch_error_rows_total",
        "ark_batch_speed_times_realtime", "ark_serve_requests_total", "ark_serve_request_latency_seconds",
        "ark_serve_audio_seconds_total", "ark_serve_errors_total",
    }
    assert need <= set(REGISTRY)
    assert REGISTRY["ark_batch_error_rows_total"].tag_keys == ("reason",)
    assert set(REGISTRY["ark_serve_requests_total"].tag_keys) == {"route", "status"}
    assert REGISTRY["ark_serve_request_latency_seconds"].kind == "histogram"


def test_histogram_series_names():
    s = REGISTRY["ark_serve_request_latency_seconds"]
    assert s.series() == tuple(f"ray_ark_serve_request_latency_seconds{x}" for x in ("_bucket", "_sum", "_count"))
    assert REGISTRY["ark_opd_loss"].series() == ("ray_ark_opd_loss",)


def test_unknown_metric_is_a_key_error():
    with pytest.raises(KeyError, match="ark_opd_nonsense"):
        metrics.record("ark_opd_nonsense", 1.0)
    with pytest.raises(KeyError):
        metrics.spec("loss")


@pytest.mark.parametrize("name,value,tags,err", [
    ("ark_batch_error_rows_total", 1, None, ValueError),                          # tag missing
    ("ark_batch_error_rows_total", 1, {"reason": "x", "extra": "y"}, ValueError),  # tag unknown
    ("ark_opd_loss", 1.0, {"reason": "x"}, ValueError),                          # takes no tags
    ("ark_batch_files_total", -1, None, ValueError),                             # counters only go up
    ("ark_batch_files_total", math.inf, None, ValueError),
    ("ark_serve_request_latency_seconds", math.nan, {"route": "/"}, ValueError),
    ("ark_opd_loss", True, None, TypeError),
    ("ark_opd_loss", "0.5", None, TypeError),
    ("ark_opd_loss", None, None, TypeError),
])
def test_bad_values_and_tags_are_typed_errors(name, value, tags, err):
    with pytest.raises(err):
        metrics.record(name, value, tags)


def test_helpers_check_their_input():
    with pytest.raises(KeyError, match="kl"):
        metrics.record_opd_step({"step": 1, "version": 0, "samples": 4})
    with pytest.raises(ValueError):
        metrics.record_opd_queues()
    with pytest.raises(ValueError):
        metrics.record_batch_speed(10.0, 0.0)


def test_markdown_table_lists_every_metric():
    table = metrics.markdown_table()
    for s in REGISTRY.values():
        assert f"`{s.prometheus_name}`" in table


def test_recording_without_ray_is_a_clear_error():
    code = "from ark_ray import metrics; metrics.record('ark_opd_loss', 1.0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "RuntimeError" in out.stderr and "Ray is not initialised" in out.stderr


# ------------------------------------------------------------------------ the real exporter
SCRIPT = textwrap.dedent('''
    import json, sys, tempfile, time, urllib.request
    import ray
    from ark_ray import metrics

    port = int(sys.argv[1])
    for attempt in range(2):  # a node start can time out on an overloaded box; that is not under test
        try:
            ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
                     _metrics_export_port=port, _temp_dir=tempfile.mkdtemp(prefix="ark-metrics-", dir="/tmp"))
            break
        except Exception:
            ray.shutdown()
            if attempt:
                raise

    @ray.remote
    class Replica:  # records like a Serve replica / a Ray Data actor would
        def work(self):
            metrics.record_batch_block(3, 12.5, {"silent": 2, "too_long": 0})
            metrics.record_serve_request("/v1/audio/transcriptions", 200, 0.3, audio_s=4.0)
            metrics.record_serve_request("/v1/audio/transcriptions", 413, 0.01)
            return True

    r = Replica.remote()
    assert ray.get(r.work.remote())
    # the driver records like the OPD controller
    metrics.record_opd_step(dict(step=3, version=1, kl=0.25, samples=8, union_size=40.5, rollout_s=1.2,
                                 teacher_s=None, learner_s=0.7, dropped_stale=2, rollout_wer=None))
    metrics.record_opd_queues(rollout=2, teacher=1, learner=0)
    want = sys.argv[2].split(",")
    body, deadline = "", time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        except OSError:
            body = ""
        if all(w in body for w in want):
            break
        time.sleep(0.5)  # polling for the exporter, not timing anything
    print("BODY" + json.dumps(body))
    ray.shutdown()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(body: str) -> dict:
    """{(series name, frozenset(our labels)): value}, Ray's own labels dropped."""
    from prometheus_client.parser import text_string_to_metric_families
    ours = {"reason", "route", "status", "queue", "stage", "le"}
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name.startswith("ray_ark_"):
                key = (s.name, frozenset((k, v) for k, v in s.labels.items() if k in ours))
                out[key] = out.get(key, 0.0) + s.value
    return out


def test_metrics_reach_rays_prometheus_endpoint(tmp_path):
    """A real local Ray with a metrics export port: values recorded in an actor and in the driver
    come out of Ray's endpoint under the names the dashboards query."""
    port = _free_port()
    script = tmp_path / "record.py"
    script.write_text(SCRIPT)
    want = ["ray_ark_batch_files_total", "ray_ark_serve_request_latency_seconds_bucket",
            "ray_ark_opd_loss", "ray_ark_opd_queue_depth_batches", "ray_ark_opd_stage_duration_seconds_count"]
    env = dict(os.environ, RAY_metrics_report_interval_ms="1000")
    out = subprocess.run([sys.executable, str(script), str(port), ",".join(want)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    body = json.loads(out.stdout.split("BODY", 1)[1])
    got = _samples(body)
    assert got, body[-3000:]

    def val(name, **labels):
        return got.get((name, frozenset(labels.items())))

    assert val("ray_ark_batch_files_total") == 3
    assert val("ray_ark_batch_audio_seconds_total") == 12.5
    assert val("ray_ark_batch_error_rows_total", reason="silent") == 2
    assert val("ray_ark_batch_error_rows_total", reason="too_long") is None   # +0 adds no series
    route = "/v1/audio/transcriptions"
    assert val("ray_ark_serve_requests_total", route=route, status="200") == 1
    assert val("ray_ark_serve_requests_total", route=route, status="413") == 1
    assert val("ray_ark_serve_errors_total", status="413") == 1
    assert val("ray_ark_serve_audio_seconds_total") == 4.0
    assert val("ray_ark_serve_request_latency_seconds_count", route=route) == 2
    assert val("ray_ark_serve_request_latency_seconds_bucket", route=route, le="0.025") == 1
    assert val("ray_ark_serve_request_latency_seconds_bucket", route=route, le="0.5") == 2
    assert val("ray_ark_opd_loss") == 0.25 and val("ray_ark_opd_kl_nats") == 0.25
    assert val("ray_ark_opd_step") == 3 and val("ray_ark_opd_policy_version") == 1
    assert val("ray_ark_opd_union_size_tokens") == 40.5
    assert val("ray_ark_opd_dropped_stale_samples_total") == 2
    assert val("ray_ark_opd_stage_duration_seconds_count", stage="rollout") == 1
    assert val("ray_ark_opd_stage_duration_seconds_count", stage="teacher") is None
    assert val("ray_ark_opd_queue_depth_batches", queue="rollout") == 2
    # every ark series Ray exports is one the registry (and so the dashboards) knows
    known = {n for s in REGISTRY.values() for n in s.series()}
    assert {name for name, _ in got} <= known


def test_deploy_guide_lists_the_registry(repo_root):
    text = (repo_root / "docs" / "deploy.md").read_text()
    block = text.split("<!-- metrics-table", 1)[1].split("-->", 1)[1].split("<!-- /metrics-table -->", 1)[0]
    assert block.strip() == metrics.markdown_table(), "regenerate with: python -m ark_ray.metrics"
