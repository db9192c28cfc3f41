"""The OPD controller: rollout -> teacher -> learner, asynchronously, through the object store.

    data order --> [RolloutWorker x R] --(TrajectoryBatch refs)--> [TeacherScorer x S] --> learner
                          ^                                                                   |
                          +---- weights (CUDA IPC / NCCL / object store), v+1 every sync_every --+

* Bounded queues: at most `max_inflight` batches between rollout start and learner; nothing is
  produced faster than the learner can take it.
* Versions: every trajectory carries the weights version that produced it; at the learner,
  trajectories older than `max_staleness` versions are dropped and counted, and a step that drops
  more than half its batch warns with the version each rollout worker is on.
* Weight sync (ark_ray.train.weight_sync): queued behind each worker's current rollout; collected
  without blocking; a sync that fails on any worker (after retries) fails the run with that
  worker's error, and it counts as done only once every worker reports the new version.
* Data: positions 0, 1, 2, ... index an endless sequence of epochs (epoch e = position // N, each
  epoch its own seeded permutation), so the source never runs dry however many samples are dropped.
  The manifests are read and the audio decoded by Ray Data (ark_ray.data.clip_stream): the driver
  holds positions and refs of decoded blocks only, each batch travels as a ClipRefs, and its blocks
  are released once the learner has trained on it, so the object store holds the in-flight window.
  Each clip's rollout sampling seed derives from `seed` and its position (`rollout_seeds`).
* Placement: rollout workers and teacher scorers spread over the nodes (SPREAD), the learner ranks
  in one placement group (ark_ray.train.learner).
* A lost node (ark_ray.opd.recovery) does not end the run, whatever it hosted:
  - rollout worker / teacher scorer: Ray restarts the actor (max_actor_restarts) where there is
    room; every batch whose rollout or scoring was lost is redone from its data positions, with
    its audio loaded again; a restarted rollout worker gets the current weights (a new version,
    pushed to every worker) before it serves again. Ray's own call retries are off: the
    controller redoes the work, so nothing runs twice behind its back.
  - learner rank: the learner group is started again (max_failures times at most) and loads the
    last checkpoint of this run (or starts over when there is none); the data positions rewind to
    the checkpoint's, so the same positions are trained again, in the same order; work in flight
    (made by weights newer than the checkpoint) is dropped; the restored weights go to every
    rollout worker as a new version.
  Each recovery prints one line, writes a "recovery" record to metrics.jsonl and counts in
  ark_opd_recoveries_total. Where recovery is impossible (no room within recovery_timeout_s,
  max_failures used up) the run stops with RecoveryFailed: one line naming the node, the role and
  how to --resume.
* Resume: each checkpoint stores the learner state plus the consumed positions (trained or dropped:
  a watermark below which all are consumed, and the consumed ones above it), so a rerun with
  --resume neither repeats nor skips an utterance. Checkpoints and every output go to the run
  folder, `output_dir`: local, s3:// or any pyarrow filesystem (ark_ray/data/run_storage.py); each
  learner rank uploads its own shards and the `latest` pointer is written last
  (ark_ray/train/checkpoints.py), so a run resumes on a brand-new cluster.
* `mode="sync"` runs the same components one stage at a time (the baseline for the speed-up).
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import ray

from ark_ray.config import OpdConfig, to_dict
from ark_ray.data.clip_stream import ClipStream, DataPositions, StreamOptions, first_rows
from ark_ray.data.manifest_dataset import open_manifest
from ark_ray.data.run_storage import RunStorage
from ark_ray.engines.base import mix_seeds
from ark_ray.faults import LearnerLost, RecoveryFailed, is_lost, lost_actor_id, short
from ark_ray.opd.loss import OpdLoss
from ark_ray.opd.recovery import HELD, LOST, RolePool, recovery_line
from ark_ray.opd.rollout import RolloutWorker
from ark_ray.opd.teacher import TeacherScorer
from ark_ray.runtime import engine_actor_options
from ark_ray.train.checkpoints import CheckpointError, Checkpoints
from ark_ray.train.learner import LearnerGroup


def _wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus J/WER over labelled rows (unlabelled rows skipped), scored like jobs/evaluate.py."""
    from ark_ray.eval import jwer
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    return float(jwer([r for r, _ in pairs], [h for _, h in pairs], normalizer="auto")) if pairs else float("nan")


@ray.remote(num_cpus=0)
def _all_done(*_) -> bool:
    """Resolves once every argument (the rollout engines' start-up) has."""
    return True


