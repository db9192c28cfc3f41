"""Batch transcription: python jobs/transcribe.py --input {s3://bucket/prefix | dir | manifest | demo://heldout} --output {s3://... | dir}

    [--format jsonl|parquet] [--model DIR] [--label_field=text] [--config FILE] [--key=value ...]

Runs on the cluster in $RAY_ADDRESS (as under `ray job submit`) or a local Ray, as one Ray Data
pipeline (ark_ray/data/transcribe_pipeline.py). The terminal shows a header, one progress bar, a
line per event that matters (an engine ready, a node lost or joined) and the closing table; vLLM,
Ray and transformers output goes to job.log in the output folder (for an s3:// output, a local
folder the job names, copied beside the part files at the end). Every key is in docs/config.md
(TranscribeConfig).
A bad input, model, output or key is one line on stderr and exit status 2 (`--debug` for the traceback).
"""
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # `python jobs/transcribe.py` from a clone, without an installed package
    sys.path.insert(0, str(REPO))

from ark_ray.cli import run_job  # noqa: E402


def main(argv=None) -> dict:
    """Parse, check the input, model and output (a user error is one line and exit 2 under run_job,
    before Ray starts), then run the pipeline under the job console."""
    from ark_ray.config import TranscribeConfig, parse_job_args
    from ark_ray.data.preflight import check_input, check_model, check_part_format, open_output

    cfg = parse_job_args(TranscribeConfig, sys.argv[1:] if argv is None else argv)
    check_input(cfg.input, "input", cfg.s3)
    check_model(cfg.model_dir(), "model")
    storage = open_output(cfg.output, "output", cfg.s3)   # for an s3:// output, a local folder for job.log
    check_part_format(storage, cfg.format, cfg.overwrite)

    from ark_ray.runtime import cpu_env_defaults

    cpu_env_defaults()   # before torch/vLLM read the environment (a plain shell has none of it)
    import ray

    from ark_ray.console import JobConsole
    from ark_ray.data.transcribe_pipeline import format_summary, run_transcribe

    own_ray = not ray.is_initialized()    # a caller's Ray session (tests, notebooks) is left as it was
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
    except BaseException:
        console.restore()   # run_job's one line (a user error) or the traceback goes to the terminal
        if console.quiet:
            print(f"(full log: {console.log_path})", file=sys.stderr)
        raise
    finally:
        console.restore()


if __name__ == "__main__":
    run_job("transcribe", main)
