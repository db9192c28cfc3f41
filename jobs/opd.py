"""Asynchronous on-policy distillation: python jobs/opd.py [--config F] [--key=value ...]

With no arguments: the embedded demo (local Ray on this CPU, the bundled tiny teacher and student,
unlabelled demo speech generated on first use). Under `ray job submit` it joins that cluster
($RAY_ADDRESS). The terminal shows one progress bar, a line per evaluation and the closing table;
vLLM, Ray, transformers and DeepSpeed output goes to job.log in the local run folder (output_dir
itself when local; for an s3:// or other remote output_dir a local folder the job names, whose
job.log is copied to output_dir at the end, as curves.png is).
A bad key, input, model or output folder, or an output_dir that already holds a run (without
--resume or --overwrite), is one line on stderr and exit status 2, before Ray starts.
"""
import pathlib
import sys
import time
from typing import Optional

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # `python jobs/opd.py` from a clone, without an installed package
    sys.path.insert(0, str(REPO))

from ark_ray.cli import run_job  # noqa: E402
from ark_ray.faults import RecoveryFailed  # noqa: E402
from ark_ray.opd.console import Console, table  # noqa: E402

DEFAULT = pathlib.Path(__file__).parent / "configs" / "opd_tiny.yaml"
#: What a run writes into output_dir: what --overwrite deletes, and what makes a folder "hold a run"
#: (ark_ray.data.preflight.claim_run).
RUN_ARTEFACTS = ("checkpoints", "metrics.jsonl", "summary.json", "final", "init", "curves.png", "curves.json",
                 "job.log")


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _relative_cut(before, after):
    return (before - after) / before if before and after is not None else None


def closing_rows(s: dict) -> list[tuple[str, str]]:
    before, after = s.get("student_wer_before"), s.get("student_wer_after")
    cut = _relative_cut(before, after)
    rows = [("student_wer_before", fmt(before)), ("student_wer_after", fmt(after)),
            ("relative_wer_cut", f"{cut:.1%}" if cut is not None else "-"),
            ("teacher_wer", fmt(s.get("teacher_wer")))]
    for k in ("steps", "kl_first", "kl_last", "samples_per_s", "dropped_stale", "recoveries", "weight_sync",
              "startup_s", "train_s", "wall_s", "final_model"):
        rows.append((k, fmt(s.get(k))))
    return rows


def preflight(cfg):
    """Inputs readable, the models models, the run folder writable and claimed (new, --resume or
    --overwrite), before Ray starts; the run folder."""
    from ark_ray.data.preflight import check_input, check_model, claim_run, open_output

    check_input(cfg.train_manifest, "train_manifest", cfg.s3)
    check_input(cfg.eval_manifest, "eval_manifest", cfg.s3)
    check_model(cfg.student, "student")
    check_model(cfg.teacher, "teacher")
    storage = open_output(cfg.output_dir, "output_dir", cfg.s3, cfg.local_dir)
    claim_run(storage, resume=cfg.resume, overwrite=cfg.overwrite, artefacts=RUN_ARTEFACTS)
    return storage