def rollout_seeds(seed: int, positions) -> list[int]:
    """Each clip's sampling seed: from the run's seed and the clip's data position, so a redone
    rollout samples the same tokens and two runs of one seed sample alike."""
    return [mix_seeds(seed, int(p)) for p in positions]


def resource_requests(cfg: OpdConfig) -> dict[str, list[dict]]:
    """What the job asks Ray for, per role: one resource dict per actor (rollout workers, teacher
    scorers; a CPU vLLM rollout engine also asks for `memory`, engine_actor_options) or placement
    bundle (learner ranks, packed in one group). cluster/*.yaml's node types are checked against it
    (tests/test_cluster_configs.py)."""
    def wants(eng) -> dict:
        return {k: v for k, v in {"CPU": eng.num_cpus, "GPU": eng.num_gpus, **eng.resources}.items() if v}

    return {"rollout worker": [wants(cfg.rollout_engine)] * cfg.num_rollout_workers,
            "teacher": [wants(cfg.teacher_engine)] * cfg.num_teacher_workers,
            "learner": [LearnerGroup.bundle(cfg.learner)] * cfg.learner.num_workers}


@dataclass
class Work:
    """One rollout batch on its way to the learner: its data positions, its clips (a ClipRefs of the
    input's decoded blocks; None once scored, so the blocks can go) and its sampling seeds."""
    positions: list
    clips: object
    seeds: list


