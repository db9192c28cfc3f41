"""Promote a candidate model onto a running Serve application, gated by held-out WER; roll back.

The loop it closes: a training run exports a student (`<run>/final`); this scores that export and
the model the endpoint serves on the same held-out manifest, through the same engine kind, and
only if the candidate is better by `min_gain` does the application move to it, while requests
keep flowing. Every decision (promoted, refused, rolled back) is appended to
`<state_dir>/<app>/history.json`, which is what `--rollback` reads.

- Scoring is the batch transcription job (`run_transcribe`) with the application's own engine
  settings and token limit, greedy, written under `<state_dir>/<app>/scores/<version>/<key>/`: a
  version's transcripts of one manifest are computed once (the job's resume skips what is there)
  and can be read afterwards (jobs/evaluate.py). The WER is J/WER (eval/report.py).
- The rollout is Serve's in-place update: the application's `args.model` / `args.model_version`
  change and Serve rebuilds it, starting new replicas before stopping old ones (the deployments'
  `max_surge_percent`), draining the old ones; a window whose replica goes away anyway is
  resubmitted by the ingress (serve/windows.py). A rollout that fails or times out is undone.
- The canary (optional) runs the candidate as its own application (`<app>-canary`, no route) and
  the ingress sends it `canary_fraction` of the requests (CanaryConfig, a `user_config` change,
  no restart) for `canary_s`; its 5xx ratio is compared with the served model's from the
  per-version metrics before the rollout. The canary is removed whatever happens.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Callable, Optional

from ark_ray.config import EngineConfig, PromoteConfig, SamplingConfig, TranscribeConfig, UserError, load_config
from ark_ray.data.run_storage import RunStorage
from ark_ray.data.s3 import is_s3, read_bytes, resolve
from ark_ray.serve import control
from ark_ray.serve.versions import model_name, model_version, resolve_model_dir

Report = Callable[[str], None]


class PromoteError(UserError):
    """A promotion or rollback the user's settings or history make impossible (named in the message)."""


class RolloutFailed(RuntimeError):
    """The application did not come up on the new model; its previous config was applied again."""


@dataclasses.dataclass
class Model:
    """A model as the promotion history records it."""
    model: str
    version: str
    wer: Optional[float] = None
    error_rows: Optional[int] = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# ---------------------------------------------------------------------------------- the candidate
def candidate_dir(spec: str, cfg: PromoteConfig, report: Report) -> str:
    """A local model directory for `spec`: a model directory, a run folder's `final` export, an
    s3:// URI of either (downloaded once into model_store, which every node must read), or the
    demo's `demo://student`."""
    if spec.startswith("demo://"):
        from ark_ray.demo import student as demo_student

        if spec != demo_student.SCHEME:
            raise PromoteError(f"candidate: {spec} is not a demo model (the demo's is {demo_student.SCHEME})")
        return str(demo_student.ensure())
    if is_s3(spec):
        fs, root = resolve(spec, cfg.s3)
        sub = "" if _exists(fs, f"{root.rstrip('/')}/config.json") else "final"
        if sub and not _exists(fs, f"{root.rstrip('/')}/final/config.json"):
            raise PromoteError(f"candidate: {spec} has no config.json, nor final/config.json (not an HF-format "
                               "export or a training run's output folder)")
        store = cfg.model_store or (None if is_s3(cfg.state_dir) else os.path.join(cfg.state_dir, "models"))
        if store is None:
            raise PromoteError("model_store: an s3:// candidate needs a path every node reads to download it to "
                               "when state_dir is on S3 too")
        key = hashlib.sha256(spec.rstrip("/").encode()).hexdigest()[:10]
        local = os.path.abspath(os.path.join(store, f"{model_name(spec.rstrip('/') + ('/final' if sub else ''))}-{key}"))
        if not os.path.isfile(os.path.join(local, "config.json")):
            report(f"downloading {spec} -> {local}")
            RunStorage(spec, cfg.s3).download_dir(sub, local + ".part")
            if os.path.isdir(local):
                import shutil

                shutil.rmtree(local)
            os.rename(local + ".part", local)
        return local
    path = resolve_model_dir(spec)
    for d in (path, os.path.join(path, "final")):
        if os.path.isfile(os.path.join(d, "config.json")):
            return os.path.abspath(d)
    raise PromoteError(f"candidate: {spec} has no config.json, nor final/config.json (not an HF-format model "
                       "directory or a training run's output folder)")


