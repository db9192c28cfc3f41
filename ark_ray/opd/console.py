"""What an OPD run shows its user: one progress bar, a line per evaluation, the closing table.

Everything else the run prints (vLLM, Ray, transformers and DeepSpeed logs, the worker output Ray
forwards to the driver, Python warnings) goes to `<run>/job.log` (ark_ray/console.py, the shape
every job's console shares). The controller reports through
`on_step` / `on_eval` / `on_recovery` (its hooks); `curves.png` is drawn from what they saw.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Optional

from ark_ray.console import JobConsole, table  # noqa: F401  (table: jobs/opd.py's closing table)


class Console(JobConsole):
    """Terminal output of one OPD run; `quiet` moves everything else to `log_path`."""

    def __init__(self, run_dir: str | os.PathLike, quiet: bool = True):
        super().__init__(run_dir, quiet)
        self.total = 0
        self.t_train: Optional[float] = None
        self.samples = 0
        self.steps: list[dict] = []          # step, kl
        self.evals: list[dict] = []          # step, who, wer
        self.teacher_wer: Optional[float] = None

    # ------------------------------------------------------------------ controller hooks
    def start(self, total_steps: int) -> None:
        self.total = total_steps
        self.t_train = time.perf_counter()
        self.start_bar(total_steps, "OPD", "step")

    def on_step(self, rec: dict) -> None:
        if self.bar is None:
            self.start(self.total or rec.get("step", 0))
        self.samples += int(rec.get("samples") or 0)
        self.steps.append({"step": rec["step"], "kl": rec["kl"]})
        rate = self.samples / max(time.perf_counter() - self.t_train, 1e-9)
        self.bar.set_postfix_str(f"kl {rec['kl']:.3f} | {rate:.1f} samples/s | stale dropped "
                                 f"{rec.get('dropped_stale', 0)}", refresh=False)
        self.bar.update(rec["step"] - self.bar.n)

    def on_eval(self, step: int, who: str, wer: Optional[float]) -> None:
        if wer is None or any(e["step"] == step and e["who"] == who for e in self.evals):
            return   # the last periodic evaluation and the final one can fall on the same step
        if who == "teacher":
            self.teacher_wer = wer
        self.evals.append({"step": step, "who": who, "wer": wer})
        label = "teacher" if who == "teacher" else "student"
        self.line(f"step {step:>4}  {label} held-out WER {wer:.3f}")

    def on_recovery(self, line: str) -> None:
        """One line per recovery (a lost actor back, a learner group restarted), above the bar."""
        self.line(line)

    # ------------------------------------------------------------------ outputs
    def save_curves(self, path: Optional[str | os.PathLike] = None) -> Optional[pathlib.Path]:
        """KL and held-out WER by step (teacher's WER as a line) as a PNG; None if Pillow is missing."""
        path = pathlib.Path(path or self.run_dir / "curves.png")
        (self.run_dir / "curves.json").write_text(json.dumps(
            {"steps": self.steps, "evals": self.evals, "teacher_wer": self.teacher_wer}))
        try:
            return draw_curves(self.steps, [e for e in self.evals if e["who"] == "student"],
                               self.teacher_wer, path)
        except ImportError:
            return None


# ---------------------------------------------------------------------- the plot (Pillow only)
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def draw_curves(steps: list[dict], evals: list[dict], teacher_wer: Optional[float],
                path: str | os.PathLike, size: tuple[int, int] = (960, 420)) -> pathlib.Path:
    """Two panels side by side: KL per learner step; student held-out WER at each evaluation,
    with the teacher's WER dashed. Drawn with Pillow, so the job needs no plotting library."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    w, h = size
    panels = [((0, 0, w // 2, h), "KL(teacher || student) per step",
               [("KL", (31, 119, 180), [(s["step"], s["kl"]) for s in steps], False)], None),
              ((w // 2, 0, w, h), "held-out WER",
               [("student", (214, 39, 40), [(e["step"], e["wer"]) for e in evals], True)], teacher_wer)]
    xmax = max([s["step"] for s in steps] + [e["step"] for e in evals] + [1])
    for (x0, y0, x1, y1), title, series, hline in panels:
        left, right, top, bottom = x0 + 60, x1 - 20, y0 + 34, y1 - 46
        ys = [y for _, _, pts, _ in series for _, y in pts if y is not None and math.isfinite(y)]
        if hline is not None:
            ys.append(hline)
        lo, hi = (0.0, max(ys) * 1.1) if ys else (0.0, 1.0)
        yt = _ticks(lo, hi)
        hi = max(hi, yt[-1])
        sx = lambda x: left + (right - left) * x / xmax
        sy = lambda y: bottom - (bottom - top) * (y - lo) / (hi - lo)
        d.text((left, y0 + 10), title, fill="black", font=font)
        for t in yt:
            d.line([(left, sy(t)), (right, sy(t))], fill=(230, 230, 230))
            d.text((x0 + 8, sy(t) - 6), f"{t:g}", fill="black", font=font)
        for t in _ticks(0, xmax):
            d.text((sx(t) - 6, bottom + 6), f"{t:g}", fill="black", font=font)
        d.text(((left + right) // 2 - 12, bottom + 24), "step", fill="black", font=font)
        d.rectangle([left, top, right, bottom], outline="black")
        legend_y = top + 8
        for label, color, pts, dots in series:
            pts = [(sx(x), sy(y)) for x, y in pts if y is not None and math.isfinite(y)]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            if dots:
                for px, py in pts:
                    d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
            d.line([(right - 110, legend_y + 6), (right - 90, legend_y + 6)], fill=color, width=2)
            d.text((right - 84, legend_y), label, fill="black", font=font)
            legend_y += 16
        if hline is not None:
            yy = sy(hline)
            for xs in range(int(left), int(right), 12):
                d.line([(xs, yy), (min(xs + 6, right), yy)], fill=(44, 160, 44), width=2)
            d.line([(right - 110, legend_y + 6), (right - 90, legend_y + 6)], fill=(44, 160, 44), width=2)
            d.text((right - 84, legend_y), f"teacher {hline:.3f}", fill="black", font=font)
    path = pathlib.Path(path)
    img.save(path)
    return path
