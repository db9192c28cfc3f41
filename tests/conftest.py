"""Shared test fixtures: one local Ray per session, temp dirs, the repo root."""
from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole session (started once: ray.init costs ~5 s).

    Logical CPUs are oversubscribed (8 on a 2-core box) so that a rollout actor, a teacher
    actor and two learner ranks can coexist in one test, as they would on a real node.
    """
    import ray

    if not ray.is_initialized():
        tmp = tempfile.mkdtemp(prefix="ark-ray-", dir="/tmp")
        ray.init(
            address="local",
            num_cpus=int(os.environ.get("ARK_TEST_RAY_CPUS", "8")),
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=tmp,
            runtime_env={"env_vars": {k: os.environ[k] for k in (
                "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE")}},
        )
    yield ray
    ray.shutdown()
