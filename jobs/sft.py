"""Supervised fine-tuning (and teacher-data adaptation): python jobs/sft.py [--config F] [--key=value ...]

The learner ranks are Ray Train workers (TorchTrainer + DeepSpeed) reading their shards of the
manifest through Ray Data; checkpoints, metrics.jsonl, summary.json and the final HF export go to
`output_dir` (a local folder or s3://...). A lost learner node restarts the group from the last
checkpoint (`max_failures`); `--resume` continues a stopped run, also on a new cluster. The
terminal shows a progress bar, a line per evaluation and per recovery, and the closing table; Ray,
DeepSpeed and transformers output goes to job.log in the local run folder (its path is printed).
A bad key, input or output folder is one line on stderr and exit status 2, before Ray starts; a
run that cannot go on (restarts used up) is one line and exit status 1.
"""
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # `python jobs/sft.py` from a clone, without an installed package
    sys.path.insert(0, str(REPO))

from ark_ray.cli import run_job  # noqa: E402
from ark_ray.config import SftConfig, parse_job_args  # noqa: E402
from ark_ray.console import JobConsole, table  # noqa: E402

#: What a run writes into output_dir (ark_ray/train/sft.py): what --overwrite deletes, and what makes a
#: folder "hold a run" (ark_ray.data.preflight.claim_run).
RUN_ARTEFACTS = ("checkpoints", "metrics.jsonl", "summary.json", "final", "snapshots", "init", "job.log")
ROWS = ("steps", "first_loss", "last_loss", "dev_wer", "dev_n", "error_rows", "skipped_bad_rows", "recoveries",
        "samples_per_s", "wall_s", "final_model")


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def preflight(cfg: SftConfig):
    """Inputs readable, the model a model, the run folder writable and claimed (new, --resume or
    --overwrite), before Ray starts; the run folder."""
    from ark_ray.data.preflight import check_input, check_model, claim_run, open_output

    check_input(cfg.train_manifest, "train_manifest", cfg.s3, demo=())
    check_input(cfg.eval_manifest, "eval_manifest", cfg.s3, demo=())
    if not cfg.model.startswith("preset:"):
        check_model(cfg.model, "model", demo=())
    storage = open_output(cfg.output_dir, "output_dir", cfg.s3, cfg.local_dir)
    claim_run(storage, resume=cfg.resume, overwrite=cfg.overwrite, artefacts=RUN_ARTEFACTS)
    return storage


def local_ray_cpus(cfg: SftConfig) -> SftConfig:
    """For a local Ray (no cluster to join, ray.num_cpus unset): enough logical CPUs for the learner
    ranks and the featurize stage. Ray Train keeps the ranks' CPUs from Ray Data, so with Ray's
    default (the machine's cores) a 2-core machine and two 1-CPU ranks left no CPU to read audio
    with, and the run waited forever for its first batch."""
    import dataclasses
    import math
    import os

    if cfg.ray.address or os.environ.get("RAY_ADDRESS") or cfg.ray.num_cpus is not None:
        return cfg
    need = math.ceil(cfg.learner.num_workers * cfg.learner.num_cpus + cfg.featurize_workers)
    if need <= (os.cpu_count() or 1):
        return cfg
    return dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, num_cpus=need))


def main(argv=None) -> dict:
    cfg = local_ray_cpus(parse_job_args(SftConfig, sys.argv[1:] if argv is None else argv))
    storage = preflight(cfg)
    from ark_ray.runtime import cpu_env_defaults

    cpu_env_defaults()   # before torch/DeepSpeed read the environment (a plain shell has none of it)
    from ark_ray.runtime import init_ray
    from ark_ray.train.sft import Hooks, SftFailed, run_sft

    console = JobConsole(storage.local_dir)
    t0 = time.perf_counter()
    since_first = {"samples": 0, "t": None}   # utterances/s over the steps after the first one seen

    def on_step(rec: dict) -> None:
        rate = ""
        if since_first["t"] is None:
            since_first["t"] = time.perf_counter()
        else:
            since_first["samples"] += int(rec.get("samples") or 0)
            rate = f" | {since_first['samples'] / max(time.perf_counter() - since_first['t'], 1e-9):.1f} samples/s"
        bar = console.bar or console.start_bar(cfg.steps, "SFT", "step")
        bar.set_postfix_str(f"loss {rec['loss']:.3f}{rate}", refresh=False)
        bar.n = rec["step"]   # it may go back: a restarted group trains the steps after its checkpoint again
        bar.refresh()

    try:
        console.line(f"SFT: {cfg.model} on {cfg.train_manifest} ({cfg.text_field}), {cfg.steps} steps x "
                     f"{cfg.batch_size} clips (seed {cfg.seed}) -> {storage.uri}")
        console.line(f"Ray / DeepSpeed / transformers logs: {console.log_path}")
        if cfg.model.startswith("preset:"):
            console.line(f"note: {cfg.model} is a randomly initialised model (no pretrained weights): a short run "
                         "learns little and its dev WER stays near 1.0 with empty transcripts; "
                         "--model=assets/models/student fine-tunes the trained demo student instead")
        init_ray(cfg.ray)
        try:
            s = run_sft(cfg, Hooks(line=console.line, step=on_step), storage)
        finally:
            console.close_bar()
        s["job_s"] = time.perf_counter() - t0
        console.line()
        console.line(table([(k, fmt(s.get(k))) for k in ROWS] + [("job_s", fmt(s["job_s"]))]))
        console.line(f"log: {console.log_path}" + ("" if storage.is_local else f" (copied to {storage.uri_of('job.log')})"))
        console.restore()
        storage.upload("job.log")
        return s
    except SftFailed as e:
        console.restore()
        print(f"error: {e} (full log: {console.log_path})", file=sys.stderr)
        storage.upload_after_failure()
        raise SystemExit(1) from None
    except BaseException:
        console.restore()   # the traceback (or the user error's one line) goes to the terminal
        print(f"(full log: {console.log_path})", file=sys.stderr)
        storage.upload_after_failure()
        raise


if __name__ == "__main__":
    run_job("sft", main)
