"""Data: manifests (JSONL/Parquet in open-audio-opd's manifest format), listing of local/S3 audio, Ray Data stages."""
