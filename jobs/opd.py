"""Asynchronous on-policy distillation: python jobs/opd.py [--config F] [--key=value ...]

With no arguments: the embedded demo (local Ray on this CPU, the bundled tiny teacher and student,
the bundled speech). Under `ray job submit` it joins that cluster ($RAY_ADDRESS).
"""
import pathlib
import sys

from ark_ray.config import OpdConfig, parse_job_args
from ark_ray.opd.controller import OpdController
from ark_ray.runtime import init_ray

DEFAULT = pathlib.Path(__file__).parent / "configs" / "opd_tiny.yaml"


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def main(argv=None) -> dict:
    cfg = parse_job_args(OpdConfig, sys.argv[1:] if argv is None else argv, default_config=DEFAULT)
    init_ray(cfg.ray)
    ctl = OpdController(cfg)
    try:
        s = ctl.run()
    finally:
        ctl.shutdown()
    print("\n| metric | value |\n|---|---|")
    for k in ("mode", "steps", "student_wer_before", "student_wer_after", "teacher_wer", "kl_first", "kl_last",
              "union_size", "samples_per_s", "dropped_stale", "weight_sync", "sync_s_median", "startup_s",
              "train_s", "wall_s", "final_model"):
        print(f"| {k} | {fmt(s.get(k))} |")
    return s


if __name__ == "__main__":
    main()