def _exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File


# ---------------------------------------------------------------------------------- scoring
def _manifest(cfg: PromoteConfig, report: Report) -> tuple[str, str]:
    """(manifest path or URI, a digest of its bytes): demo:// sets are made on first use."""
    uri = cfg.eval_manifest
    if uri.startswith("demo://"):
        from ark_ray.demo import heldout

        uri = heldout.resolve(uri)
    fs, path = resolve(uri, cfg.s3)
    try:
        data = read_bytes(fs, path)
    except OSError as e:
        raise PromoteError(f"eval_manifest: cannot read {cfg.eval_manifest}: {e}") from None
    return uri, hashlib.sha256(data).hexdigest()


def score(model: Model, app_args: dict, manifest: tuple[str, str], cfg: PromoteConfig, storage: RunStorage,
          report: Report, on_rows: Optional[Callable[[int], None]] = None) -> Model:
    """The held-out J/WER of `model` with the application's engine settings (cached per version,
    manifest and engine settings); fills model.wer and model.error_rows."""
    from ark_ray.data.part_files import read_output
    from ark_ray.data.transcribe_pipeline import run_transcribe
    from ark_ray.eval import evaluate_rows

    engine = load_config(EngineConfig, overrides=dict(app_args.get("engine") or {}))
    max_new = int(app_args.get("max_new_tokens", 128))
    uri, digest = manifest
    settings = {"manifest": digest, "max_new_tokens": max_new,
                **{k: getattr(engine, k) for k in ("backend", "dtype", "max_chunk_s", "max_model_len")}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = storage.uri_of(f"scores/{model.version}/{key}")
    tcfg = TranscribeConfig(input=uri, output=out, model=model.model, num_engines=cfg.score_engines,
                            engine=engine, sampling=SamplingConfig(max_new_tokens=max_new), s3=cfg.s3,
                            overwrite=cfg.rescore, progress=False, ray=cfg.ray)
    summary = run_transcribe(tcfg, on_block=(lambda rows, _s: on_rows(rows)) if on_rows else None)
    rep, _ = evaluate_rows(read_output(out, cfg.s3), model.version, normalizer=cfg.normalizer)
    s = rep.summary()
    if s["jwer"] is None:
        raise PromoteError(f"{model.version}: no held-out row could be scored ({s['error_rows']} error rows of "
                           f"{s['n']}; transcripts in {out})")
    model.wer, model.error_rows = float(s["jwer"]), int(s["error_rows"])
    cached = "cached, " if summary.get("skipped_done") == summary.get("inputs") else ""
    report(f"  {model.version}: WER {model.wer:.4f} on {s['scored']} clips ({cached}{s['error_rows']} error rows; "
           f"transcripts {out})")
    return model


def gate(served: Model, cand: Model, min_gain: float) -> tuple[bool, str]:
    """(promote?, why): better by at least min_gain, and no more rows it cannot transcribe."""
    if cand.error_rows > served.error_rows:
        return False, (f"the candidate failed on {cand.error_rows} held-out rows, the served model on "
                       f"{served.error_rows}")
    gain = served.wer - cand.wer
    if gain >= min_gain - 1e-12:
        return True, f"WER {served.wer:.4f} -> {cand.wer:.4f} ({gain:+.4f} better; needed {min_gain:.4f})"
    return False, (f"the candidate's WER {cand.wer:.4f} is not below the served {served.wer:.4f} by "
                   f"{min_gain:.4f} (difference {gain:+.4f})")


# ---------------------------------------------------------------------------------- history
class History:
    """`<state_dir>/<app>/history.json`: every decision, oldest first (rewritten whole, atomically)."""

    def __init__(self, storage: RunStorage):
        self.storage = storage
        self.entries: list[dict] = storage.read_json("history.json") if storage.exists("history.json") else []

    def add(self, entry: dict) -> dict:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}
        self.entries.append(entry)
        self.storage.write_json("history.json", self.entries, indent=2)
        return entry

    def undo_target(self, version: str) -> Optional[dict]:
        """What `--rollback` returns to from `version`: the model the promotion that brought `version`
        replaced (a rollback's own entry is skipped, so repeated rollbacks keep going back)."""
        for e in reversed(self.entries):
            if e["action"] == "promoted" and e["to"]["version"] == version:
                return e["from"]
        return None


