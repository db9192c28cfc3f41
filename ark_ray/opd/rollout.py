"""RolloutWorker actor: the student on an inference engine (vLLM by default) produces trajectories.

For each clip: the student's own transcript tokens (greedy by default; temperature/n from the
sampling config) and its top-k ids at every position (vLLM processed log-probs, so the allowed-
token mask is reflected). Every output is tagged with the weights version that produced it.
A restarted worker (Ray restarts it after a crash) first pulls the newest weights from the
`WeightStore`, so a redone rollout is never produced by stale initial weights.

Weights arrive either as an object-store ref (`update_weights`) or through the learner's
collective broadcast straight into the engine process (`receive_weights`, ark_ray.train.weight_sync),
whichever the learner's `weight_sync` picks.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import ray

from ark_ray.config import EngineConfig, SamplingConfig
from ark_ray.opd.trajectory import TrajectoryBatch


class RolloutWorker:
    def __init__(self, model_dir: str, engine_cfg: dict, sampling_cfg: dict, topk: int,
                 store_name: Optional[str] = None):
        from ark_ray.engines import make_engine

        self.engine = make_engine(model_dir, EngineConfig(**engine_cfg))
        self.sampling = SamplingConfig(**dict(sampling_cfg, logprobs_topk=topk))
        self.topk = topk
        self.version = 0
        self.store_name = store_name
        self.group: Optional[str] = None  # the weight-sync group this engine belongs to
        if store_name:
            store = ray.get_actor(store_name)
            refs, version = ray.get(store.latest.remote())
            if refs is not None:
                self.update_weights(refs, version)

    def update_weights(self, refs: list, version: int) -> int:
        """`refs` = [ObjectRef of a state dict] (wrapped in a list so Ray passes the ref)."""
        weights = ray.get(refs[0])
        self.engine.update_weights(weights)
        self.version = version
        return version

    def receive_weights(self, spec: dict, index: int, version: int, ranks: int = 1) -> str:
        """Take `version` from the learner's broadcast (joining a new group when the learner forms
        one); if that fails, load the same version from the WeightStore. Returns how it came."""
        from ark_ray.train.weight_sync import receive

        if self.version >= version:  # a call Ray retried after a restart: the store had it already
            return "current"
        try:
            self.group = receive(self.engine, spec, index, version, self.group, ranks)
            self.version = version
            return "broadcast"
        except Exception as e:
            print(f"weight sync: v{version} not received by broadcast ({e}); loading it from the WeightStore",
                  flush=True)
            self.group = None
        if not self.store_name:
            raise RuntimeError(f"weights v{version} were not broadcast and there is no WeightStore")
        store = ray.get_actor(self.store_name)
        deadline = time.monotonic() + float(spec["timeout_s"])
        while True:  # the learner publishes right after its broadcast
            refs, latest = ray.get(store.latest.remote())
            if latest >= version or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if refs is None or latest < version:
            raise RuntimeError(f"WeightStore holds v{latest}, v{version} was expected")
        self.update_weights(refs, latest)
        return "object_store"

    def rollout(self, sample_ids: list[str], audio_refs: list, reference_texts: list[str]) -> TrajectoryBatch:
        t0 = time.perf_counter()
        waves = ray.get(list(audio_refs))
        outs = self.engine.transcribe(waves, self.sampling)
        n = self.sampling.n
        ids = [sample_ids[t.clip_index] for t in outs]
        return TrajectoryBatch.from_rollouts(
            sample_ids=ids if n == 1 else [f"{s}#{t.sample_index}" for s, t in zip(ids, outs)],
            audio_refs=[sample_ids[t.clip_index] for t in outs],
            prompt_ids=[t.prompt_ids for t in outs],
            responses=[t.token_ids for t in outs],
            student_topk=[t.topk_ids if t.topk_ids is not None else np.zeros((len(t.token_ids), self.topk))
                          for t in outs],
            policy_version=self.version,
            reference_texts=[reference_texts[t.clip_index] for t in outs],
            pred_texts=[t.text for t in outs], k=self.topk,
            timings={"rollout_s": time.perf_counter() - t0,
                     "audio_s": float(sum(len(w) for w in waves) / 16000)},
        )

    def transcribe_texts(self, audio_refs: list) -> list[str]:
        """Greedy transcripts with the current weights (for evaluation)."""
        waves = ray.get(list(audio_refs))
        greedy = SamplingConfig(max_new_tokens=self.sampling.max_new_tokens)
        return [t.text for t in self.engine.transcribe(waves, greedy)]

    def get_version(self) -> int:
        return self.version
