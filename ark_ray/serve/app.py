"""Build the Serve application: `serve run serve_configs/local.yaml` imports `ark_ray.serve.app:build_app`.

Why a hand-written FastAPI ingress and not `ray.serve.llm.build_openai_app`: Ray Serve LLM
(2.60) does offer /v1/audio/transcriptions, but it forwards the request to vLLM's own
`OpenAIServingTranscription` inside the LLMServer. That would (1) cut long audio with vLLM's
splitter instead of our shared chunker, so the endpoint's segments and text would differ from
batch jobs and OPD rollouts on the same clip; (2) build the prompt and clean the output with
vLLM's hooks rather than `ArkAsrProcessor` (token mask, cleanup), the one place those rules
live; (3) tie serving to vLLM, leaving no HFEngine fallback for CPU boxes and debugging;
(4) give no place for the limits this endpoint promises (a byte limit checked while the upload
streams in, a 400 that names the AudioError reason, API keys). Our plugin still makes
`vllm serve <model_dir>` a working OpenAI endpoint — bench/serve_load.py measures it as the
baseline. Here the ingress owns the HTTP contract and a model deployment owns the engine,
batched with `@serve.batch`, and Serve's autoscaling and back-pressure apply to it.

`build_model_app` is the model deployment alone (no ingress, no route): jobs/promote.py runs a
candidate that way as a canary, next to the served application, whose ingress sends it a share of
the requests (CanaryConfig). Both builders label the model with `model_version` (ServeConfig), or
the directory's fingerprint (serve/versions.py).
"""
from __future__ import annotations

import os
from typing import Any, Optional

from ray.serve import Application

from ark_ray.config import ServeConfig, load_config, to_dict
from ark_ray.runtime import engine_actor_options
from ark_ray.serve.ingress import Ingress
from ark_ray.serve.replica import TranscriberReplica
from ark_ray.serve.versions import model_version, resolve_model_dir

def resolve_api_key(cfg: ServeConfig) -> Optional[str]:
    if cfg.api_key:
        return cfg.api_key
    return os.environ.get(cfg.api_key_env) if cfg.api_key_env else None


def _config(args) -> ServeConfig:
    return args if isinstance(args, ServeConfig) else load_config(ServeConfig, overrides=dict(args or {}))


def _model(cfg: ServeConfig) -> tuple[Application, str]:
    """The model deployment (bound) and its version label."""
    model_dir = resolve_model_dir(cfg.model)
    version = cfg.model_version or model_version(model_dir)
    # CPUs and GPUs; on CPU memory= the model plus its sized KV cache (the app's runtime env
    # carries the environment)
    options = {k: v for k, v in engine_actor_options(model_dir, cfg.engine).items() if k != "runtime_env"}
    replica = TranscriberReplica.options(
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options=options,
    ).bind(model_dir, to_dict(cfg.engine), cfg.max_batch_size, cfg.batch_wait_timeout_s, version)
    return replica, version


def build_app(args: Optional[dict[str, Any]] = None) -> Application:
    """The ingress bound to one model deployment; `args` are ServeConfig keys (nested dicts), checked
    by ServeConfig.validate when loaded."""
    cfg = _config(args)
    replica, version = _model(cfg)
    return Ingress.options(max_ongoing_requests=cfg.ingress_max_ongoing_requests).bind(
        replica, cfg.model_name, max_chunk_s=cfg.engine.max_chunk_s, max_new_tokens=cfg.max_new_tokens,
        max_upload_mb=cfg.max_upload_mb, max_audio_s=cfg.max_audio_s, api_key=resolve_api_key(cfg),
        model_version=version, window_retries=cfg.window_retries)


def build_model_app(args: Optional[dict[str, Any]] = None) -> Application:
    """The model deployment alone, for a canary: another application's ingress routes to it."""
    return _model(_config(args))[0]