# ---------------------------------------------------------------------------------- the rollout
def served_model(app: str, app_cfg: dict) -> Model:
    """The application's model and version (as its ingress reports it, else from its config)."""
    args = app_cfg.get("args") or {}
    path = resolve_model_dir(str(args.get("model", "")))
    try:
        version = control.ingress_info(app)["version"]
    except Exception:  # noqa: BLE001 - an ingress that is starting: its config says the same
        version = args.get("model_version") or model_version(path)
    return Model(path, version)


def roll_out(app: str, app_cfg: dict, to: Model, cfg: PromoteConfig, report: Report,
             extra: Optional[dict] = None) -> float:
    """Move `app` to model `to` in place; undo it if it does not come up. Returns the seconds it took."""
    t0 = time.perf_counter()
    new = control.with_args(app_cfg, model=to.model, model_version=to.version)
    for name, value in (extra or {}).items():
        new[name] = value
    report(f"rolling out {to.version} on '{app}' (new replicas start before old ones stop) ...")
    since = control.apply({app: new})[app]
    try:
        control.wait_running(app, since, cfg.timeout_s, on_change=lambda s, m: report(f"  {app}: {s} {m}".rstrip()))
    except control.NotRunning as e:
        report(f"rollout failed ({e}); restoring the previous config ...")
        since = control.apply({app: app_cfg})[app]
        control.wait_running(app, since, cfg.timeout_s)
        raise RolloutFailed(f"rollout of {to.version} failed: {e}; '{app}' serves its previous model again") from None
    return time.perf_counter() - t0


def canary_name(app: str) -> str:
    return f"{app}-canary"


def _ingress_canary(app_cfg: dict, canary: Optional[dict]) -> dict:
    """A copy of the application config whose ingress routes to `canary` (CanaryConfig keys), or to
    none (an empty user_config, so running replicas reconfigure to no canary)."""
    out = copy.deepcopy(app_cfg)
    control.deployment_entry(out, control.INGRESS)["user_config"] = dict(canary or {})
    return out


def _canary_app(app_cfg: dict, cand: Model, fraction: float) -> dict:
    """The candidate as its own application: the model deployment alone, no route, the served
    application's arguments and model deployment options; a fixed replica count is scaled to the
    canary's share (at least one), an autoscaling config is kept as it is."""
    out = {"name": canary_name(app_cfg["name"]), "import_path": "ark_ray.serve.app:build_model_app",
           "route_prefix": None, "args": dict(app_cfg.get("args") or {}, model=cand.model,
                                              model_version=cand.version)}
    if app_cfg.get("runtime_env"):
        out["runtime_env"] = copy.deepcopy(app_cfg["runtime_env"])
    models = [copy.deepcopy(d) for d in app_cfg.get("deployments") or [] if d.get("name") == control.MODEL]
    for d in models:
        if isinstance(d.get("num_replicas"), int):
            d["num_replicas"] = max(1, math.ceil(d["num_replicas"] * fraction))
    if models:
        out["deployments"] = models
    return out


def _counts(versions: tuple[str, str]) -> dict[str, tuple[float, float]]:
    """{version: (transcriptions, 5xx)} from the per-version metrics."""
    out = {v: [0.0, 0.0] for v in versions}
    for (version, status), n in control.model_request_counts().items():
        if version in out:
            out[version][0] += n
            if status.startswith("5"):
                out[version][1] += n
    return {v: (t, e) for v, (t, e) in out.items()}


