"""The typed config system: precedence, coercion, errors, and that every key is documented."""
import dataclasses

import pytest

from ark_ray import config as C


@dataclasses.dataclass
class _Inner:
    """Inner section."""
    k: int = C.opt(1, "an int")
    name: str = C.opt("a", "a str")


@dataclasses.dataclass
class _Job:
    """A job."""
    steps: int = C.opt(10, "steps")
    lr: float = C.opt(1e-3, "lr")
    flag: bool = C.opt(False, "flag")
    maybe: C.Optional[str] = C.opt(None, "optional")
    mode: C.Literal["sync", "async"] = C.opt("async", "mode")
    inner: _Inner = C.opt(_Inner(), "inner section")
    items: list = C.opt([1, 2], "a list")


def test_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 20\ninner:\n  k: 5\n")
    cfg = C.parse_job_args(_Job, ["--config", str(f), "--inner.name=b", "--lr", "0.5", "--flag"])
    assert (cfg.steps, cfg.lr, cfg.flag, cfg.inner.k, cfg.inner.name) == (20, 0.5, True, 5, "b")
    assert C.load_config(_Job).steps == 10


def test_mutable_defaults_are_not_shared():
    a, b = _Job(), _Job()
    a.items.append(3)
    assert b.items == [1, 2]


@pytest.mark.parametrize("arg,msg", [
    ("--stepz=3", "did you mean steps"),
    ("--steps=abc", "expected an integer"),
    ("--steps=1.5", "expected an integer"),
    ("--mode=fast", "not one of"),
    ("--inner.q=1", "unknown config key inner.q"),
    ("--flag=maybe", "true/false"),
])
def test_bad_values(arg, msg):
    with pytest.raises(C.ConfigError, match=msg):
        C.parse_job_args(_Job, [arg])


def test_missing_file():
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_config(_Job, "/nonexistent.yaml")


def test_every_key_documented():
    classes = [C.RayConfig, C.SamplingConfig, C.EngineConfig, C.LearnerConfig] + C.job_config_classes()
    for cls in classes:
        for key, _, _, doc in C.iter_keys(cls):
            assert doc.strip(), f"{cls.__name__}.{key} has no doc"


def test_docs_are_current(repo_root):
    classes = [C.RayConfig, C.SamplingConfig, C.EngineConfig, C.LearnerConfig] + C.job_config_classes()
    doc = repo_root / "docs" / "config.md"
    assert doc.read_text().strip() == C.render_markdown(classes).strip(), \
        "docs/config.md is stale: run `python -m ark_ray.config > docs/config.md`"


@pytest.mark.parametrize("override,msg", [
    ("--sampling.n=2", "one rollout per clip"),
    ("--sync_every=0", "sync_every must be >= 1"),
    ("--max_inflight=0", "max_inflight must be >= 1"),
    ("--rollout_batch_size=0", "rollout_batch_size must be >= 1"),
    ("--max_staleness=-1", "max_staleness must be >= 0"),
    ("--sampling.logprobs_topk=5", "leave sampling.logprobs_topk at 0"),
    ("--learner.zero_stage=7", "stages 0-3"),
    ("--learner.weight_sync_bucket_mb=0", "weight_sync_bucket_mb must be > 0"),
    ("--learner.weight_sync_retries=-1", "weight_sync_retries must be >= 0"),
    ("--learner.weight_sync=nccl", "not one of"),
])
def test_opd_config_refuses_bad_combinations(repo_root, override, msg):
    with pytest.raises(C.ConfigError, match=msg):
        C.load_config(C.OpdConfig, repo_root / "jobs/configs/opd_tiny.yaml", [override])


def test_opd_configs_shipped_are_valid(repo_root):
    for name in ("opd_tiny.yaml", "opd_ark06.yaml"):
        C.load_config(C.OpdConfig, repo_root / "jobs/configs" / name)