def main(argv=None) -> dict:
    from ark_ray.config import OpdConfig, parse_job_args

    cfg = parse_job_args(OpdConfig, sys.argv[1:] if argv is None else argv, default_config=DEFAULT)
    student_spec, eval_spec = cfg.student, cfg.eval_manifest
    storage = preflight(cfg)
    from ark_ray.runtime import cpu_env_defaults

    cpu_env_defaults()   # before torch/vLLM/DeepSpeed read the environment (a plain shell has none of it)
    from ark_ray.demo import student as demo_student
    from ark_ray.demo import heldout, unlabelled

    console = Console(storage.local_dir)
    console.total = cfg.steps
    t0 = time.perf_counter()
    try:
        console.line(f"OPD: student {cfg.student} <- teacher {cfg.teacher}; {cfg.steps} steps x "
                     f"{cfg.rollout_batch_size} clips of {cfg.train_manifest} (seed {cfg.seed})")
        console.line(f"vLLM / Ray / transformers logs: {console.log_path}")
        if not storage.is_local:
            console.line(f"outputs and checkpoints: {storage.uri}")
        # demo:// inputs are made on first use and cached (ark_ray/demo); absolute paths, since
        # actors may not share the driver's working directory
        cfg.student = str(pathlib.Path(demo_student.resolve(cfg.student)).resolve())
        cfg.train_manifest = _made_on_first_use(console, cfg.train_manifest, unlabelled.resolve, "unlabelled")
        cfg.eval_manifest = _made_on_first_use(console, cfg.eval_manifest, heldout.resolve, "held-out")
        from ark_ray.opd.controller import OpdController
        from ark_ray.runtime import init_ray

        console.line("starting Ray, the rollout engine (vLLM), the teacher and the learner (DeepSpeed) ...")
        init_ray(cfg.ray)
        ctl = OpdController(cfg, storage)
        ctl.on_step, ctl.on_eval, ctl.say = console.on_step, console.on_eval, console.line
        ctl.on_recovery = console.on_recovery
        console.line(f"actors up in {ctl.startup.get('total_s', 0):.0f} s; held-out WER before training:")
        try:
            s = ctl.run()
        finally:
            console.close_bar()
            ctl.shutdown()
        plot = console.save_curves()
        storage.upload("curves.json")
        plot = plot and storage.upload("curves.png")
        s["job_s"] = time.perf_counter() - t0
        console.line()
        console.line(table(closing_rows(s) + [("job_s", fmt(s["job_s"]))]))
        for line in baseline_lines(student_spec, eval_spec, cfg):
            console.line(line)
        if plot:
            console.line(f"curves: {plot}")
        console.line(f"log: {console.log_path}" + ("" if storage.is_local else f" (copied to {storage.uri_of('job.log')})"))
        storage.upload("job.log")
        return s
    except RecoveryFailed as e:   # a lost node the run could not get over: one line, no traceback
        console.restore()
        storage.upload_after_failure()
        raise SystemExit(f"error: {e} (log: {console.log_path})") from None
    except BaseException:
        console.restore()   # the traceback goes to the terminal
        print(f"(full log: {console.log_path})", file=sys.stderr)
        storage.upload_after_failure()
        raise


def _made_on_first_use(console: Console, uri: Optional[str], resolve, what: str) -> Optional[str]:
    """`uri` as a manifest path: a demo:// set is generated by `resolve` (once, then cached) with a
    progress line every 10 s; any other value is returned as it is."""
    if not (uri and uri.startswith("demo://")):
        return uri
    t0, last = time.perf_counter(), 0.0   # the first clip is reported at once

    def report(done: int, n: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if done == n or now - last > 10:
            last = now
            console.line(f"  generating {what} demo audio (first run only): {done}/{n}")
    path = resolve(uri, progress=report)
    console.line(f"{what} audio: {path} ({time.perf_counter() - t0:.0f} s)")
    return path


def baseline_lines(student_spec: str, eval_spec: str, cfg) -> list[str]:
    """The demo's baselines as measured by bench/demo_opd.py (3 seeds each; docs/benchmarks.md),
    shown when this run is the demo (same student, step budget and held-out set)."""
    import json

    f = DEFAULT.with_suffix(".baselines.json")
    if not f.exists():
        return []
    b = json.loads(f.read_text())
    if (b.get("student"), b.get("steps"), b.get("rollout_batch_size"), b.get("eval_manifest")) != (
            student_spec, cfg.steps, cfg.rollout_batch_size, eval_spec):
        return []
    out = ["", f"baselines for this demo ({b['source']}; mean over seeds {b['seeds']}):"]
    out += [f"  {name}: student WER {r['before']:.3f} -> {r['after']:.3f} ({r['cut']:.1%} cut)"
            for name, r in b["rows"].items()]
    return out


if __name__ == "__main__":
    run_job("opd", main)
