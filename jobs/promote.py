"""Promote a trained model onto the running endpoint, gated by held-out WER; or roll back:

    python jobs/promote.py --candidate=runs/opd [--app=ark-asr] [--eval_manifest=M] [--min_gain=0.005]
                           [--canary_fraction=0.1 --canary_s=300] [--config FILE] [--key=value ...]
    python jobs/promote.py --rollback [--app=ark-asr]

Joins the cluster in $RAY_ADDRESS (as under `ray job submit`), where the Serve application runs.
Scores the candidate (a model directory, a run folder's `final` export, or s3://) and the served
model on the same manifest with the application's engine settings, prints both WERs, and rolls the
candidate onto the application in place if it is better by `min_gain` (optionally after serving a
canary share of the traffic); otherwise keeps the served model and says why. The served version
then shows in GET /v1/models and the X-Ark-Model-Version header. Exit status: 0 promoted (or
rolled back, or nothing to do), 3 refused by the gate, 1 the rollout failed (the served model is
kept), 2 a bad key, input or application (one line on stderr, checked before Ray starts).
Ray and transcription logs go to <state_dir>/<app>/job.log. Every key: docs/config.md (PromoteConfig).
"""
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # `python jobs/promote.py` from a clone, without an installed package
    sys.path.insert(0, str(REPO))

from ark_ray.console import JobConsole, table  # noqa: E402

REFUSED, FAILED = 3, 1


def closing_rows(s: dict) -> list[tuple[str, str]]:
    def wer(m):
        return "-" if m is None or m.wer is None else f"{m.wer:.4f}"

    served, cand, to = s.get("served"), s.get("candidate"), s.get("to")
    rows = [("application", s["app"]), ("decision", s["decision"]), ("why", s.get("why", "-"))]
    if served is not None:
        rows += [("served_before", served.version), ("served_wer", wer(served))]
    if cand is not None:
        rows += [("candidate", cand.version), ("candidate_wer", wer(cand))]
    if s.get("decision") == "promoted":
        to = cand
    rows.append(("served_now", (to or served).version if (to or served) else "-"))
    for key, value in (s.get("canary") or {}).items():
        rows.append((f"canary: {key}", f"{value['requests']} requests, {value['5xx']} 5xx"))
    for key in ("score_s", "rollout_s", "job_s"):
        if s.get(key) is not None:
            rows.append((key, f"{s[key]:.1f}"))
    return rows


def main(argv: list[str]) -> int:
    from ark_ray.config import PromoteConfig, parse_job_args
    from ark_ray.serve import promote as P
    from ark_ray.serve.control import NotRunning

    cfg = parse_job_args(PromoteConfig, argv)
    storage = P.preflight(cfg)
    console = JobConsole(storage.local(""))
    t0 = time.perf_counter()
    bar = None
    try:
        if cfg.rollback:
            console.line(f"promote --rollback: application '{cfg.app}' (history: {storage.uri_of('history.json')})")
        else:
            console.line(f"promote: {cfg.candidate} -> application '{cfg.app}' if its WER on {cfg.eval_manifest} is "
                         f"at least {cfg.min_gain} below the served model's"
                         + (f"; canary {cfg.canary_fraction:.0%} for {cfg.canary_s:.0f} s" if cfg.canary_fraction else ""))
        console.line(f"Ray / Serve / transcription logs: {console.log_path}")
        from ark_ray.runtime import init_ray

        init_ray(cfg.ray)
        if cfg.rollback:
            s = P.rollback(cfg, storage, console.line)
        else:
            from tqdm import tqdm

            def rows(version: str, n: int) -> None:
                nonlocal bar
                if bar is None or bar.desc != version:
                    if bar is not None:
                        bar.close()
                    bar = tqdm(file=console.term, desc=version, unit="clip", dynamic_ncols=True, mininterval=0.5)
                    console.bar = bar
                bar.update(n)

            shown = [float("inf")]

            def tick(left: float) -> None:       # a line every 30 s of the canary
                if shown[0] - left >= 30:
                    shown[0] = left
                    line(f"  canary: {left:.0f} s left")

            def line(msg: str) -> None:          # an event line ends the scoring bar above it
                nonlocal bar
                if bar is not None:
                    bar.close()
                    bar = console.bar = None
                console.line(msg)

            s = P.promote(cfg, storage, line, rows, tick)
        if bar is not None:
            bar.close()
            console.bar = None
        s["job_s"] = time.perf_counter() - t0
        console.line()
        console.line(table(closing_rows(s)))
        console.line(f"log: {console.log_path}")
        storage.upload("job.log")
        return REFUSED if s["decision"] == "refused" else 0
    except (P.RolloutFailed, NotRunning) as e:    # the cluster's failure, not a bug: one line, the log
        if bar is not None:
            bar.close()
            console.bar = None
        console.line(f"promote failed: {e}")
        console.line(f"log: {console.log_path}")
        return FAILED
    except BaseException:
        console.restore()   # a user error's one line (ark_ray/cli.py) or the traceback goes to the terminal
        print(f"(full log: {console.log_path})", file=sys.stderr)
        raise


if __name__ == "__main__":
    from ark_ray.cli import run_job

    sys.exit(run_job("promote", main))