def run_canary(app: str, app_cfg: dict, served: Model, cand: Model, cfg: PromoteConfig, report: Report,
               on_tick: Optional[Callable[[float], None]] = None) -> tuple[bool, str, dict]:
    """Serve `cand` to canary_fraction of the requests for canary_s; (passed?, why, counts). The
    routing is removed before returning (the canary application is left for `end_canary`)."""
    name = canary_name(app)
    report(f"canary: starting {cand.version} as application '{name}' ...")
    since = control.apply({name: _canary_app(app_cfg, cand, cfg.canary_fraction)})[name]
    control.wait_running(name, since, cfg.timeout_s)
    route = {"app": name, "version": cand.version, "fraction": cfg.canary_fraction}
    delta: dict = {}
    try:
        since = control.apply({app: _ingress_canary(app_cfg, route)})[app]
        control.wait_running(app, since, cfg.timeout_s)
        report(f"canary: {cfg.canary_fraction:.0%} of requests go to {cand.version} for {cfg.canary_s:.0f} s")
        start = _counts((served.version, cand.version))
        t_end, verdict = time.monotonic() + cfg.canary_s, (True, "")
        while True:
            left = t_end - time.monotonic()
            if on_tick is not None:
                on_tick(max(0.0, left))
            state = control.status(name)[0]
            if state != "RUNNING":
                verdict = (False, f"the canary application became {state}")
                break
            now = _counts((served.version, cand.version))
            delta = {v: (now[v][0] - start[v][0], now[v][1] - start[v][1]) for v in now}
            ratio = {v: (e / t if t else 0.0) for v, (t, e) in delta.items()}
            if delta[cand.version][0] and ratio[cand.version] > ratio[served.version] + cfg.canary_max_error_ratio:
                verdict = (False, f"the canary answered {ratio[cand.version]:.1%} of its requests with 5xx, the "
                                  f"served model {ratio[served.version]:.1%}")
                break
            if left <= 0:
                break
            time.sleep(min(5.0, left))
    finally:      # no request may go to the canary application once it is removed
        since = control.apply({app: _ingress_canary(app_cfg, None)})[app]
        control.wait_running(app, since, cfg.timeout_s)
    if verdict[0]:
        seen = delta.get(cand.version, (0, 0))
        verdict = (True, f"{int(seen[0])} canary requests counted, {int(seen[1])} answered 5xx" if seen[0]
                   else "no canary request counted yet by the metrics (little traffic, or the exporter lags)")
    return verdict[0], verdict[1], {v: {"requests": int(t), "5xx": int(e)} for v, (t, e) in delta.items()}


def end_canary(app: str, report: Report) -> None:
    """Remove the canary application (its routing is already gone)."""
    name = canary_name(app)
    if control.status(name)[0] != "NOT_STARTED":
        control.apply({name: None})
        control.wait_deleted(name, 300)
        report(f"canary: application '{name}' removed")


def preflight(cfg: PromoteConfig) -> RunStorage:
    """Before Ray starts: the state folder is writable, the manifest readable, the candidate a
    model (one line and exit 2 otherwise, ark_ray/cli.py). Returns `<state_dir>/<app>`."""
    from ark_ray.data.preflight import check_input, open_output

    storage = open_output(f"{cfg.state_dir.rstrip('/')}/{cfg.app}", "state_dir", cfg.s3)
    if not cfg.rollback:
        if is_s3(cfg.candidate):
            check_input(cfg.candidate, "candidate", cfg.s3)
        elif not cfg.candidate.startswith("demo://"):
            candidate_dir(cfg.candidate, cfg, lambda _: None)
        check_input(cfg.eval_manifest, "eval_manifest", cfg.s3)
    return storage


