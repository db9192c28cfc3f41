"""Ray Serve application: OpenAI-compatible ARK-ASR transcription (see app.py for the design choice).

    serve run serve_configs/local.yaml          # CPU, tiny demo model
    serve.run(build_app({"model": d}))     # from Python
"""
from ark_ray.serve.app import build_app, resolve_model_dir

__all__ = ["build_app", "resolve_model_dir"]
