"""The OPD controller: rollout -> teacher -> learner, asynchronously, through the object store.

    data order --> [RolloutWorker x R] --(TrajectoryBatch refs)--> [TeacherScorer x S] --> learner
                          ^                                                                   |
                          +---- weights (object store / broadcast), version v+1 every sync_every -+

* Bounded queues: at most `max_inflight` rollout batches and as many scored batches waiting;
  nothing is produced faster than the learner can take it.
* Versions: every trajectory carries the weights version that produced it; at the learner,
  trajectories older than `max_staleness` versions are dropped and counted.
* Faults: rollout/teacher actors restart (max_restarts) and Ray retries their in-flight call on
  the new actor (max_task_retries), so the work is redone; a restarted rollout worker pulls the
  newest weights from the WeightStore first.
* Resume: each checkpoint stores the learner state plus the data positions already consumed
  (trained or dropped), so a rerun with --resume neither repeats nor skips an utterance.
* `mode="sync"` runs the same components one stage at a time (the baseline for the speed-up).
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from collections import deque
from dataclasses import asdict
from typing import Optional

import numpy as np
import ray

from ark_ray.config import OpdConfig, to_dict
from ark_ray.data.manifest import read_manifest
from ark_ray.train.learner import LearnerGroup
from ark_ray.opd.rollout import RolloutWorker
from ark_ray.train.weight_sync import WeightStore
from ark_ray.opd.teacher import TeacherScorer


def _wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus J/WER over labelled rows (unlabelled rows skipped), scored like jobs/evaluate.py."""
    from ark_ray.eval import jwer
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    return float(jwer([r for r, _ in pairs], [h for _, h in pairs], normalizer="auto")) if pairs else float("nan")


@ray.remote(num_cpus=0.5)  # throttled: decoding is cheap, worker start-up is not
def _load_clip(path: str, begin, end, max_s: float):
    from ark_ray.audio import load_audio
    return load_audio(path, begin_time=begin, end_time=end, max_duration_s=max_s)


class AudioStore:
    """Each clip is decoded once into the object store; trajectories carry its id, never samples."""

    def __init__(self, rows: list[dict], max_s: float):
        self.rows = rows
        self.max_s = max_s
        self.refs: dict[str, ray.ObjectRef] = {}

    def ref(self, i: int) -> ray.ObjectRef:
        r = self.rows[i]
        key = r["id"]
        if key not in self.refs:
            self.refs[key] = _load_clip.remote(r["audio"], r.get("begin_time"), r.get("end_time"), self.max_s)
        return self.refs[key]


