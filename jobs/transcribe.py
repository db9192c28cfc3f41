"""Batch transcription: python jobs/transcribe.py --input {s3://bucket/prefix | dir | manifest | demo://heldout} --output {s3://... | dir}

    [--format jsonl|parquet] [--model DIR] [--label_field=text] [--config FILE] [--key=value ...]

Runs on the cluster in $RAY_ADDRESS (as under `ray job submit`) or a local Ray, as one Ray Data
pipeline (ark_ray/data/transcribe_pipeline.py). The terminal shows a header, one progress bar, a
line per event that matters (an engine ready, a node lost or joined) and the closing table; vLLM,
Ray and transformers output goes to job.log in the output folder (for an s3:// output, a local
folder the job names, copied beside the part files at the end). Every key is in docs/config.md
(TranscribeConfig).
"""
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # `python jobs/transcribe.py` from a clone, without an installed package
    sys.path.insert(0, str(REPO))

from ark_ray.runtime import cpu_env_defaults  # noqa: E402


def main(argv=None) -> dict:
    cpu_env_defaults()   # before torch/vLLM read the environment (a plain shell has none of it)
    from ark_ray.config import TranscribeConfig, parse_job_args
    from ark_ray.console import JobConsole
    from ark_ray.data.run_storage import RunStorage
    from ark_ray.data.transcribe_pipeline import format_summary, run_transcribe

    import ray

    from ark_ray.config import ConfigError
    from ark_ray.data.listing import InputError
    from ark_ray.data.manifest import ManifestError
    from ark_ray.data.row_files import RowFileError
    from ark_ray.data.s3 import StorageError

    USER_ERRORS = (ConfigError, InputError, ManifestError, RowFileError, StorageError)
    try:
        cfg = parse_job_args(TranscribeConfig, sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"transcribe: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    own_ray = not ray.is_initialized()    # a caller's Ray session (tests, notebooks) is left as it was
    try:   # the output folder; for an s3:// one, a local folder for job.log (and a bad bucket fails here)
        storage = RunStorage(cfg.output, cfg.s3)
    except USER_ERRORS as e:
        print(f"transcribe: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    console = JobConsole(storage.local_dir, quiet=cfg.quiet)
    try:
        console.line(f"transcribe: {cfg.input} -> {cfg.output} ({cfg.format}); model {cfg.model_dir()}; "
                     f"engine caches {cfg.engine.cache_dir}")
        if console.quiet:
            console.line(f"vLLM / Ray / transformers logs: {console.log_path}")
        summary = run_transcribe(cfg, console)
        console.line()
        console.line(format_summary(summary))
        console.line("SUMMARY_JSON " + json.dumps(summary))
        if console.quiet:
            console.line(f"log: {storage.upload('job.log') if not storage.is_local else console.log_path}")
        if own_ray:
            ray.shutdown()                # Ray's last forwarded worker lines land in job.log, not after the table
        return summary
    except USER_ERRORS as e:   # a bad input or setting: one line that says what, no traceback
        console.restore()
        print(f"transcribe: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except BaseException:
        console.restore()   # the traceback goes to the terminal
        if console.quiet:
            print(f"(full log: {console.log_path})", file=sys.stderr)
        raise
    finally:
        console.restore()


if __name__ == "__main__":
    main()
