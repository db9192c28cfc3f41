"""Supervised fine-tuning on Ray Train: the driver of `jobs/sft.py`.

Also the teacher-data adaptation step: point `train_manifest` at a transcribe output and set
`text_field=pred_text`.

What runs where:
- this driver checks the manifests (one streaming pass each, data/manifest_dataset.py), makes the
  start model when it is a preset, builds a `TorchTrainer` and follows it through an event queue
  that lives on the driver's node: it prints (through the job's hooks), writes `metrics.jsonl`
  and `summary.json` to the run's storage (data/run_storage.py) and counts recoveries. It holds no
  rows and no weights.
- Ray Train's controller (on the driver's node) places the learner ranks in one placement group
  (`ScalingConfig`: STRICT_PACK where one node has room, else PACK), builds each rank's dataset
  (ark_ray/train/sft_input.py) and restarts the group from its last checkpoint when a rank fails or
  its node is lost (`FailureConfig(max_failures)`).
- every rank runs ark_ray/train/sft_loop.py: DeepSpeed training on its shard, checkpoints to
  `output_dir/checkpoints/step_N` (every rank's shards, through Ray Train's storage: s3:// or any
  pyarrow filesystem), eval and the HF export on rank 0.

Exactness: the data order is a fixed function of (seed, epoch) and each checkpoint carries its
data step, so a restarted group and a `--resume` on a brand-new cluster train exactly the rows an
uninterrupted run would, each step once. `metrics.jsonl` keeps one record per trained step: when a
group restarts from step k, the records of the steps after k (which are trained again) are cut
and a recovery record takes their place.
"""
from __future__ import annotations

import json
import os
import pathlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import ray
from ray.train.v2.api.callback import UserCallback

from ark_ray.config import SftConfig, UserError, to_dict
from ark_ray.data.run_storage import RunStorage

#: The Ray Train run folder inside output_dir (checkpoints/step_N and Ray Train's snapshot).
CHECKPOINTS = "checkpoints"


class SftFailed(RuntimeError):
    """The run cannot go on (learner restarts used up, or no room for the group): one line naming
    the lost node and role and how to `--resume`."""


def prepare_model(cfg: SftConfig, storage: RunStorage) -> tuple[dict, str]:
    """(where the ranks find the start model, a local copy of it for the driver). A `preset:NAME`
    model is made once as the run's `init/` folder (kept in its storage, so `--resume` on another
    cluster starts from the same weights); a model directory is used as it is (every node needs it)."""
    if not cfg.model.startswith("preset:"):
        return {"dir": os.path.abspath(cfg.model)}, os.path.abspath(cfg.model)
    from ark_ray.demo.corpus import vocabulary_texts
    from ark_ray.model.factory import save_random_model
    from ark_ray.model.tokenizer import build_tiny_tokenizer

    local = storage.local("init")
    if storage.exists("init/model.safetensors"):
        if not storage.is_local and not (local / "model.safetensors").exists():
            storage.download_dir("init", local)
    else:
        preset = cfg.model.split(":", 1)[1]
        tok = build_tiny_tokenizer(vocabulary_texts(), vocab_size=1024) if preset == "tiny" else None
        save_random_model(local, preset, tokenizer=tok, seed=cfg.learner.seed, **cfg.model_overrides)
        storage.upload("init")
    return {"run": "init"}, str(local)


def last_checkpoint(storage: RunStorage) -> Optional[int]:
    """The data step of the run's last checkpoint in `output_dir/checkpoints` (None: no run there)."""
    if not storage.exists(f"{CHECKPOINTS}/checkpoint_manager_snapshot.json"):
        return None
    from ray.train import Result

    result = Result.from_path(storage.path(CHECKPOINTS), storage_filesystem=storage.fs)
    if result.checkpoint is None:
        return None
    step = (result.metrics or {}).get("data_step")
    return int(step) if step is not None else int(result.checkpoint.path.rstrip("/").rsplit("_", 1)[-1])


def cut_after(lines: list[str], step: int) -> int:
    """How many leading metrics lines a run restarted from the checkpoint at `step` keeps: through the
    last record that is not a step record of a later step (recovery records stay; the steps after
    `step` are trained again and recorded again)."""
    keep = 0
    for i, line in enumerate(lines):
        rec = json.loads(line)
        if rec.get("event") is not None or int(rec.get("step", 0)) <= step:
            keep = i + 1
    return keep


def _node_alive() -> dict[str, bool]:
    return {n["NodeID"]: bool(n.get("Alive")) for n in ray.nodes()}