class OpdController:
    def __init__(self, cfg: OpdConfig):
        self.cfg = cfg
        self.out = pathlib.Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows = read_manifest(cfg.train_manifest, text_field=None)
        self.eval_rows = read_manifest(cfg.eval_manifest) if cfg.eval_manifest else []
        self.audio = AudioStore(self.rows, cfg.max_audio_s)
        self.eval_audio = AudioStore(self.eval_rows, cfg.max_audio_s)
        self.store_name = f"ark-opd-weights-{os.getpid()}-{int(time.time())}"
        self.store = WeightStore.options(name=self.store_name).remote()
        actor_opts = dict(max_restarts=cfg.max_actor_restarts, max_task_retries=cfg.max_actor_restarts)
        engine_cfg = asdict(cfg.rollout_engine)
        self.rollouts = [ray.remote(RolloutWorker).options(
            num_cpus=cfg.rollout_engine.num_cpus, num_gpus=cfg.rollout_engine.num_gpus, **actor_opts,
        ).remote(cfg.student, engine_cfg, asdict(cfg.sampling), cfg.topk, self.store_name)
            for _ in range(cfg.num_rollout_workers)]
        if cfg.staged_startup:  # vLLM must profile GPU memory before the teacher and learner allocate
            ray.get([w.get_version.remote() for w in self.rollouts])
        self.teachers = [ray.remote(TeacherScorer).options(
            num_cpus=cfg.teacher_num_cpus, num_gpus=cfg.teacher_num_gpus, **actor_opts,
        ).remote(cfg.teacher, cfg.student, cfg.topk, cfg.tau) for _ in range(cfg.num_teacher_workers)]
        total_steps = cfg.steps
        self.learner = LearnerGroup(cfg.student, cfg.learner, total_steps=total_steps)
        from ark_ray.model.processor import ArkAsrProcessor
        self.pad_id = ArkAsrProcessor.from_pretrained(cfg.student).token_ids.pad
        self.version = 0
        self.step = 0
        self.done: set[int] = set()     # data positions trained or dropped
        self.dropped_stale = 0
        self.samples_trained = 0
        self.history: list[dict] = []
        self.pending: list = []         # rollout/teacher calls run_async left in flight (see drain)
        self.metrics_f = open(self.out / "metrics.jsonl", "a")

    # ------------------------------------------------------------------ data
    def positions(self) -> list[int]:
        """Data positions (indices into the epoch-shuffled order) still to be used, in order."""
        need = self.cfg.steps * self.cfg.rollout_batch_size + self.cfg.rollout_batch_size * 4
        order_len = need + len(self.done)
        return [p for p in range(order_len) if p not in self.done]

    def row_of(self, pos: int) -> int:
        n = len(self.rows)
        epoch, k = divmod(pos, n)
        return int(np.random.default_rng(self.cfg.seed + epoch).permutation(n)[k])

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, who: str = "student") -> Optional[float]:
        if not self.eval_rows:
            return None
        n = min(len(self.eval_rows), self.cfg.eval_max_samples)
        refs = [self.eval_audio.ref(i) for i in range(n)]
        texts = [self.eval_rows[i]["text"] for i in range(n)]
        actor = self.rollouts[0] if who == "student" else self.teachers[0]
        hyps = ray.get(actor.transcribe_texts.remote(refs))
        return _wer(texts, hyps)

    # ------------------------------------------------------------------ weights
    def sync_weights(self) -> None:
        self.version += 1
        # queued, not awaited: each worker applies it before its next rollout (actor call order);
        # object store or broadcast as learner.weight_sync says, the WeightStore gets it either way
        self.learner.push_weights(self.rollouts, self.version, store=self.store, wait=False)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        state = {"step": self.step, "version": self.version, "done": sorted(self.done),
                 "dropped_stale": self.dropped_stale, "samples_trained": self.samples_trained}
        self.learner.save_checkpoint(str(self.out / "checkpoint"), {"opd": state})
        (self.out / "checkpoint" / "opd_state.json").write_text(json.dumps(state))

    def resume(self) -> bool:
        path = self.out / "checkpoint"
        if not (path / "opd_state.json").exists():
            return False
        client = self.learner.load_checkpoint(str(path))
        st = client["opd"]
        self.step, self.version = st["step"], st["version"]
        self.done = set(st["done"])
        self.dropped_stale, self.samples_trained = st["dropped_stale"], st["samples_trained"]
        self.learner.push_weights(self.rollouts, self.version, store=self.store)
        print(f"resumed at step {self.step} (version {self.version}, {len(self.done)} samples consumed)")
        return True

    # ------------------------------------------------------------------ one learner step
    def _train_on(self, batch, positions: list[int], queues: Optional[dict] = None) -> Optional[dict]:
        """One learner step on `batch`; `queues` = batches in each pipeline queue right now."""
        stale = (self.version - batch.policy_version) > self.cfg.max_staleness
        if stale.any():
            self.dropped_stale += int(stale.sum())
            for p, s in zip(positions, stale):
                if s:
                    self.done.add(p)
            batch = batch.select(~stale)
            positions = [p for p, s in zip(positions, stale) if not s]
        if len(batch) == 0:
            return None
        t0 = time.perf_counter()
        stats = self.learner.train_step(batch.to_learner_batch(self.pad_id), kind="opd", tau=self.cfg.tau)
        learner_s = time.perf_counter() - t0
        self.step += 1
        self.done.update(positions)
        self.samples_trained += len(batch)
        rollout_wer = _wer(list(batch.reference_text), list(batch.pred_text)) if any(batch.reference_text) else None
        rec = dict(step=self.step, version=self.version, time=time.time(), loss=stats["loss"], kl=stats["kl"],
                   samples=len(batch),
                   union_size=stats.get("union_size"), teacher_mass=stats.get("teacher_mass"),
                   student_mass=stats.get("student_mass"), lr=stats["lr"],
                   staleness=float(np.mean(self.version - batch.policy_version)),
                   rollout_s=batch.timings.get("rollout_s"), teacher_s=batch.timings.get("teacher_s"),
                   learner_s=learner_s, rollout_wer=rollout_wer, dropped_stale=self.dropped_stale,
                   **{f"queue_{k}": v for k, v in (queues or {}).items()})
        self.history.append(rec)
        self.metrics_f.write(json.dumps(rec) + "\n")
        self.metrics_f.flush()
        _record_metrics(rec)
        print(f"step {self.step}/{self.cfg.steps} v{self.version} kl {rec['kl']:.4f} "
              f"union {rec['union_size'] or 0:.1f} stale-dropped {self.dropped_stale}", flush=True)
        if self.step % self.cfg.sync_every == 0:
            self.sync_weights()
        if self.cfg.save_every and self.step % self.cfg.save_every == 0:
            self.save()
        if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
            wer = self.evaluate("student")
            print(f"step {self.step}: student WER {wer:.4f}")
        return rec

    # ------------------------------------------------------------------ the loops
    def _batches(self):
        pos = deque(self.positions())
        bs = self.cfg.rollout_batch_size
        while pos:
            chunk = [pos.popleft() for _ in range(min(bs, len(pos)))]
            rows = [self.row_of(p) for p in chunk]
            yield (chunk, [self.rows[r]["id"] for r in rows], [self.audio.ref(r) for r in rows],
                   [self.rows[r].get("text") or "" for r in rows])

    def run_sync(self) -> None:
        batches = self._batches()
        while self.step < self.cfg.steps:
            chunk, ids, refs, texts = next(batches)
            traj = self.rollouts[0].rollout.remote(ids, refs, texts)
            scored = ray.get(self.teachers[0].score.remote(traj, refs))
            self._train_on(scored, chunk, queues=dict(rollout=0, teacher=0, learner=0))

    def run_async(self) -> None:
        batches = self._batches()
        inflight_roll: dict = {}      # ref -> (chunk, refs, worker index)
        inflight_teach: dict = {}
        scored_q: deque = deque()
        free_workers = deque(range(len(self.rollouts)))
        teacher_rr = 0
        exhausted = False
        while self.step < self.cfg.steps:
            # keep every rollout worker busy while the queues have room
            while free_workers and not exhausted and \
                    len(inflight_roll) + len(inflight_teach) + len(scored_q) < self.cfg.max_inflight:
                try:
                    chunk, ids, refs, texts = next(batches)
                except StopIteration:
                    exhausted = True
                    break
                w = free_workers.popleft()
                inflight_roll[self.rollouts[w].rollout.remote(ids, refs, texts)] = (chunk, refs, w)
            if scored_q:
                batch, chunk = scored_q.popleft()
                self._train_on(batch, chunk, queues=dict(rollout=len(inflight_roll), teacher=len(inflight_teach),
                                                         learner=len(scored_q)))
                continue
            pending = list(inflight_roll) + list(inflight_teach)
            if not pending:
                break
            ready, _ = ray.wait(pending, num_returns=1)
            ref = ready[0]
            if ref in inflight_roll:
                chunk, refs, w = inflight_roll.pop(ref)
                free_workers.append(w)
                t = self.teachers[teacher_rr % len(self.teachers)]
                teacher_rr += 1
                inflight_teach[t.score.remote(ref, refs)] = chunk
            else:
                chunk = inflight_teach.pop(ref)
                scored_q.append((ray.get(ref), chunk))
        self.pending = list(inflight_roll) + list(inflight_teach)

    def drain(self) -> None:
        """Wait for the rollout/teacher calls run_async left running (their results are not used),
        so that whatever runs next (a benchmark's sync phase) has the actors and GPUs to itself."""
        if self.pending:
            ray.wait(self.pending, num_returns=len(self.pending))
        self.pending = []

    def run(self) -> dict:
        t0 = time.time()
        if self.cfg.resume:
            self.resume()
        student_before = self.evaluate("student") if self.step == 0 else None
        teacher_wer = self.evaluate("teacher")
        t_train = time.time()
        start_samples = self.samples_trained
        if self.cfg.mode == "sync":
            self.run_sync()
        else:
            self.run_async()
        train_s = time.time() - t_train
        self.sync_weights()
        student_after = self.evaluate("student")
        self.save()
        final = self.learner.export_hf(str(self.out / "final"))
        hist = self.history
        summary = {
            "mode": self.cfg.mode, "steps": self.step,
            "student_wer_before": student_before, "student_wer_after": student_after,
            "teacher_wer": teacher_wer,
            "kl_first": hist[0]["kl"] if hist else None, "kl_last": hist[-1]["kl"] if hist else None,
            "union_size": float(np.mean([h["union_size"] for h in hist if h["union_size"]])) if hist else None,
            "samples_per_s": (self.samples_trained - start_samples) / max(train_s, 1e-9),
            "dropped_stale": self.dropped_stale, "train_s": train_s, "wall_s": time.time() - t0,
            "final_model": final,
        }
        (self.out / "summary.json").write_text(json.dumps({"summary": summary, "config": to_dict(self.cfg)},
                                                          indent=2, default=str))
        return summary

    def shutdown(self) -> None:
        self.learner.shutdown()
        for a in self.rollouts + self.teachers + [self.store]:
            ray.kill(a)


def _record_metrics(rec: dict) -> None:
    """Export the step's figures as Prometheus metrics when ark_ray.metrics exists."""
    try:
        from ark_ray import metrics
    except ImportError:
        return
    if hasattr(metrics, "record_opd_step"):
        metrics.record_opd_step(rec)
    queues = {k[len("queue_"):]: v for k, v in rec.items() if k.startswith("queue_")}
    if queues and hasattr(metrics, "record_opd_queues"):
        metrics.record_opd_queues(**queues)
