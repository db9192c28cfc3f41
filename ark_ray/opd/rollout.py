"""RolloutWorker actor: the student on an inference engine (vLLM by default) produces trajectories.

For each clip: the student's own transcript tokens (greedy by default; temperature from the
sampling config) and its top-k ids at every position (vLLM processed log-probs, so the allowed-
token mask is reflected). Every output is tagged with the weights version that produced it and
the data position it came from.

Weights arrive by whichever path `ark_ray.train.weight_sync` picked for this actor: CUDA IPC
buckets on a shared GPU (`load_weights("ipc", ...)`), bucket objects from the object store
(`load_weights("object_store", ...)`), or the learner's NCCL/gloo broadcast straight into the
engine processes (`receive_broadcast`). Each call returns the version the engine now holds; a
failure raises, and the driver's sync fails with this actor's error. A worker Ray restarted (after
a crash, or on another node after its node was lost) holds the initial weights and reports
version 0; the driver pushes the current weights to it before it gets any rollout.

Sampling follows the run's seed: each clip's sampling seed comes from the driver (derived from
the run's `seed` and the clip's data position), so a redone rollout with the same weights samples
the same tokens, and two runs of one seed sample alike.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import ray

from ark_ray.config import EngineConfig, SamplingConfig
from ark_ray.opd.trajectory import TrajectoryBatch


class RolloutWorker:
    def __init__(self, model_dir: str, engine_cfg: dict, sampling_cfg: dict, topk: int):
        from ark_ray.engines import make_engine

        self.engine = make_engine(model_dir, EngineConfig(**engine_cfg))
        self.sampling = SamplingConfig(**dict(sampling_cfg, logprobs_topk=topk))
        self.topk = topk
        self.version = 0
        self.group: Optional[str] = None  # the broadcast group this engine belongs to

    # ------------------------------------------------------------------ weights
    def engine_info(self) -> dict:
        """Where the engine runs, its weights' dtype and its processes (what picks the sync path)."""
        from ark_ray.train.weight_sync import placement

        info = placement()
        llm = getattr(self.engine, "llm", None)
        if llm is not None:
            info["dtype"] = self.engine.weights_dtype
            info["ranks"] = int(llm.llm_engine.vllm_config.parallel_config.world_size)
        else:
            info["dtype"] = str(next(self.engine.model.parameters()).dtype).removeprefix("torch.")
            info["ranks"] = 1
        return info

    def _done(self, version: int, how: str, t0: float) -> dict:
        self.version = version
        return {"version": version, "how": how, "seconds": time.perf_counter() - t0}

    def load_weights(self, mode: str, export: dict, version: int) -> dict:
        """Load `version` from the learner's export: "ipc" (CUDA IPC buckets on this GPU) or
        "object_store" (bucket objects, streamed one at a time)."""
        from ark_ray.engines.weight_buckets import ipc_items, object_items

        t0 = time.perf_counter()
        if self.version >= version:  # a call retried after it had already arrived
            return {"version": self.version, "how": "current", "seconds": 0.0}
        if mode == "ipc":
            if getattr(self.engine, "llm", None) is not None:
                self.engine.load_ipc(export["payload"])
            else:
                import torch
                self.engine.update_weights(ipc_items(export["payload"]))
                torch.cuda.synchronize()
        elif mode == "object_store":
            self.engine.update_weights(object_items(export["refs"]), bucket_bytes=int(export["bucket_bytes"]))
        else:
            raise ValueError(f"unknown weight sync mode {mode!r}")
        return self._done(version, mode, t0)

    def receive_broadcast(self, spec: dict, index: int, version: int, ranks: int = 1) -> dict:
        """Take `version` from the learner's broadcast (joining a new group when the learner forms one)."""
        from ark_ray.train.weight_broadcast import receive

        t0 = time.perf_counter()
        try:
            self.group = receive(self.engine, spec, index, version, self.group, ranks)
        except Exception:
            self.group = None   # the next attempt forms a new group with this actor
            raise
        return self._done(version, "broadcast", t0)

    def weight_digests(self, shapes: dict) -> dict:
        """sha1 of named parameters as the engine holds them, cut to the checkpoint `shapes`
        (bench/gpu_check.py compares them with the learner's)."""
        if getattr(self.engine, "llm", None) is not None:
            return self.engine.weight_digests(shapes)
        from ark_ray.engines.vllm_engine import tensor_digest
        params = dict(self.engine.model.named_parameters())
        return {n: tensor_digest(params[n]) for n in shapes}

    def get_version(self) -> int:
        return self.version

    # ------------------------------------------------------------------ rollouts
    def rollout(self, clips, positions: list[int], seeds: Optional[list[int]] = None) -> TrajectoryBatch:
        """Roll out the batch `clips` (a ClipRefs from the driver's ClipStream: this worker fetches
        the decoded audio itself) holding data `positions`, tagged with this worker's weights version;
        `seeds`: each clip's sampling seed (None: unseeded)."""
        from ark_ray.audio import SAMPLE_RATE
        from ark_ray.data.clip_stream import load_clips

        t0 = time.perf_counter()
        batch = load_clips(clips)
        if list(batch.positions) != [int(p) for p in positions]:
            raise RuntimeError(f"rollout: the clips hold positions {batch.positions}, not {list(positions)}")
        waves = batch.waves
        outs = self.engine.transcribe(waves, self.sampling, seeds=seeds)
        if len(outs) != len(waves):
            raise RuntimeError(f"{len(outs)} rollouts for {len(waves)} clips (sampling.n must be 1)")
        return TrajectoryBatch.from_rollouts(
            sample_ids=[batch.ids[t.clip_index] for t in outs],
            positions=[batch.positions[t.clip_index] for t in outs],
            audio_refs=[batch.ids[t.clip_index] for t in outs],
            prompt_ids=[t.prompt_ids for t in outs],
            responses=[t.token_ids for t in outs],
            student_topk=[t.topk_ids if t.topk_ids is not None else np.zeros((len(t.token_ids), self.topk))
                          for t in outs],
            policy_version=self.version,
            reference_texts=[batch.texts[t.clip_index] for t in outs],
            pred_texts=[t.text for t in outs], k=self.topk,
            timings={"rollout_s": time.perf_counter() - t0,
                     "audio_s": float(sum(len(w) for w in waves) / SAMPLE_RATE)},
        )

    def transcribe_texts(self, clips) -> tuple[list[str], list[str]]:
        """(reference texts, greedy transcripts with the current weights) of `clips` (evaluation)."""
        from ark_ray.data.clip_stream import load_clips

        batch = load_clips(clips)
        greedy = SamplingConfig(max_new_tokens=self.sampling.max_new_tokens)
        return batch.texts, [t.text for t in self.engine.transcribe(batch.waves, greedy)]
