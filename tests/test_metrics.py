"""ark_ray.metrics: the registry's rules, input checking, and a real scrape of Ray's exporter."""
from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from ark_ray import metrics
from ark_ray.metrics import REGISTRY, MetricSpec

NAME = re.compile(r"^ark_(opd|sft|batch|serve)_[a-z][a-z0-9_]*[a-z0-9]$")


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
        "ark_sft_step", "ark_sft_loss", "ark_sft_samples_total", "ark_sft_recoveries_total",
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
def test_metrics_reach_rays_prometheus_endpoint(ray_local, ray_metrics):
    """Values recorded in an actor and in the driver come out of Ray's metrics endpoint, under the
    names the dashboards query. The actor gets its own runtime env, so its worker process is new
    and its series hold only what it recorded here; the driver's series are read apart (earlier
    tests in this process record batch and OPD counters there too) and only for the gauge set here."""
    import time
    import uuid

    class Recorder:
        """Records like a Serve replica, a Ray Data actor and the OPD controller would (defined here so
        cloudpickle ships it by value: workers cannot import this test module)."""

        def worker_id(self) -> str:
            import ray
            return ray.get_runtime_context().get_worker_id()

        def work(self) -> None:
            metrics.record_batch_block(3, 12.5, {"silent": 2, "too_long": 0})
            metrics.record_serve_request("/v1/audio/transcriptions", 200, 0.3, audio_s=4.0)
            metrics.record_serve_request("/v1/audio/transcriptions", 413, 0.01)
            metrics.record_opd_step(dict(step=3, version=1, kl=0.25, samples=8, union_size=40.5, rollout_s=1.2,
                                         teacher_s=None, learner_s=0.7, dropped_stale=2, rollout_wer=None))
            metrics.record_opd_queues(rollout=2, teacher=1, learner=0)

    ray = ray_local
    actor = ray.remote(Recorder).options(
        num_cpus=0, runtime_env={"env_vars": {"ARK_METRICS_TEST": uuid.uuid4().hex}}).remote()
    wid = ray.get(actor.worker_id.remote())
    ray.get(actor.work.remote())
    lr = 1e-4 + uuid.uuid4().int % 1000 * 1e-9       # a value no other test sets
    metrics.record("ark_opd_learning_rate", lr)      # from the driver (this process)
    driver = ray.get_runtime_context().get_worker_id()

    want = {"ray_ark_batch_files_total", "ray_ark_serve_request_latency_seconds_bucket",
            "ray_ark_opd_loss", "ray_ark_opd_queue_depth_batches", "ray_ark_opd_stage_duration_seconds_count"}
    lr_key = ray_metrics.key("ray_ark_opd_learning_rate")
    got, from_driver, deadline = {}, {}, time.monotonic() + 90
    while time.monotonic() < deadline:                # Ray exports every few seconds: poll for it
        got, from_driver = ray_metrics.scrape({wid}), ray_metrics.scrape({driver})
        if want <= {name for name, _ in got} and from_driver.get(lr_key) == pytest.approx(lr):
            break
        time.sleep(1)
    ray.kill(actor)

    def val(name, **labels):
        return got.get((name, frozenset(labels.items())))

    assert want <= {name for name, _ in got}, sorted(got)
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
    assert from_driver.get(lr_key) == pytest.approx(lr)
    # every ark series Ray exports is one the registry (and so the dashboards) knows
    known = {n for s in REGISTRY.values() for n in s.series()}
    assert {name for name, _ in {**got, **from_driver}} <= known


def test_deploy_guide_lists_the_registry(repo_root):
    text = (repo_root / "docs" / "deploy.md").read_text()
    block = text.split("<!-- metrics-table", 1)[1].split("-->", 1)[1].split("<!-- /metrics-table -->", 1)[0]
    assert block.strip() == metrics.markdown_table(), "regenerate with: python -m ark_ray.metrics"
