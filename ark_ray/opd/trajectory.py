"""The batch of trajectories that travels rollout -> teacher -> learner through the object store.

Why a fixed numpy layout: the batch is put into Ray's object store once per stage, and numpy
arrays there are zero-copy for every reader; ragged per-sample lists would be pickled per
element. Audio never travels here, only `audio_ref` (the clip's manifest id: the waveforms stay in
the input's decoded Ray Data blocks, which rollout and teacher load through the batch's ClipRefs,
ark_ray/data/clip_stream.py).

Columns (one row per sample, T = longest response in the batch, k = top-k, U = 2k union slots):
  sample_id            [B]      str    stable id of the data item
  position             [B]      int64  data position (epoch * N + index into that epoch's order):
                                       what resume and staleness accounting use
  audio_ref            [B]      str    the clip's manifest id (its audio travels as the batch's ClipRefs)
  prompt_ids           [B]      object int32 arrays (prompts differ by audio length)
  response_ids         [B, T]   int32  student tokens, right-padded with -1 (EOS included)
  response_mask        [B, T]   bool   valid response positions
  student_topk_ids     [B, T, k] int32 student top-k ids from vLLM (processed log-probs), -1 pad
  teacher_ids          [B, T, U] int32 the union ids U_t (teacher top-k ∪ student top-k), -1 pad
  teacher_logprobs     [B, T, U] float32 teacher log-probs at teacher_ids (-inf at pads)
  teacher_tail_logprob [B, T]   float32 log of the teacher mass outside U_t
  teacher_mask         [B, T]   bool   response positions the teacher scored (None: all); a teacher
                                       with another vocabulary leaves unmapped tokens out (see
                                       ark_ray/opd/vocab_map.py): masked out of the loss, counted
  policy_version       [B]      int64  student weights version that produced the rollout
  reference_text       [B]      str    manifest transcript ("" when unlabelled)
  pred_text            [B]      str    the student's cleaned transcript (for rollout WER)
  timings              dict[str, float] per-batch stage times (rollout_s, teacher_s, ...)
About 25 KB per 100-token sample at k = 32 (union 64 ids x (4 + 4) bytes x 100 positions).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


@dataclass
class TrajectoryBatch:
    sample_id: np.ndarray
    position: np.ndarray
    audio_ref: np.ndarray
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    response_mask: np.ndarray
    student_topk_ids: np.ndarray
    policy_version: np.ndarray
    reference_text: np.ndarray
    pred_text: np.ndarray
    teacher_ids: Optional[np.ndarray] = None
    teacher_logprobs: Optional[np.ndarray] = None
    teacher_tail_logprob: Optional[np.ndarray] = None
    teacher_mask: Optional[np.ndarray] = None
    input_features: Optional[np.ndarray] = None   # [B, 128, T] log-mel, attached by the teacher
    feature_lengths: Optional[np.ndarray] = None  # [B]
    timings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_id)

    @property
    def scored(self) -> bool:
        return self.teacher_ids is not None

    @property
    def min_version(self) -> int:
        return int(self.policy_version.min()) if len(self) else 0

    @property
    def unmapped_positions(self) -> int:
        """Response positions the teacher could not score (0 when it scored them all)."""
        if self.teacher_mask is None:
            return 0
        return int((self.response_mask & ~self.teacher_mask).sum())

    def nbytes(self) -> int:
        total = 0
        for v in self.__dict__.values():
            if isinstance(v, np.ndarray):
                total += v.nbytes if v.dtype != object else sum(
                    getattr(x, "nbytes", len(str(x))) for x in v)
        return total

    @classmethod
    def from_rollouts(cls, *, sample_ids: Sequence[str], positions: Sequence[int], audio_refs: Sequence[str],
                      prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      student_topk: Sequence[np.ndarray], policy_version: int,
                      reference_texts: Sequence[str], pred_texts: Sequence[str], k: int,
                      timings: Optional[dict] = None) -> "TrajectoryBatch":
        """Pack per-sample rollout outputs (ragged) into the padded columns."""
        b = len(responses)
        t = max([len(r) for r in responses] + [1])
        resp = np.full((b, t), -1, dtype=np.int32)
        topk = np.full((b, t, k), -1, dtype=np.int32)
        for i, (r, tk) in enumerate(zip(responses, student_topk)):
            n = len(r)
            resp[i, :n] = r
            if n:
                tk = np.asarray(tk, dtype=np.int32).reshape(n, -1)[:, :k]
                topk[i, :n, : tk.shape[1]] = tk
        prompts = np.empty(b, dtype=object)
        for i, p in enumerate(prompt_ids):
            prompts[i] = np.asarray(p, dtype=np.int32)
        return cls(
            sample_id=np.asarray(sample_ids, dtype=object),
            position=np.asarray(positions, dtype=np.int64),
            audio_ref=np.asarray(audio_refs, dtype=object),
            prompt_ids=prompts,
            response_ids=resp,
            response_mask=resp >= 0,
            student_topk_ids=topk,
            policy_version=np.full(b, policy_version, dtype=np.int64),
            reference_text=np.asarray(reference_texts, dtype=object),
            pred_text=np.asarray(pred_texts, dtype=object),
            timings=dict(timings or {}),
        )

    def to_learner_batch(self, pad_id: int) -> dict[str, np.ndarray]:
        """prompt + response per row (right padded) with the teacher columns, for the learner."""
        if not self.scored or self.input_features is None:
            raise ValueError("the batch has not been scored by the teacher yet")
        b, t = self.response_ids.shape
        lens = [len(p) + int(m.sum()) for p, m in zip(self.prompt_ids, self.response_mask)]
        width = max(lens)
        ids = np.full((b, width), pad_id, np.int64)
        att = np.zeros((b, width), np.int64)
        for i, p in enumerate(self.prompt_ids):
            r = self.response_ids[i][self.response_mask[i]]
            ids[i, : len(p)] = p
            ids[i, len(p): len(p) + len(r)] = r
            att[i, : len(p) + len(r)] = 1
        return {
            "input_ids": ids, "attention_mask": att,
            "input_features": self.input_features, "feature_lengths": self.feature_lengths,
            "response_start": np.asarray([len(p) for p in self.prompt_ids], np.int64),
            "union_ids": self.teacher_ids.astype(np.int64), "teacher_logprobs": self.teacher_logprobs,
            "teacher_tail_logprob": self.teacher_tail_logprob,
            # the loss mask: positions the teacher did not score stay in the sequence, out of the loss
            "response_mask": self.response_mask if self.teacher_mask is None else self.response_mask & self.teacher_mask,
        }

    def select(self, keep: np.ndarray) -> "TrajectoryBatch":
        """Rows where `keep` is true (used to drop stale samples)."""
        out = {}
        for name, v in self.__dict__.items():
            out[name] = v[keep] if isinstance(v, np.ndarray) else v
        return TrajectoryBatch(**out)
