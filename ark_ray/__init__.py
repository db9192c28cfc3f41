"""ark-ray: on-policy distillation, batch transcription and serving of ARK-ASR on Ray.

Importing the package registers ARK-ASR with transformers' Auto classes (`ark_ray.auto_classes`:
as soon as transformers is imported, so this import itself stays light)."""

__version__ = "0.1.0"

from ark_ray import auto_classes as _auto_classes  # noqa: E402

_auto_classes.install()
