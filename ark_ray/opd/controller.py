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
* Faults: rollout/teacher actors restart (max_restarts) and Ray retries their in-flight call on
  the new actor (max_task_retries), so the work is redone; a restarted rollout worker loads the
  WeightStore's copy first (published at each checkpoint).
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
import os
import time
from collections import deque
from dataclasses import asdict
from typing import Optional

import numpy as np
import ray

from ark_ray.config import OpdConfig, to_dict
from ark_ray.data.clip_stream import ClipStream, DataPositions, StreamOptions, first_rows
from ark_ray.data.manifest_dataset import open_manifest
from ark_ray.data.run_storage import RunStorage
from ark_ray.opd.loss import OpdLoss
from ark_ray.opd.rollout import RolloutWorker
from ark_ray.opd.teacher import TeacherScorer
from ark_ray.runtime import engine_actor_options
from ark_ray.train.checkpoints import CheckpointError, Checkpoints
from ark_ray.train.learner import LearnerGroup
from ark_ray.train.weight_sync import WeightStore


def _wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus J/WER over labelled rows (unlabelled rows skipped), scored like jobs/evaluate.py."""
    from ark_ray.eval import jwer
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    return float(jwer([r for r, _ in pairs], [h for _, h in pairs], normalizer="auto")) if pairs else float("nan")


@ray.remote(num_cpus=0)
def _all_done(*_) -> bool:
    """Resolves once every argument (the rollout engines' start-up) has."""
    return True


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
        self.store_name = f"ark-opd-weights-{os.getpid()}-{int(time.time())}"
        self.store = WeightStore.options(name=self.store_name).remote()
        self.startup: dict[str, float] = {}
        actor_opts = dict(max_restarts=cfg.max_actor_restarts, max_task_retries=cfg.max_actor_restarts)
        engine_cfg = asdict(cfg.rollout_engine)
        self.rollouts = [ray.remote(RolloutWorker).options(   # on CPU: memory= model + sized KV cache
            **engine_actor_options(cfg.student, cfg.rollout_engine), **actor_opts,
        ).remote(cfg.student, engine_cfg, asdict(cfg.sampling), cfg.topk, self.store_name)
            for _ in range(cfg.num_rollout_workers)]
        rollout_ready = [w.get_version.remote() for w in self.rollouts]
        # staged start-up (a shared GPU): vLLM sizes its KV cache from the memory free while it
        # profiles, so nothing else may allocate meanwhile; the teachers load on the CPU and wait
        # for it before moving to the GPU, the learner group starts once it is done
        gate = [_all_done.remote(*rollout_ready)] if cfg.staged_startup else None
        te = cfg.teacher_engine
        self.teachers = [ray.remote(TeacherScorer).options(
            num_cpus=te.num_cpus, num_gpus=te.num_gpus, **actor_opts,
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
        pending = {"rollout_s": rollout_ready, "teacher_s": teacher_ready}
        for role, refs in pending.items():
            if role not in self.startup:
                ray.get(refs)
                self.startup[role] = time.perf_counter() - t0
        from ark_ray.model.processor import ArkAsrProcessor
        self.pad_id = ArkAsrProcessor.from_pretrained(cfg.student).token_ids.pad
        self.weights = self.learner.weight_sync(self.rollouts, self.store)
        self.version = 0
        self.step = 0
        self.dropped_stale = 0
        self.samples_trained = 0
        self.history: list[dict] = []
        self.pending: list = []         # rollout/teacher calls run_async left in flight (see drain)
        self.last_sync: Optional[dict] = None
        self._synced = 0                # weight-sync records already written to metrics.jsonl
        self.metrics_f = self.storage.metrics_log("metrics.jsonl")   # uploaded every 30 s and at checkpoints
        # a plain status line for the user (resume, checkpoints); jobs/opd.py sets the console's
        self.say = lambda msg: print(msg, flush=True)
        # console hooks (ark_ray.opd.console): on_step(rec) after each learner step, on_eval(step,
        # who, wer) after each evaluation; unset, a plain line is printed for each
        self.on_step = None
        self.on_eval = None
        self.startup["total_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, who: str = "student") -> Optional[float]:
        """Held-out WER of the student (rollout worker 0) or the teacher: the eval manifest's first
        eval_max_samples rows, decoded afresh by Ray Data (nothing of it kept between evaluations)."""
        if self.eval_set is None or self.cfg.eval_max_samples == 0:
            return None
        actor = self.rollouts[0] if who == "student" else self.teachers[0]
        calls = [actor.transcribe_texts.remote(clips)
                 for clips in first_rows(self.eval_set, self.cfg.eval_max_samples, self.input_opts)]
        texts, hyps = [], []
        for t, h in ray.get(calls):
            texts += t
            hyps += h
        return _wer(texts, hyps)

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
        each goes to metrics.jsonl as a "sync" record and to Prometheus as stage "sync"."""
        self.weights.wait() if block else self.weights.poll()
        from ark_ray import metrics

        for rec in self.weights.history[self._synced:]:
            line = dict(kind="sync", step=self.step, time=time.time(), **rec)
            self.metrics_f.write(json.dumps(line) + "\n")
            metrics.record("ark_opd_stage_duration_seconds", rec["sync_s"], {"stage": "sync"})
            self.last_sync = rec
        self._synced = len(self.weights.history)
        self.metrics_f.flush()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Optional[str]:
        """Checkpoint to <output_dir>/checkpoints/step_<N> (ark_ray/train/checkpoints.py): every
        learner rank uploads its own shards, then this driver writes opd_state.json, then the
        `latest` pointer. A crash anywhere before the pointer leaves the previous checkpoint the one
        --resume takes. The checkpoint's URI (None when step N is already the latest one)."""
        if self.ckpts.latest() == self.step:   # the final save right after a periodic one: same
            self.weights.publish(self.version)  # weights and positions, only the version moved on
            return None
        t0 = time.perf_counter()
        rel = self.ckpts.begin(self.step)
        ranks = self.learner.save_checkpoint(self.storage, rel, {"opd_step": self.step})
        self.metrics_f.append(dict(kind="checkpoint", step=self.step, time=time.time(),
                                   uri=self.storage.uri_of(rel), seconds=round(time.perf_counter() - t0, 3),
                                   bytes=sum(r["bytes"] for r in ranks),
                                   ranks=[{k: r[k] for k in ("rank", "node", "bytes")} for r in ranks]))
        state = {"step": self.step, "version": self.version, "data": self.data.state(),
                 "dropped_stale": self.dropped_stale, "samples_trained": self.samples_trained,
                 "metrics_lines": self.metrics_f.lines}   # what a resume keeps of metrics.jsonl
        self.metrics_f.flush(upload=True)
        uri = self.ckpts.commit(self.step, {"opd_state.json": state})
        self.weights.publish(self.version)   # what a rollout worker Ray restarts loads first
        return uri

    def resume(self) -> bool:
        """Load the checkpoint `latest` names, on every learner rank's own node, and the positions,
        versions and counters with it; metrics.jsonl loses the records of the steps redone."""
        step = self.ckpts.latest()
        if step is None:
            self.say(f"resume: no checkpoint in {self.storage.uri_of('checkpoints')} yet; starting at step 0")
            return False
        rel = self.ckpts.dir(step)
        st = self.ckpts.read_json(step, "opd_state.json")
        client = self.learner.load_checkpoint(self.storage, rel)
        if client.get("opd_step") != st["step"]:
            raise CheckpointError(f"{self.storage.uri_of(rel)}: the learner state is of step {client.get('opd_step')}, "
                                  f"opd_state.json of step {st['step']}")
        self.step, self.version = st["step"], st["version"]
        self.data.load(st["data"])
        self.dropped_stale, self.samples_trained = st["dropped_stale"], st["samples_trained"]
        if "metrics_lines" in st:
            self.metrics_f.truncate(st["metrics_lines"])
        self.weights.push(self.version)
        self._collect_sync(block=True)
        d = self.data.state()
        self.say(f"resumed from {self.storage.uri_of(rel)}: step {self.step}, version {self.version}, "
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
        flight are pending again: they are taken again, in order)."""
        if self.input is not None:
            self.input.close()
        self.input = ClipStream(self.train_set, self.data, self.cfg.rollout_batch_size, self.input_opts)
        return self.input

    def run_sync(self) -> None:
        source = self._start_input()
        while self.step < self.cfg.steps:
            positions, clips = source.next_batch()
            traj = self.rollouts[0].rollout.remote(clips, positions)
            scored = ray.get(self.teachers[0].score.remote(traj, clips))
            del traj, clips             # the batch's audio goes once nothing refers to its blocks
            self._collect_sync()
            self._train_on(scored, queues=dict(rollout=0, teacher=0, learner=0))

    def run_async(self) -> None:
        source = self._start_input()
        inflight_roll: dict = {}      # ref -> (clips, worker index)
        inflight_teach: dict = {}
        scored_q: deque = deque()
        free_workers = deque(range(len(self.rollouts)))
        teacher_rr = 0
        while self.step < self.cfg.steps:
            self._collect_sync()
            # keep every rollout worker busy while the queues have room
            while free_workers and len(inflight_roll) + len(inflight_teach) + len(scored_q) < self.cfg.max_inflight:
                positions, clips = source.next_batch()
                w = free_workers.popleft()
                inflight_roll[self.rollouts[w].rollout.remote(clips, positions)] = (clips, w)
            if scored_q:
                self._train_on(scored_q.popleft(), queues=dict(rollout=len(inflight_roll),
                                                               teacher=len(inflight_teach), learner=len(scored_q)))
                continue
            ready, _ = ray.wait(list(inflight_roll) + list(inflight_teach), num_returns=1)
            ref = ready[0]
            if ref in inflight_roll:
                clips, w = inflight_roll.pop(ref)
                free_workers.append(w)
                t = self.teachers[teacher_rr % len(self.teachers)]
                teacher_rr += 1
                inflight_teach[t.score.remote(ref, clips)] = True
                del clips                 # the teacher call holds the batch's blocks now
            else:
                del inflight_teach[ref]
                scored_q.append(ray.get(ref))   # a failed rollout or scoring raises here
        self.pending = list(inflight_roll) + list(inflight_teach)

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
        if self.cfg.mode == "sync":
            self.run_sync()
        else:
            self.run_async()
        train_s = time.time() - t_train
        self.sync_weights()
        self._collect_sync(block=True)
        student_after = self._report_eval("student", self.evaluate("student"))
        self.save()
        self.learner.export_hf(str(self.storage.local("final")))
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
            "startup_s": self.startup.get("total_s"), "train_s": train_s, "wall_s": time.time() - t0,
            "final_model": final,
        }
        self.metrics_f.flush(upload=True)
        # written last: its presence says the run, the final export included, is complete
        self.storage.write_json("summary.json", {"summary": summary, "startup": self.startup,
                                                 "config": to_dict(self.cfg, redact=True)}, indent=2, default=str)
        return summary

    def shutdown(self) -> None:
        self.metrics_f.close()   # uploads what a failed run logged, too
        if self.input is not None:
            self.input.close()
        self.learner.shutdown()
        for a in self.rollouts + self.teachers + [self.store]:
            ray.kill(a)


def _record_metrics(rec: dict) -> None:
    """Export the step's figures as Prometheus metrics."""
    from ark_ray import metrics

    metrics.record_opd_step(rec)
    queues = {k[len("queue_"):]: v for k, v in rec.items() if k.startswith("queue_")}
    if queues:
        metrics.record_opd_queues(**queues)