# ---------------------------------------------------------------------------------- the jobs
def promote(cfg: PromoteConfig, storage: RunStorage, report: Report,
            on_rows: Optional[Callable[[str, int], None]] = None,
            on_tick: Optional[Callable[[float], None]] = None) -> dict:
    """Score, gate, (canary,) roll out, record in `storage` (`<state_dir>/<app>`). Returns the
    summary (`decision`: promoted, refused, unchanged)."""
    history = History(storage)
    app_cfg = control.app_config(cfg.app)
    args = app_cfg.get("args") or {}
    served = served_model(cfg.app, app_cfg)
    path = candidate_dir(cfg.candidate, cfg, report)
    cand = Model(path, cfg.version or model_version(path))
    summary: dict = {"app": cfg.app, "served": served, "candidate": cand, "manifest": cfg.eval_manifest,
                     "min_gain": cfg.min_gain}
    report(f"served: {served.version} ({served.model})")
    report(f"candidate: {cand.version} ({cand.model})")
    if cand.version == served.version:
        summary.update(decision="unchanged", why="the candidate is the model being served")
        return summary
    manifest = _manifest(cfg, report)
    engine = (args.get("engine") or {}).get("backend", "vllm")
    report(f"scoring both on {cfg.eval_manifest} with the application's engine ({engine}) ...")
    t0 = time.perf_counter()
    for m in (served, cand):
        score(m, args, manifest, cfg, storage, report, (lambda n, v=m.version: on_rows(v, n)) if on_rows else None)
    summary["score_s"] = time.perf_counter() - t0
    ok, why = gate(served, cand, cfg.min_gain)
    record = {"from": served.to_dict(), "to": cand.to_dict(), "manifest": cfg.eval_manifest, "min_gain": cfg.min_gain}
    if not ok:
        history.add({"action": "refused", **record, "why": why})
        summary.update(decision="refused", why=why)
        return summary
    report(f"gate passed: {why}")
    if cfg.canary_fraction > 0 and cfg.canary_s > 0:
        try:
            passed, cwhy, counts = run_canary(cfg.app, app_cfg, served, cand, cfg, report, on_tick)
            summary["canary"] = counts
            report(f"canary: {cwhy}")
            if not passed:
                history.add({"action": "refused", **record, "why": f"canary: {cwhy}", "canary": counts})
                summary.update(decision="refused", why=f"canary: {cwhy}")
                return summary
            summary["rollout_s"] = roll_out(cfg.app, app_cfg, cand, cfg, report)
        finally:
            end_canary(cfg.app, report)
    else:
        summary["rollout_s"] = roll_out(cfg.app, app_cfg, cand, cfg, report)
    history.add({"action": "promoted", **record, "why": why,
                 **({"canary": summary["canary"]} if "canary" in summary else {})})
    summary.update(decision="promoted", why=why)
    return summary


def rollback(cfg: PromoteConfig, storage: RunStorage, report: Report) -> dict:
    """Undo the last promotion of the served version, or remove a canary left running."""
    history = History(storage)
    app_cfg = control.app_config(cfg.app)
    served = served_model(cfg.app, app_cfg)
    summary: dict = {"app": cfg.app, "served": served}
    ingress = next((d for d in app_cfg.get("deployments") or [] if d.get("name") == control.INGRESS), {})
    left_over = control.status(canary_name(cfg.app))[0] != "NOT_STARTED"
    if (ingress.get("user_config") or {}).get("app") or left_over:
        report("a canary is still set up (an interrupted promotion): removing it; the served model stays")
        since = control.apply({cfg.app: _ingress_canary(app_cfg, None)})[cfg.app]
        control.wait_running(cfg.app, since, cfg.timeout_s)
        end_canary(cfg.app, report)
        history.add({"action": "canary_removed", "from": served.to_dict(), "to": served.to_dict()})
        summary.update(decision="canary_removed", to=served, why="removed the canary left by an interrupted promotion")
        return summary
    target = history.undo_target(served.version)
    if target is None:
        raise PromoteError(f"rollback: no promotion of {served.version} on '{cfg.app}' in "
                           f"{storage.uri_of('history.json')}: nothing to roll back to")
    to = Model(target["model"], target["version"])
    if not os.path.isfile(os.path.join(to.model, "config.json")):
        raise PromoteError(f"rollback: the previous model {to.version} is gone from {to.model}")
    report(f"rolling back '{cfg.app}': {served.version} -> {to.version}")
    summary["rollout_s"] = roll_out(cfg.app, app_cfg, to, cfg, report)
    history.add({"action": "rolled_back", "from": served.to_dict(), "to": to.to_dict()})
    summary.update(decision="rolled_back", to=to, why=f"returned to the model {served.version} replaced")
    return summary
