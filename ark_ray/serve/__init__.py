"""Ray Serve application: OpenAI-compatible ARK-ASR transcription (see app.py for the design choice).

    serve run serve_configs/local.yaml          # CPU, tiny demo model
    serve.run(build_app({"model": d}))     # from Python

`build_app` is imported on first use, so that jobs/promote.py (serve/promote.py, serve/control.py)
starts without loading Serve's HTTP stack and the engines.
"""
from __future__ import annotations

__all__ = ["build_app", "resolve_model_dir"]


def __getattr__(name: str):
    if name == "build_app":
        from ark_ray.serve.app import build_app

        return build_app
    if name == "resolve_model_dir":
        from ark_ray.serve.versions import resolve_model_dir

        return resolve_model_dir
    raise AttributeError(f"module 'ark_ray.serve' has no attribute {name!r}")
