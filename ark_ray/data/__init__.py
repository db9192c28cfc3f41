"""Data: manifests (JSONL/Parquet in open-audio-opd's manifest format), listing of local/S3 audio, Ray Data
stages, and the transcriber (`build_transcriber`: a Ray Dataset with audio in, transcripts out)."""
from ark_ray.data.transcriber import TranscribeProcessor, build_transcriber

__all__ = ["build_transcriber", "TranscribeProcessor"]