class OpdController:
    def __init__(self, cfg: OpdConfig, storage: Optional[RunStorage] = None):
        """`storage`: the run folder (made from cfg.output_dir, cfg.s3 and cfg.local_dir if not given)."""
        t0 = time.perf_counter()
        self.cfg = cfg
        self.storage = storage or RunStorage(cfg.output_dir, cfg.s3, cfg.local_dir)
        self.out = self.storage.local_dir          # the driver's local run folder (= output_dir when local)
        self.ckpts = Checkpoints(self.storage, keep=cfg.keep_checkpoints)
        # the manifests are checked now (bad rows refused or skipped); their rows stay in the files
        cpus = cfg.input.num_cpus
        self.train_set = open_manifest(cfg.train_manifest, text_field=None, skip_bad_rows=cfg.skip_bad_rows,
                                       s3=cfg.s3, num_cpus=cpus)
        self.eval_set = (open_manifest(cfg.eval_manifest, skip_bad_rows=cfg.skip_bad_rows, s3=cfg.s3, num_cpus=cpus)
                         if cfg.eval_manifest else None)
        self.input_opts = StreamOptions(cfg.input, cfg.max_audio_s, cfg.s3)
        self.data = DataPositions(self.train_set.rows, cfg.seed)
        self.input: Optional[ClipStream] = None    # made when a loop starts (after a resume)
        self.startup: dict[str, float] = {}
        # Ray restarts a lost actor where there is room; its in-flight call is redone by this
        # controller (with the current weights first), not by Ray's task retries
        actor_opts = dict(max_restarts=cfg.max_actor_restarts, max_task_retries=0, scheduling_strategy="SPREAD")
        engine_cfg = asdict(cfg.rollout_engine)
        self.rollouts = [ray.remote(RolloutWorker).options(   # on CPU: memory= model + sized KV cache
            **engine_actor_options(cfg.student, cfg.rollout_engine), **actor_opts,
        ).remote(cfg.student, engine_cfg, asdict(cfg.sampling), cfg.topk)
            for _ in range(cfg.num_rollout_workers)]
        rollout_ready = [w.engine_info.remote() for w in self.rollouts]
        # staged start-up (a shared GPU): vLLM sizes its KV cache from the memory free while it
        # profiles, so nothing else may allocate meanwhile; the teachers load on the CPU and wait
        # for it before moving to the GPU, the learner group starts once it is done
        gate = [_all_done.remote(*rollout_ready)] if cfg.staged_startup else None
        te = cfg.teacher_engine
        self.teachers = [ray.remote(TeacherScorer).options(
            num_cpus=te.num_cpus, num_gpus=te.num_gpus, resources=dict(te.resources), **actor_opts,
        ).remote(cfg.teacher, cfg.student, cfg.topk, cfg.tau, device=te.device, dtype=te.dtype, gpu_gate=gate,
                 backend=cfg.teacher_backend, engine=te.backend, language=cfg.teacher_language,
                 logprobs_k=cfg.teacher_logprobs_k,
                 engine_opts=dict(max_model_len=te.max_model_len, gpu_memory_utilization=te.gpu_memory_utilization,
                                  max_num_batched_tokens=te.max_num_batched_tokens))
            for _ in range(cfg.num_teacher_workers)]
        teacher_ready = [t.ready.remote() for t in self.teachers]
        if cfg.staged_startup:
            ray.get(rollout_ready)
            self.startup["rollout_s"] = time.perf_counter() - t0
        # the learner group blocks until its ranks are up; the engines and teachers start meanwhile
        self.learner = LearnerGroup(cfg.student, cfg.learner, total_steps=cfg.steps, loss=OpdLoss(cfg.tau))
        self.startup["learner_s"] = time.perf_counter() - t0
        places = {}
        for role, refs in {"rollout_s": rollout_ready, "teacher_s": teacher_ready}.items():
            places[role] = ray.get(refs)
            self.startup.setdefault(role, time.perf_counter() - t0)
        self.rollout_pool = RolePool("rollout worker", self.rollouts, lambda a: a.engine_info.remote(),
                                     cfg.recovery_timeout_s, self._resume_hint, places["rollout_s"])
        self.teacher_pool = RolePool("teacher", self.teachers, lambda a: a.ready.remote(),
                                     cfg.recovery_timeout_s, self._resume_hint, places["teacher_s"])
        from ark_ray.model.processor import ArkAsrProcessor
        self.pad_id = ArkAsrProcessor.from_pretrained(cfg.student).token_ids.pad
        self.weights = self.learner.weight_sync(self.rollouts)
        self.weights.describe()         # each engine's sync path, while every actor is up
        self.version = 0
        self.step = 0
        self.dropped_stale = 0
        self.samples_trained = 0
        self.history: list[dict] = []
        self.recoveries: list[dict] = []  # one record per recovery (also in metrics.jsonl)
        self.learner_restarts = 0
        self.checkpoint_step: Optional[int] = None   # the step of this run's last checkpoint (saved or resumed)
        self._start_state = self._state()            # what a learner restart goes back to without one
        self._held: dict[int, tuple] = {}  # restarted rollout worker -> (version it must hold, its comeback)
        self.pending: list = []         # rollout/teacher calls run_async left in flight (see drain)
        self.last_sync: Optional[dict] = None
        self._synced = 0                # weight-sync records already written to metrics.jsonl
        self.metrics_f = self.storage.metrics_log("metrics.jsonl")   # uploaded every 30 s and at checkpoints
        # a plain status line for the user (resume, checkpoints); jobs/opd.py sets the console's
        self.say = lambda msg: print(msg, flush=True)
        # console hooks (ark_ray.opd.console): on_step(rec) after each learner step, on_eval(step,
        # who, wer) after each evaluation, on_recovery(line) after each recovery; unset, a plain
        # line is printed for each
        self.on_step = None
        self.on_eval = None
        self.on_recovery = None
        self.startup["total_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, who: str = "student") -> Optional[float]:
        """Held-out WER of the student (on a rollout worker holding the current weights) or of the
        teacher: the eval manifest's first eval_max_samples rows, decoded afresh by Ray Data (nothing
        of it kept between evaluations); an actor lost meanwhile is waited for and the evaluation redone."""
        if self.eval_set is None or self.cfg.eval_max_samples == 0:
            return None
        pool = self.rollout_pool if who == "student" else self.teacher_pool
        while True:
            i = self._answering(pool)
            calls = [pool.actors[i].transcribe_texts.remote(clips)
                     for clips in first_rows(self.eval_set, self.cfg.eval_max_samples, self.input_opts)]
            try:
                done = ray.get(calls)
            except Exception as e:
                if not is_lost(e):
                    raise
                self._blame(e, [(pool, i, pool.epoch[i])])   # the clips are decoded afresh on the retry
                continue
            texts, hyps = [], []
            for t, h in done:
                texts += t
                hyps += h
            return _wer(texts, hyps)

    def _answering(self, pool: RolePool) -> int:
        """An actor of `pool` that is up (free or busy: a call queues behind its current one),
        waiting for a lost one to come back when none is."""
        while True:
            self._collect_sync()
            self._come_back()
            up = pool.up()
            if up:
                return up[0]
            time.sleep(0.5)

    def _report_eval(self, who: str, wer: Optional[float]) -> Optional[float]:
        if self.on_eval:
            self.on_eval(self.step, who, wer)
        elif wer is not None:
            print(f"step {self.step}: {who} WER {wer:.4f}", flush=True)
        return wer

    # ------------------------------------------------------------------ weights
    def sync_weights(self) -> None:
        """Queue version+1 for every rollout worker (each applies it before its next rollout)."""
        self.version += 1
        self.weights.push(self.version)

    def _collect_sync(self, block: bool = False) -> None:
        """Collect finished syncs (a failed one raises here: the run stops with the worker's error);
        each goes to metrics.jsonl as a "sync" record and to Prometheus as stage "sync". A rollout
        worker the sync found lost is probed until it comes back; a lost learner rank raises
        LearnerLost."""
        self.weights.wait() if block else self.weights.poll()
        from ark_ray import metrics

        for rec in self.weights.history[self._synced:]:
            line = dict(kind="sync", step=self.step, time=time.time(), **rec)
            self.metrics_f.write(json.dumps(line) + "\n")
            metrics.record("ark_opd_stage_duration_seconds", rec["sync_s"], {"stage": "sync"})
            self.last_sync = rec
        self._synced = len(self.weights.history)
        self.metrics_f.flush()
        for i, err in list(self.weights.lost.items()):
            if self.rollout_pool.state[i] != LOST:
                self.rollout_pool.lost(i, err, self.rollout_pool.epoch[i])

    # ------------------------------------------------------------------ lost actors
    def _lost(self, error: BaseException, pool: RolePool, i: int, epoch: int, redone: int = 0) -> None:
        """A call on actor `i` of `pool` (sent in its incarnation `epoch`) failed for a loss: probe it
        until it answers again; a lost rollout worker is also left out of weight syncs."""
        if pool.lost(i, error, epoch, redone) and pool is self.rollout_pool:
            self.weights.mark_lost(i, error)

    def _blame(self, error: BaseException, stages: list[tuple]) -> None:
        """A batch's rollout or scoring failed for a loss (the caller redoes the batch): mark the actor
        the error names, one of `stages` ((pool, index, epoch) of the calls the batch went through).
        An object lost with a node names no actor: its batch is simply redone."""
        actor = lost_actor_id(error)
        for pool, i, epoch in stages:
            if actor is not None and pool.index_of(actor) == i:
                self._lost(error, pool, i, epoch, redone=1)
                return

    def _come_back(self) -> None:
        """Lost actors that answer again: a teacher serves at once; a rollout worker first takes the
        current weights (a new version, pushed to every worker), then serves. Each is one recovery."""
        for i, _, back in self.teacher_pool.poll():
            self.teacher_pool.release(i)
            self._report_recovery(back.record())
        rp = self.rollout_pool
        for i, _, back in rp.poll():
            try:
                self.weights.recovered(i)         # where it runs now decides its sync path
            except Exception as e:
                if not is_lost(e):
                    raise
                self._lost(e, rp, i, rp.epoch[i])
                continue
            self._held[i] = (self.version + 1, back)
            self.sync_weights()
        for i, (version, back) in list(self._held.items()):
            if rp.state[i] != HELD:               # lost again before its weights arrived
                del self._held[i]
            elif self.weights.versions.get(i, -1) >= version:
                del self._held[i]
                rp.release(i)
                self._report_recovery(dict(back.record(), weights_version=self.weights.versions[i]))

    def _report_recovery(self, rec: dict) -> None:
        """One recovery: a console line, a metrics.jsonl record, a Prometheus count."""
        from ark_ray import metrics

        rec = dict(kind="recovery", step=self.step, time=time.time(), **rec)
        self.recoveries.append(rec)
        self.metrics_f.write(json.dumps(rec) + "\n")
        self.metrics_f.flush()
        metrics.record("ark_opd_recoveries_total", 1, {"role": rec["role"].split()[0]})
        line = recovery_line(rec)
        if self.on_recovery:
            self.on_recovery(line)
        else:
            print(line, flush=True)

    def _resume_hint(self) -> str:
        if self.checkpoint_step is None:
            return (f"this run has no checkpoint yet (save_every={self.cfg.save_every}): rerun the job to start "
                    "over")
        return (f"rerun with --resume=true to go on from the checkpoint of step {self.checkpoint_step} in "
                f"{self.storage.uri_of('checkpoints')}")

    def _restart_learner(self, lost: LearnerLost) -> None:
        """A learner rank was lost: a new learner group (where there is room) loads this run's last
        checkpoint, the data positions rewind to it, the work in flight is dropped (its weights are
        newer than the checkpoint's), and the restored weights reach every rollout worker as a new
        version. At most max_failures times (a rank lost during the restart counts again)."""
        t0, steps_before = time.monotonic(), self.step
        limit = self.cfg.max_failures
        while True:
            node = lost.node[:12] if lost.node else "?"
            self.learner_restarts += 1
            if 0 <= limit < self.learner_restarts:
                raise RecoveryFailed(f"lost node {node} (learner rank {lost.index}) and learner restarts are used "
                                     f"up (max_failures={limit}); {self._resume_hint()}") from None
            self.learner.shutdown()
            try:
                self.learner = LearnerGroup(self.cfg.student, self.cfg.learner, total_steps=self.cfg.steps,
                                            loss=OpdLoss(self.cfg.tau), ready_timeout_s=self.cfg.recovery_timeout_s)
                st = self._load_checkpoint() if self.checkpoint_step is not None else None
                self._apply_state(st or self._start_state)
                self.weights = self.learner.weight_sync(self.rollouts)
                self._synced = 0
                self._census(t0)
                for i in range(len(self.rollouts)):
                    if self.rollout_pool.state[i] == LOST:
                        self.weights.mark_lost(i, RuntimeError("lost"))
                self.sync_weights()
                self._collect_sync(block=True)
            except ray.exceptions.GetTimeoutError:
                raise RecoveryFailed(f"lost node {node} (learner rank {lost.index}) and the cluster had no room for "
                                     f"the learner group within recovery_timeout_s={self.cfg.recovery_timeout_s:g} s; "
                                     f"{self._resume_hint()}") from None
            except LearnerLost as again:
                lost = again
                continue
            break
        self._report_recovery(dict(
            role="learner rank", index=lost.index, lost_node=lost.node, node=self.learner.nodes[0], restarted=True,
            error=short(lost.error), seconds=time.monotonic() - t0, from_step=self.step,
            steps_redone=steps_before - self.step, weights_version=self.version,
            failures=self.learner_restarts, max_failures=limit))

    def _census(self, t0: float) -> None:
        """After a learner restart (its node may have hosted other roles too, whose calls were
        dropped with the work in flight): ask every rollout worker and teacher where it runs. One
        that Ray restarted meanwhile is a recovery of its own; one still unreachable is lost."""
        for pool in (self.rollout_pool, self.teacher_pool):
            asked = [(i, pool.probe_call(pool.actors[i])) for i in pool.up()]
            for i, ref in asked:
                try:
                    place = ray.get(ref)
                except Exception as e:
                    if not is_lost(e):
                        raise
                    self._lost(e, pool, i, pool.epoch[i])
                    continue
                before = pool.places[i]
                if (place.get("pid"), place.get("node")) == (before.get("pid"), before.get("node")):
                    continue
                pool.places[i] = place
                self._report_recovery(dict(
                    role=pool.role, index=i, lost_node=before.get("node"), node=place.get("node"), restarted=True,
                    error="restarted by Ray while the learner group was down", batches_redone=0,
                    seconds=time.monotonic() - t0))

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {"step": self.step, "version": self.version, "data": self.data.state(),
                "dropped_stale": self.dropped_stale, "samples_trained": self.samples_trained}

    def _apply_state(self, st: dict) -> None:
        """The controller's side of a checkpoint (the version only ever grows: rollout workers hold
        newer ones, and a restored state reaches them as a new version)."""
        self.step = st["step"]
        self.version = max(self.version, st["version"])
        self.data.load(st["data"])
        self.dropped_stale, self.samples_trained = st["dropped_stale"], st["samples_trained"]
        self.history = [h for h in self.history if h["step"] <= self.step]

    def save(self) -> Optional[str]:
        """Checkpoint to <output_dir>/checkpoints/step_<N> (ark_ray/train/checkpoints.py): every
        learner rank uploads its own shards, then this driver writes opd_state.json, then the
        `latest` pointer. A crash anywhere before the pointer leaves the previous checkpoint the one
        --resume (and a learner restart) takes. The checkpoint's URI (None when step N is already
        the latest one)."""
        if self.ckpts.latest() == self.step:   # the final save right after a periodic one: same
            return None                        # weights and positions, only the version moved on
        t0 = time.perf_counter()
        rel = self.ckpts.begin(self.step)
        ranks = self.learner.save_checkpoint(self.storage, rel, {"opd_step": self.step})
        self.metrics_f.append(dict(kind="checkpoint", step=self.step, time=time.time(),
                                   uri=self.storage.uri_of(rel), seconds=round(time.perf_counter() - t0, 3),
                                   bytes=sum(r["bytes"] for r in ranks),
                                   ranks=[{k: r[k] for k in ("rank", "node", "bytes")} for r in ranks]))
        state = dict(self._state(), metrics_lines=self.metrics_f.lines)   # what a resume keeps of metrics.jsonl
        self.metrics_f.flush(upload=True)
        uri = self.ckpts.commit(self.step, {"opd_state.json": state})
        self.checkpoint_step = self.step
        return uri

    def _load_checkpoint(self) -> Optional[dict]:
        """Load the checkpoint `latest` names into the learner group (every rank on its own node);
        its controller state (None: there is none)."""
        step = self.ckpts.latest()
        if step is None:
            return None
        rel = self.ckpts.dir(step)
        st = self.ckpts.read_json(step, "opd_state.json")
        client = self.learner.load_checkpoint(self.storage, rel)
        if client.get("opd_step") != st["step"]:
            raise CheckpointError(f"{self.storage.uri_of(rel)}: the learner state is of step {client.get('opd_step')}, "
                                  f"opd_state.json of step {st['step']}")
        self.checkpoint_step = st["step"]
        return st

    def resume(self) -> bool:
        """Load the checkpoint `latest` names, on every learner rank's own node, and the positions,
        versions and counters with it; metrics.jsonl loses the records of the steps redone."""
        st = self._load_checkpoint()
        if st is None:
            self.say(f"resume: no checkpoint in {self.storage.uri_of('checkpoints')} yet; starting at step 0")
            return False
        self._apply_state(st)
        self.version = st["version"]
        if "metrics_lines" in st:
            self.metrics_f.truncate(st["metrics_lines"])
        self.weights.push(self.version)
        self._collect_sync(block=True)
        d = self.data.state()
        self.say(f"resumed from {self.storage.uri_of(self.ckpts.dir(self.checkpoint_step))}: step {self.step}, version {self.version}, "
                 f"epoch {d['epoch']}, position {self.data.low}")
        return True

    # ------------------------------------------------------------------ one learner step
    def _warn_stale(self, dropped: int, total: int) -> None:
        workers = ", ".join(f"worker {i}: v{v}" for i, v in sorted(self.weights.versions.items())) or "none synced yet"
        print(f"warning: step {self.step + 1} dropped {dropped}/{total} samples as stale (controller at "
              f"v{self.version}, max_staleness {self.cfg.max_staleness}; {workers})", flush=True)

    def _train_on(self, batch, queues: Optional[dict] = None) -> Optional[dict]:
        """One learner step on `batch`; `queues` = batches in each pipeline queue right now."""
        stale = (self.version - batch.policy_version) > self.cfg.max_staleness
        stale_positions = [int(p) for p in batch.position[stale]]
        if stale.any():
            self.dropped_stale += int(stale.sum())
            self.data.consume(batch.position[stale])
            if stale.sum() * 2 > len(batch):
                self._warn_stale(int(stale.sum()), len(batch))
            batch = batch.select(~stale)
        if len(batch) == 0:
            return None
        t0 = time.perf_counter()
        stats = self.learner.train_step(batch.to_learner_batch(self.pad_id))
        learner_s = time.perf_counter() - t0
        self.step += 1
        self.data.consume(batch.position)
        self.samples_trained += len(batch)
        rollout_wer = _wer(list(batch.reference_text), list(batch.pred_text)) if any(batch.reference_text) else None
        sync, self.last_sync = self.last_sync, None
        rec = dict(kind="step", step=self.step, version=self.version, time=time.time(), loss=stats["loss"], kl=stats["kl"],
                   samples=len(batch),
                   union_size=stats.get("union_size"), teacher_mass=stats.get("teacher_mass"),
                   student_mass=stats.get("student_mass"), lr=stats["lr"],
                   staleness=float(np.mean(self.version - batch.policy_version)),
                   rollout_s=batch.timings.get("rollout_s"), teacher_s=batch.timings.get("teacher_s"),
                   learner_s=learner_s, peak_mem_gb=stats.get("peak_mem_gb"),
                   sync_s=sync["sync_s"] if sync else None, sync_version=sync["version"] if sync else None,
                   epoch=self.data.low // self.data.n,
                   rollout_wer=rollout_wer, dropped_stale=self.dropped_stale,
                   unmapped_positions=batch.unmapped_positions,
                   positions=[int(p) for p in batch.position], stale_positions=stale_positions,
                   **{f"queue_{k}": v for k, v in (queues or {}).items()})
        self.history.append(rec)
        self.metrics_f.write(json.dumps(rec) + "\n")
        self.metrics_f.flush()
        _record_metrics(rec)
        if self.on_step:
            self.on_step(rec)
        else:
            print(f"step {self.step}/{self.cfg.steps} v{self.version} kl {rec['kl']:.4f} "
                  f"union {rec['union_size'] or 0:.1f} stale-dropped {self.dropped_stale}"
                  + (f" sync {sync['sync_s']:.2f}s" if sync else ""), flush=True)
        # with grad_accum_steps > 1 the weights change only at optimizer steps
        if stats.get("optimizer_step", True) and self.step % self.cfg.sync_every == 0:
            self.sync_weights()
        if self.cfg.save_every and self.step % self.cfg.save_every == 0:
            self.save()
        if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
            self._report_eval("student", self.evaluate("student"))
        return rec

    # ------------------------------------------------------------------ the loops
    def _start_input(self) -> ClipStream:
        """The training input from the unconsumed positions on (positions a previous loop left in
        flight, or a learner restart rewound, are pending again: they are taken again, in order)."""
        if self.input is not None:
            self.input.close()
        self.input = ClipStream(self.train_set, self.data, self.cfg.rollout_batch_size, self.input_opts)
        return self.input

    def _work(self, source: ClipStream) -> Work:
        positions, clips = source.next_batch()
        return Work(list(positions), clips, rollout_seeds(self.cfg.seed, positions))

    def _redo(self, work: Work) -> Work:
        """`work` again, its audio decoded anew (its blocks may have gone with a node)."""
        work.clips = self.input.reload(work.positions)
        return work

    def _rollout(self, w: int, work: Work):
        return self.rollouts[w].rollout.remote(work.clips, work.positions, work.seeds)

    def run_sync(self) -> None:
        """One stage at a time (the baseline)."""
        self._train_until_done(self._steps_sync)

    def run_async(self) -> None:
        """The pipelined loop."""
        self._train_until_done(self._steps_async)

    def _train_until_done(self, loop) -> None:
        """Run `loop` until `steps`; a lost learner rank restarts the group, and the loop goes on from
        its checkpoint."""
        while self.step < self.cfg.steps:
            try:
                loop()
            except LearnerLost as e:
                self._restart_learner(e)

    def _steps_sync(self) -> None:
        source = self._start_input()
        redo: Optional[Work] = None
        while self.step < self.cfg.steps:
            work, redo = redo or self._work(source), None
            rp, tp = self.rollout_pool, self.teacher_pool
            w, t = self._free(rp), self._free(tp)
            stages = [(rp, w, rp.epoch[w]), (tp, t, tp.epoch[t])]
            traj = self._rollout(w, work)
            try:
                scored = ray.get(self.teachers[t].score.remote(traj, work.clips))
            except Exception as e:
                if not is_lost(e):
                    raise
                self._blame(e, stages)
                redo = self._redo(work)
                continue
            finally:
                rp.give(w)
                tp.give(t)
            del traj, work              # the batch's audio goes once nothing refers to its blocks
            self._collect_sync()
            self._train_on(scored, queues=dict(rollout=0, teacher=0, learner=0))

    def _free(self, pool: RolePool) -> int:
        """A free actor of `pool` (sync mode), waiting for lost ones to come back if need be."""
        while True:
            i = pool.take()
            if i is not None:
                return i
            self._collect_sync()
            self._come_back()
            time.sleep(0.2)

    def _steps_async(self) -> None:
        source = self._start_input()
        redo: deque = deque()         # Work whose rollout or scoring was lost: rolled out again first
        rolling: dict = {}            # rollout ref -> (work, worker, its epoch)
        rolled: deque = deque()       # (work, trajectory ref, worker, its epoch) waiting for a teacher
        scoring: dict = {}            # score ref -> (work, teacher, its epoch, worker, its epoch)
        scored: deque = deque()       # scored TrajectoryBatch waiting for the learner
        rp, tp = self.rollout_pool, self.teacher_pool
        try:
            while self.step < self.cfg.steps:
                self._collect_sync()
                self._come_back()
                held = len(redo) + len(rolling) + len(rolled) + len(scoring) + len(scored)
                # keep every rollout worker busy while the queues have room (redone work first)
                while redo or held < self.cfg.max_inflight:
                    w = rp.take()
                    if w is None:
                        break
                    if redo:
                        work = redo.popleft()
                    else:
                        work, held = self._work(source), held + 1
                    rolling[self._rollout(w, work)] = (work, w, rp.epoch[w])
                while rolled:
                    t = tp.take()
                    if t is None:
                        break
                    work, traj, w, w_epoch = rolled.popleft()
                    scoring[self.teachers[t].score.remote(traj, work.clips)] = (work, t, tp.epoch[t], w, w_epoch)
                if scored:
                    self._train_on(scored.popleft(), queues=dict(rollout=len(rolling) + len(redo),
                                                                 teacher=len(rolled) + len(scoring),
                                                                 learner=len(scored)))
                    continue
                waiting = list(rolling) + list(scoring) + rp.probes() + tp.probes()
                if not waiting:
                    time.sleep(0.5)    # only actors coming back, or waiting for their weights
                    continue
                ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref in rolling:    # its errors surface in the scoring call it feeds
                        work, w, w_epoch = rolling.pop(ref)
                        rp.give(w)
                        rolled.append((work, ref, w, w_epoch))
                    elif ref in scoring:
                        work, t, t_epoch, w, w_epoch = scoring.pop(ref)
                        tp.give(t)
                        try:
                            scored.append(ray.get(ref))   # a failed rollout or scoring raises here
                            work.clips = None             # its blocks can go now
                        except Exception as e:
                            if not is_lost(e):
                                raise
                            self._blame(e, [(rp, w, w_epoch), (tp, t, t_epoch)])
                            redo.append(self._redo(work))
        finally:   # calls left in flight (done, or the learner was lost): their actors take new work
            self.pending = list(rolling) + list(scoring)
            for _, w, _ in rolling.values():
                rp.give(w)
            for _, t, _, _, _ in scoring.values():
                tp.give(t)

    def drain(self) -> None:
        """Wait for the rollout/teacher calls run_async left running (their results are not used:
        their positions stay unconsumed, so a later run takes them again), so that whatever runs
        next (a benchmark's sync phase) has the actors and GPUs to itself."""
        if self.pending:
            ray.wait(self.pending, num_returns=len(self.pending))
        self.pending = []

    def run(self) -> dict:
        t0 = time.time()
        if self.cfg.resume:
            self.resume()
        elif (old := self.ckpts.latest()) is not None:
            self.say(f"note: {self.storage.uri_of('checkpoints')} holds a checkpoint of step {old}; this run starts "
                     "at step 0 and replaces it (--resume=true continues it instead)")
        student_before = self._report_eval("student", self.evaluate("student")) if self.step == 0 else None
        teacher_wer = self._report_eval("teacher", self.evaluate("teacher"))
        t_train = time.time()
        start_samples = self.samples_trained
        while True:
            if self.cfg.mode == "sync":
                self.run_sync()
            else:
                self.run_async()
            try:   # the last sync, evaluation, checkpoint and export need the learner too
                train_s = time.time() - t_train
                self.sync_weights()
                self._collect_sync(block=True)
                student_after = self._report_eval("student", self.evaluate("student"))
                self.save()
                self.learner.export_hf(str(self.storage.local("final")))
                break
            except LearnerLost as e:
                self._restart_learner(e)
        final = self.storage.upload("final")
        hist = self.history
        syncs = [s["sync_s"] for s in self.weights.history]
        summary = {
            "mode": self.cfg.mode, "steps": self.step,
            "student_wer_before": student_before, "student_wer_after": student_after,
            "teacher_wer": teacher_wer,
            "kl_first": hist[0]["kl"] if hist else None, "kl_last": hist[-1]["kl"] if hist else None,
            "union_size": float(np.mean([h["union_size"] for h in hist if h["union_size"]])) if hist else None,
            "samples_per_s": (self.samples_trained - start_samples) / max(train_s, 1e-9),
            "dropped_stale": self.dropped_stale, "weight_sync": self.weights.describe(),
            "sync_s_median": float(np.median(syncs)) if syncs else None,
            "recoveries": len(self.recoveries), "learner_restarts": self.learner_restarts,
            "startup_s": self.startup.get("total_s"), "train_s": train_s, "wall_s": time.time() - t0,
            "final_model": final,
        }
        self.metrics_f.flush(upload=True)
        # written last: its presence says the run, the final export included, is complete
        self.storage.write_json("summary.json", {
            "summary": summary, "startup": self.startup, "data_positions": self.data.state(),
            "recoveries": self.recoveries, "config": to_dict(self.cfg, redact=True)}, indent=2, default=str)
        return summary

    def shutdown(self) -> None:
        self.metrics_f.close()   # uploads what a failed run logged, too
        self.learner.shutdown()
        for a in self.rollouts + self.teachers:
            ray.kill(a)
        if self.input is not None:
            self.input.close()


def _record_metrics(rec: dict) -> None:
    """Export the step's figures as Prometheus metrics."""
    from ark_ray import metrics

    metrics.record_opd_step(rec)
    queues = {k[len("queue_"):]: v for k, v in rec.items() if k.startswith("queue_")}
    if queues:
        metrics.record_opd_queues(**queues)
