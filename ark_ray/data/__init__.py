"""Data: manifests (JSONL/Parquet in the seed's format), listing of local/S3 audio, Ray Data stages."""
