"""Ray start-up shared by every job: join the cluster in $RAY_ADDRESS (as under `ray job submit`)
or start a local one, with the environment our workers need (CPU DeepSpeed, offline hub)."""
from __future__ import annotations

import os

import ray

from ark_ray.config import RayConfig

WORKER_ENV = ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
              "VLLM_CPU_KVCACHE_SPACE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_DEFAULT_REGION", "AWS_REGION")


def init_ray(cfg: RayConfig | None = None) -> None:
    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Joining a cluster (e.g. under `ray job submit`): the job's own runtime env applies, and
        # Ray refuses a driver runtime env that repeats its keys; actors set what they need.
        ray.init(address=address, namespace=cfg.namespace, log_to_driver=True)
        return
    ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, namespace=cfg.namespace,
             include_dashboard=False, _temp_dir=cfg.temp_dir, runtime_env={"env_vars": env},
             log_to_driver=True)
