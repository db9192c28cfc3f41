"""Batch transcription: python jobs/transcribe.py --input {s3://bucket/prefix | dir | manifest} --output {s3://... | dir}

    [--format jsonl|parquet] [--model DIR] [--label_field=text] [--config FILE] [--key=value ...]

Runs on the cluster in $RAY_ADDRESS (as under `ray job submit`) or a local Ray. Prints a
progress bar and a closing summary; every key is in docs/config.md (TranscribeConfig).
"""
import json
import sys

from ark_ray.config import TranscribeConfig, parse_job_args
from ark_ray.data.transcribe_pipeline import format_summary, run_transcribe


def main(argv=None) -> dict:
    cfg = parse_job_args(TranscribeConfig, sys.argv[1:] if argv is None else argv)
    summary = run_transcribe(cfg)
    print(format_summary(summary))
    print("SUMMARY_JSON " + json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
