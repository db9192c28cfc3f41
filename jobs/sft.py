"""Supervised fine-tuning (and teacher-data adaptation): python jobs/sft.py [--config F] [--key=value ...]"""
import sys

from ark_ray.config import SftConfig, parse_job_args
from ark_ray.runtime import init_ray
from ark_ray.train.sft import run_sft


def main(argv=None) -> dict:
    cfg = parse_job_args(SftConfig, sys.argv[1:] if argv is None else argv)
    init_ray(cfg.ray)
    s = run_sft(cfg)
    print("\n| metric | value |\n|---|---|")
    for k in ("steps", "first_loss", "last_loss", "dev_wer", "dev_n", "error_rows", "wall_s", "final_model"):
        if k in s:
            print(f"| {k} | {s[k]:.4f} |" if isinstance(s[k], float) else f"| {k} | {s[k]} |")
    return s


if __name__ == "__main__":
    main()