def lost_nodes(nodes: list[str], wait_s: float = 0.0) -> list[str]:
    """The nodes of `nodes` Ray reports dead, waiting up to `wait_s` for one to be declared dead."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = _node_alive()
        dead = sorted({n for n in nodes if not alive.get(n, False)})
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(1.0)


def _short(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    first = first if type(error).__name__ in first else f"{type(error).__name__}: {first}"
    return first if len(first) <= limit else first[: limit - 3] + "..."


class SftEvents(UserCallback):
    """Ray Train controller callback: a worker-group failure goes to the driver's event queue at once
    (the restarted group's first event then says what came back, and when)."""

    def __init__(self, events):
        self.events = events

    def after_exception(self, run_context, worker_exceptions) -> None:
        causes = {int(r): _short(getattr(e, "health_check_failure", None) or e) for r, e in worker_exceptions.items()}
        self.events.put({"event": "failure", "t": time.time(), "errors": causes})


def pack_strategy(bundles: list[dict], nodes: list[dict]) -> str:
    """STRICT_PACK when one live node has room for every rank's bundle, else PACK."""
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    return "STRICT_PACK" if any(all(n.get(k, 0.0) >= v for k, v in need.items()) for n in nodes) else "PACK"


@dataclass
class Hooks:
    """What the job shows: `line(text)` a console line, `step(record)` a trained step."""
    line: Callable[[str], None] = print
    step: Callable[[dict], None] = lambda rec: None


@dataclass
class RunState:
    """The driver's view of the run, built from the ranks' events."""
    steps: dict = field(default_factory=dict)        # step -> (loss, error_rows, samples): the effective record
    nodes: list = field(default_factory=list)         # the current group's node of each rank
    failure: Optional[dict] = None                    # the last failure event not yet recovered
    recoveries: int = 0
    last_checkpoint: int = 0
    last_step: int = 0
    final: dict = field(default_factory=dict)
    dev: dict = field(default_factory=dict)
    started: bool = False


class SftDriver:
    """One SFT run from the driver: trainer, event handling, metrics and summary."""

    def __init__(self, cfg: SftConfig, hooks: Optional[Hooks] = None, storage: Optional[RunStorage] = None):
        self.cfg = cfg
        self.hooks = hooks or Hooks()
        self.storage = storage or RunStorage(cfg.output_dir, cfg.s3, cfg.local_dir)
        self.state = RunState()

    # ------------------------------------------------------------------ set-up
    def _inputs(self):
        from ark_ray.data.manifest_dataset import open_manifest
        from ark_ray.train.sft_input import SftInput

        cfg = self.cfg
        train = open_manifest(cfg.train_manifest, cfg.text_field, skip_bad_rows=cfg.skip_bad_rows, s3=cfg.s3)
        self.train_rows, self.skipped_rows = train.rows, train.skipped
        if train.skipped:
            self.hooks.line(f"skipped {train.skipped} bad row(s) of {cfg.train_manifest} (skip_bad_rows)")
        evals = (open_manifest(cfg.eval_manifest, cfg.text_field, skip_bad_rows=cfg.skip_bad_rows, s3=cfg.s3)
                 if cfg.eval_manifest else None)
        sft_input = SftInput(train.dataset, train.rows, seed=cfg.seed, batch_size=cfg.batch_size, steps=cfg.steps,
                             text_field=cfg.text_field, max_audio_s=cfg.max_audio_s,
                             featurize_workers=cfg.featurize_workers, start_step=self.start_step)
        # the first eval_max_samples rows, handed to rank 0 (a bounded list, not the eval manifest)
        eval_rows = evals.dataset.limit(cfg.eval_max_samples).take_all() if evals else None
        return sft_input, eval_rows

    def _events_queue(self):
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()   # not on a worker node that may vanish
        return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)})

    def build_trainer(self, model: dict, sft_input, eval_rows, events):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from ark_ray.train.sft_loop import train_loop

        cfg, lc = self.cfg, self.cfg.learner
        bundle = {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.use_gpu else {})}
        self.strategy = pack_strategy([bundle] * lc.num_workers, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        storage_path, fs = self.storage.for_ray_train()
        # each (re)start of the group may wait this long for room (a replacement node) before it
        # counts as a failed start (Ray Train reads it in its controller)
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.recovery_timeout_s)
        return TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg, "storage": self.storage, "events": events, "model": model,
                               "eval_rows": eval_rows},
            scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=lc.use_gpu, resources_per_worker=bundle,
                                         placement_strategy=self.strategy),
            torch_config=TorchConfig(backend="nccl" if lc.use_gpu else "gloo"),
            run_config=RunConfig(
                name=CHECKPOINTS, storage_path=storage_path, storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=cfg.max_failures,
                                             controller_failure_limit=max(0, cfg.max_failures)),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                callbacks=[sft_input, SftEvents(events)]),
            datasets={"train": sft_input},
            dataset_config=sft_input.data_config(),
        )

    # ------------------------------------------------------------------ events (driver thread)
    def _handle(self, ev: dict) -> None:
        kind = ev.pop("event")
        st = self.state
        if kind == "start":
            if st.started:
                self._recovered(ev)
            st.started, st.nodes = True, ev["nodes"]
            st.last_checkpoint = max(st.last_checkpoint, ev["after_step"])
        elif kind == "failure":
            st.failure = ev
        elif kind == "step":
            self._step(ev)
        elif kind == "checkpoint":
            st.last_checkpoint = ev["step"]
            self.metrics.flush(upload=True)
        elif kind == "final":
            st.final = ev

    def _step(self, rec: dict) -> None:
        st = self.state
        for e in rec.get("errors", []):
            self.hooks.line(f"error row: {e['id']} ({e['audio']}): {e['error']}")
        st.steps[rec["step"]] = (rec.get("loss"), rec.get("error_rows", 0), rec.get("samples", 0))
        st.last_step = rec["step"]
        if "dev_wer" in rec:
            st.dev = {k: rec[k] for k in ("dev_wer", "dev_n") if k in rec}
            self.hooks.line(f"step {rec['step']:>5}  dev WER {rec['dev_wer']:.3f} ({rec.get('dev_n', 0)} clips)")
        self.metrics.append(rec)
        self.metrics.flush()
        from ark_ray import metrics as prom
        prom.record("ark_sft_step", rec["step"])
        if rec.get("samples"):
            prom.record("ark_sft_samples_total", rec["samples"])
        if rec.get("loss") == rec.get("loss"):
            prom.record("ark_sft_loss", rec["loss"])
        self.hooks.step(rec)

    def _recovered(self, ev: dict) -> None:
        """The restarted group's first event: what was lost, what came back where, how long it took."""
        st = self.state
        st.recoveries += 1
        failure = st.failure or {}
        dead = lost_nodes(st.nodes)
        lost_ranks = [r for r, n in enumerate(st.nodes) if n in dead] or sorted(failure.get("errors", {}))
        redone = list(range(ev["after_step"] + 1, st.last_step + 1))
        seconds = ev["t"] - failure.get("t", ev["t"])
        rec = {"event": "recovery", "recovery": st.recoveries, "role": "learner", "lost_nodes": dead,
               "lost_ranks": lost_ranks, "error": next(iter(failure.get("errors", {}).values()), ""),
               "restored_step": ev["after_step"], "redone_steps": redone, "nodes": ev["nodes"],
               "seconds": round(seconds, 1)}
        # the steps after the checkpoint are trained again: their records go, the recovery's stays
        self.metrics.flush()
        lines = self.metrics.local_path.read_text().splitlines()
        self.metrics.truncate(cut_after(lines, ev["after_step"]))
        for s in redone:
            st.steps.pop(s, None)
        st.last_step = ev["after_step"]
        st.failure = None
        self.metrics.append(rec)
        self.metrics.flush(upload=True)
        from ark_ray import metrics as prom
        prom.record("ark_sft_recoveries_total", 1, {"role": "learner"})
        what = (f"learner rank(s) {','.join(map(str, lost_ranks))} lost with node(s) {', '.join(n[:12] for n in dead)}"
                if dead else f"learner rank(s) {','.join(map(str, lost_ranks))} failed ({rec['error']})")
        back = ", ".join(sorted({n[:12] for n in ev["nodes"]}))
        again = (f"; step {redone[0]} trained again" if len(redone) == 1 else
                 f"; steps {redone[0]}-{redone[-1]} trained again" if redone else "")
        self.hooks.line(f"recovery {st.recoveries}: {what}; {len(ev['nodes'])} learner rank(s) restarted on node(s) "
                        f"{back} from the checkpoint at step {ev['after_step']} in {seconds:.0f} s{again}")

    def _follow(self, events, stop: threading.Event, errors: list) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                ev = events.get(timeout=0.5)
            except Empty:
                if stop.is_set():
                    return
                continue
            except Exception as e:  # noqa: BLE001 - the queue actor is gone: nothing more will come
                errors.append(e)
                return
            try:
                self._handle(ev)
            except Exception as e:  # noqa: BLE001 - raised in the driver after fit()
                errors.append(e)
                return

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        cfg, storage = self.cfg, self.storage
        found = last_checkpoint(storage)
        if found is not None and not cfg.resume:   # Ray Train would quietly continue it
            raise UserError(f"output_dir: {storage.uri} already holds an SFT run (checkpoint at step {found}); pass "
                            "--resume to continue it, --overwrite to replace it, or choose another output folder")
        self.start_step = found or 0
        if cfg.resume:
            self.hooks.line(f"resuming {storage.uri} after step {self.start_step}" if found is not None
                            else f"no checkpoint in {storage.uri} yet: starting at step 0")
        ctx = ray.data.DataContext.get_current()   # datasets keep the context they are made in
        ctx.enable_progress_bars = False           # the job draws its own bar; Ray Data's would fill job.log
        sft_input, eval_rows = self._inputs()      # bad manifests fail here, before anything is made
        model, self.local_model = prepare_model(cfg, storage)
        self.metrics = storage.metrics_log()
        if found is not None:   # the records of steps after the checkpoint go (they are trained again)
            self.metrics.flush()
            lines = self.metrics.local_path.read_text().splitlines()
            lines = lines[:cut_after(lines, found)]
            self.metrics.truncate(len(lines))
            for rec in map(json.loads, lines):   # the run so far, for its summary
                if rec.get("event") == "recovery":
                    self.state.recoveries += 1
                elif "step" in rec:
                    self.state.steps[rec["step"]] = (rec.get("loss"), rec.get("error_rows", 0), 0)
        self.state.last_step = self.state.last_checkpoint = self.start_step
        events = self._events_queue()
        trainer = self.build_trainer(model, sft_input, eval_rows, events)
        self.hooks.line(f"learner: {cfg.learner.num_workers} rank(s) ({self.strategy}), "
                        f"{'GPU' if cfg.learner.use_gpu else 'CPU'}, ZeRO-{cfg.learner.zero_stage}; "
                        f"{self.train_rows} training rows; checkpoints in {storage.uri_of(CHECKPOINTS)}")
        stop, errors = threading.Event(), []
        follower = threading.Thread(target=self._follow, args=(events, stop, errors), daemon=True)
        t0 = time.time()
        follower.start()
        failed: Optional[BaseException] = None
        try:
            trainer.fit()
        except Exception as e:  # noqa: BLE001 - explained below
            failed = e
        finally:
            stop.set()
            follower.join()
            self.metrics.close()
        if errors:
            raise errors[0]
        if failed is not None:
            raise self._failure(failed) from failed
        return self._summary(time.time() - t0)

    def _failure(self, error: BaseException) -> BaseException:
        """The error to end the job with: one line when ranks were lost with their node (restarts used
        up, or no room to restart), else the worker's own error (a bug or bad input travels as it is)."""
        from ray.train import ControllerError, WorkerGroupError

        st = self.state
        dead = lost_nodes(st.nodes, wait_s=20.0) if st.nodes else []
        last = last_checkpoint(self.storage)
        resume = (f"the last checkpoint is step {last} in {self.storage.uri_of(CHECKPOINTS)}: run the job again with "
                  "--resume (same output_dir) to continue" if last is not None else
                  "no checkpoint was made: run the job again to start over")
        if isinstance(error, ControllerError):
            return SftFailed(f"SFT stopped: the learner group could not (re)start within recovery_timeout_s="
                             f"{self.cfg.recovery_timeout_s:g} s ({_short(error.controller_failure)}); {resume}")
        if isinstance(error, WorkerGroupError) and dead:
            ranks = [r for r, n in enumerate(st.nodes) if n in dead]
            return SftFailed(f"SFT stopped at step {st.last_step}: learner rank(s) {','.join(map(str, ranks))} lost with "
                             f"node(s) {', '.join(dead)} and max_failures={self.cfg.max_failures} restart(s) used up; "
                             f"{resume}")
        if isinstance(error, WorkerGroupError) and error.worker_failures:
            return next(iter(error.worker_failures.values()))
        return error

    def _summary(self, wall_s: float) -> dict:
        st, cfg = self.state, self.cfg
        losses = [st.steps[s][0] for s in sorted(st.steps)]
        summary = {"steps": max(st.steps) if st.steps else self.start_step, "first_loss": losses[0] if losses else None,
                   "last_loss": losses[-1] if losses else None,
                   "error_rows": sum(v[1] for v in st.steps.values()), "skipped_bad_rows": self.skipped_rows,
                   "train_rows": self.train_rows, "recoveries": st.recoveries,   # the run's, over every --resume
                   "wall_s": wall_s,
                   # utterances trained by this invocation (steps resumed past count 0) per second of it
                   "samples_per_s": sum(v[2] for v in st.steps.values()) / max(wall_s, 1e-9)}
        summary.update({k: v for k, v in st.final.items() if k in ("final_model", "dev_wer", "dev_n", "example")})
        self.storage.write_json("summary.json", {"summary": summary, "config": to_dict(cfg, redact=True)}, indent=2,
                                default=str)
        return summary


def run_sft(cfg: SftConfig, hooks: Optional[Hooks] = None, storage: Optional[RunStorage] = None) -> dict:
    """Run SFT on the connected Ray cluster; the summary (also `summary.json` in output_dir)."""
    return SftDriver(cfg, hooks, storage).run()
