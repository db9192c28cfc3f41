"""An explicit student <-> teacher token map, for a teacher whose vocabulary is not the student's.

Built from token *strings* (exact match of `get_vocab()` keys; both sides are Qwen byte-level BPEs,
so text tokens map nearly one to one), never from numeric ids. How each case is handled, and why:

* Forcing: the teacher reads the student's own tokens. A mapped student token becomes its one
  teacher token, so teacher position t predicts exactly student token t (one to one). A student
  token with no teacher string is spelled by the teacher's BPE over the same bytes (several teacher
  tokens): the teacher's context stays the exact text the student wrote, later positions still
  align, and only that position is left unscored (the teacher predicted its first piece, not the
  student's token). The student is always scored on its own rollout ids, never on a re-tokenisation
  (open-audio-opd's OPD training script re-scored it on the teacher's re-tokenised text and so
  trained on tokens it never wrote).
* Unscored positions are masked out of the loss through the response mask and counted
  (`unmapped_positions` in metrics.jsonl and Prometheus), so a vocabulary mismatch is visible.
* Teacher top-k ids with no student id (or mapping to a student id the student may not emit) are
  dropped from the union; their mass stays in the tail bucket, so the teacher side is still a
  proper distribution and nothing is renormalised.
* The union is U_t = mapped teacher top-k ∪ student top-k, restricted to ids whose teacher
  log-prob is known: a student top-k id outside what the teacher engine returned (vLLM returns
  the top `logprobs_k` and the forced token) goes to the tail bucket on *both* sides. That is
  still an exact bucketing of the full distributions (the loss is a lower bound of the full KL,
  as with any union), only coarser; the HF engine knows every id, so nothing falls out there.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import numpy as np


class VocabMap:
    """student id -> teacher id (`s2t`, -1: none) and teacher id -> student id (`t2s`, -1: none or
    blocked for the student). `student_allowed`: bool mask of ids the student may emit (teacher ids
    mapping elsewhere count as unmapped in the union)."""

    def __init__(self, student_tok, teacher_tok, student_allowed: Optional[np.ndarray] = None,
                 teacher_size: Optional[int] = None, student_size: Optional[int] = None):
        sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
        ns = max(student_size or 0, max(sv.values()) + 1)
        nt = max(teacher_size or 0, max(tv.values()) + 1)
        self.s2t = np.full(ns, -1, np.int64)
        self.t2s = np.full(nt, -1, np.int64)
        for s, sid in sv.items():
            tid = tv.get(s)
            if tid is not None:
                self.s2t[sid] = tid
                if student_allowed is None or (sid < len(student_allowed) and student_allowed[sid]):
                    self.t2s[tid] = sid
        self.student_tok, self.teacher_tok = student_tok, teacher_tok
        self._added = {t.content for t in student_tok.added_tokens_decoder.values()}

    @property
    def mapped(self) -> int:
        return int((self.s2t >= 0).sum())

    @lru_cache(maxsize=4096)
    def pieces(self, student_id: int) -> tuple[int, ...]:
        """Teacher ids spelling student token `student_id`: one id when mapped, else its bytes in
        the teacher's BPE (an added token's text through the teacher's tokenizer)."""
        if 0 <= student_id < len(self.s2t) and self.s2t[student_id] >= 0:
            return (int(self.s2t[student_id]),)
        s = self.student_tok.convert_ids_to_tokens(int(student_id))
        if s is None:
            return ()
        if s in self._added:
            return tuple(self.teacher_tok(s, add_special_tokens=False)["input_ids"])
        # a byte-level BPE string: the teacher's BPE model over the same byte symbols
        return tuple(t.id for t in self.teacher_tok.backend_tokenizer.model.tokenize(s))

    def force(self, student_ids: Sequence[int]) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(teacher ids to force, offset of each student token in them, scored mask).

        Student token t starts at teacher position `offset[t]`; it is scored (`mask[t]`) when it is
        a single mapped teacher token."""
        ids: list[int] = []
        off = np.zeros(len(student_ids), np.int64)
        ok = np.zeros(len(student_ids), bool)
        for t, sid in enumerate(student_ids):
            p = self.pieces(int(sid))
            off[t] = len(ids)
            ok[t] = len(p) == 1 and self.s2t[int(sid)] >= 0 if int(sid) < len(self.s2t) else False
            ids.extend(p)
        return ids, off, ok


def student_buckets(known_ids: np.ndarray, known_lp: np.ndarray, n_top: int, student_topk: np.ndarray,
                    vmap: VocabMap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher log-probs in teacher ids -> the union buckets in student ids, per position.

    known_ids / known_lp [n, W]: teacher ids (-1 pad) and their log-probs (at the loss temperature)
    at each scored position; the first `n_top` columns are the teacher's top-k in rank order, the
    rest any further ids whose log-prob is known (e.g. the student's top-k gathered, or vLLM's extra
    ranks and the forced token). student_topk [n, k]: student ids (-1 pad).
    Returns union [n, 2k] (student ids, -1 pad), log-probs [n, 2k] (-inf at pads), tail [n]
    (log of the teacher mass outside the union; -inf when none is left).
    """
    import torch

    from ark_ray.opd.loss import union_topk

    n, k = student_topk.shape
    ki = np.asarray(known_ids, np.int64)
    top_s = np.where(ki[:, :n_top] >= 0, vmap.t2s[np.clip(ki[:, :n_top], 0, None)], -1)
    uni = union_topk(torch.as_tensor(top_s), torch.as_tensor(np.asarray(student_topk, np.int64))).numpy()
    if uni.shape[1] < 2 * k:
        uni = np.pad(uni, ((0, 0), (0, 2 * k - uni.shape[1])), constant_values=-1)
    uni = uni[:, : 2 * k]
    # the teacher id of each union id, then its log-prob among the known ones
    tid = np.where(uni >= 0, vmap.s2t[np.clip(uni, 0, len(vmap.s2t) - 1)], -1)
    hit = (tid[:, :, None] == ki[:, None, :]) & (tid[:, :, None] >= 0)
    found = hit.any(-1)
    lp = np.where(found, np.take_along_axis(np.asarray(known_lp, np.float64), hit.argmax(-1), axis=1), -np.inf)
    uni = np.where(found, uni, -1)
    mass = np.exp(lp).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # log(1 - mass) in float64; rounding can push mass just past 1: then nothing is left
        tail = np.where(mass < 1.0, np.log1p(-np.minimum(mass, 1.0)), -np.inf)
    return uni.astype(np.int32), lp.astype(np.float32), tail.astype(np.float32)
