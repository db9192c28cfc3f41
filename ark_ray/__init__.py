"""ark-ray: on-policy distillation, batch transcription and serving of ARK-ASR on Ray."""

__version__ = "0.1.0"
