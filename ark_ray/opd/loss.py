"""The OPD loss: forward KL(teacher || student) on the union of top-k ids plus one tail bucket.

At each response position t, U_t = teacher top-k ∪ student top-k (deduplicated). Both sides are
made proper distributions over |U_t| + 1 outcomes: each id in U_t, and one tail bucket holding
all the mass outside U_t. Then

    KL_t = sum_{o in U_t ∪ {tail}} p_T(o) (log p_T(o) - log p_S(o)),   loss = tau^2 * mean_t KL_t

over the valid positions (mask true and at least 2 valid union ids). Bucketing is a coarsening of
the full-vocabulary distributions, so KL_t <= the full KL, with equality when U_t is the whole
vocabulary; nothing is renormalised, so the probabilities are the models' real ones.

Temperature: the student side is log_softmax(student_logits / tau); the teacher log-probs must have
been computed at the same tau (`gather_teacher_logprobs(..., tau=tau)`, or logits already divided
by tau, as the TeacherScorer does). Pass `teacher_tau=` to `opd_kl_loss` to have that checked.

Numerics: the tail is log-sum-exp over the complement of U_t minus log-sum-exp over the vocabulary,
not log(1 - sum p(U_t)). A confident ASR model puts 1 - 1e-8 of its mass on the union, and 1 - that
in float32 is rounding noise; summing the complement directly is exact to float precision, and it is
exactly -inf (zero mass) when U_t covers every id with nonzero probability, so the tail bucket drops
out of both sides instead of producing a huge spurious term.

How this differs from open-audio-opd's OPD training script (`compute_union_topk_logprob_opd_loss` in
scripts/train/train_ark_asr_opd_fsdp2_resume.py; docs/architecture.md, "The reference"), and why:
* that script mixes the teacher's raw top-k *logits* with teacher *log-probs* at student-only ids and
  softmaxes the mixture: two scales in one distribution, so student-only ids get almost no teacher
  mass and the target is wrong wherever the union has them. We use log-probs everywhere, and
  `opd_kl_loss` rejects teacher inputs whose buckets do not sum to 1 (which raw logits never do);
* it renormalises both sides on U_t alone, so mass a student puts on ids neither model ranks
  highly is invisible to the loss; the tail bucket keeps it in, as TRL's `loss_add_tail` does;
* it re-scores the student on the teacher's re-tokenisation of its decoded text, so it can
  train on tokens it never generated; here the student is scored on exactly its rollout ids;
* it trains bf16 parameters with no fp32 master copy, so small AdamW updates round away; we
  compute this loss in float32 (bf16 logits are upcast) and the learner keeps fp32 master weights.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ark_ray.train.losses import forward_logits

NEG_INF = float("-inf")
_MASS_TOL = 1e-3   # teacher buckets must sum to 1 within this (raw logits are off by far more)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (tests); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_ids(ids: torch.Tensor, name: str) -> torch.Tensor:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() < 1:
        raise ValueError(f"{name} must be an integer tensor [..., k], got {ids.dtype} {tuple(ids.shape)}")
    return ids.long()


def _check_range(ids: torch.Tensor, vocab: int) -> None:
    """Out-of-range ids would be a device-side assert on GPU: fail early and clearly instead."""
    if ids.numel() and int(ids.max()) >= vocab:
        raise ValueError(f"union id {int(ids.max())} is outside the vocabulary of size {vocab}")


def first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Bool [..., W]: id >= 0 and no equal id earlier in its row (pads are negative ids).

    Sort-based (O(W log W) per row), so it scales to wide unions without a W x W table.
    """
    srt, order = ids.sort(dim=-1, stable=True)   # stable: the earliest of equal ids comes first
    first_sorted = torch.ones_like(srt, dtype=torch.bool)
    first_sorted[..., 1:] = srt[..., 1:] != srt[..., :-1]
    first = torch.empty_like(first_sorted).scatter_(-1, order, first_sorted)
    return first & (ids >= 0)


def union_topk(teacher_topk_ids: torch.Tensor, student_topk_ids: torch.Tensor) -> torch.Tensor:
    """Teacher top-k [..., k] ∪ student top-k [..., k] -> union ids [..., 2k] (int64).

    Order is deterministic: the teacher's ids in their given order, then the student's ids not
    already present, then -1 padding. Negative input ids are padding and are dropped, duplicates
    (within or across the two sides) are kept once.
    """
    t = _check_ids(teacher_topk_ids, "teacher_topk_ids")
    s = _check_ids(student_topk_ids, "student_topk_ids")
    if t.shape[:-1] != s.shape[:-1]:
        raise ValueError(f"top-k ids disagree on leading dims: {tuple(t.shape)} vs {tuple(s.shape)}")
    cand = torch.cat([t, s.to(t.device)], dim=-1)
    keep = first_occurrence(cand)
    # stable compaction: kept ids move to the front in their original order
    order = (~keep).to(torch.int8).argsort(dim=-1, stable=True)
    return torch.where(keep, cand, torch.full_like(cand, -1)).gather(-1, order)


def _bucket_logprobs(z: torch.Tensor, ids: torch.Tensor,
                     valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled logits z [..., V] -> (log p at ids [..., U], log p outside the valid ids [...]).

    log p(u) = z_u - lse(z);  log p(tail) = lse(z over the complement) - lse(z). Where the complement
    has no finite logit, the tail is exactly -inf and its gradient is 0 (no inf - inf = nan).
    """
    v = z.shape[-1]
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, ids.clamp(min=0)) - lse[..., None]
    # complement: copy z with one spare column that receives the pads' writes, then -inf the union
    zc = F.pad(z, (0, 1), value=NEG_INF)
    zc.scatter_(-1, torch.where(valid, ids, v), NEG_INF)
    with torch.no_grad():
        empty = zc[..., :v].amax(dim=-1) == NEG_INF
    # an empty complement would give lse = -inf and a nan gradient: lse over a dummy 0 instead
    zc[..., v] = torch.where(empty, 0.0, NEG_INF).to(zc.dtype)
    tail = torch.where(empty, NEG_INF, torch.logsumexp(zc, dim=-1) - lse)
    return lp, tail


def gather_teacher_logprobs(teacher_logits: torch.Tensor, union_ids: torch.Tensor, *,
                            tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits [..., V] at union ids [..., U] -> (log-probs [..., U], log tail mass [...]).

    The log-probs are log_softmax(teacher_logits / tau) at the ids (-inf at pads and at repeated
    ids), the tail is the log of the mass outside the union (-inf when the union covers every id
    with nonzero probability). Mask blocked ids with -inf in the logits first; pass logits already
    divided by the OPD temperature with tau=1, or raw logits with tau=the OPD temperature.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    ids = _check_ids(union_ids, "union_ids")
    if teacher_logits.shape[:-1] != ids.shape[:-1]:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and union_ids {tuple(ids.shape)} "
                         "disagree on leading dims")
    _check_range(ids, teacher_logits.shape[-1])
    with torch.no_grad():
        z = teacher_logits.detach().to(_compute_dtype(teacher_logits)) / tau
        valid = first_occurrence(ids)
        lp, tail = _bucket_logprobs(z, ids, valid)
        return lp.masked_fill(~valid, NEG_INF), tail


def opd_kl_loss(student_logits: torch.Tensor, union_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                teacher_tail_logprob: torch.Tensor, mask: torch.Tensor | None = None, tau: float = 1.0,
                reduction: str = "mean", *, teacher_tau: float | None = None) -> tuple[torch.Tensor, dict]:
    """tau^2 * KL(p_T || p_S) over the union buckets + one tail bucket, per position.

    Shapes: student_logits [..., V] (e.g. [N, V] or [B, T, V]), union_ids [..., U] (-1 padded;
    repeated ids are counted once), teacher_logprobs [..., U], teacher_tail_logprob [...],
    mask [...] (true = a response position to train, EOS included; None = all).
    The teacher inputs must be log-probs at temperature `tau` (see `gather_teacher_logprobs`);
    `teacher_tau`, when given, is checked against `tau`. Gradient flows to student_logits only.

    reduction: "mean" over valid positions (0, still attached to the graph, when there are none),
    "sum" over them, or "none" (per position, 0 where not valid). A position is valid when its mask
    is true and it has at least 2 distinct union ids.
    Returns (loss, stats): detached scalar tensors "kl" (mean KL_t, without the tau^2 factor),
    "union_size", "teacher_mass" and "student_mass" (mass each puts on the union), all means over
    valid positions, and "positions" (their count).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if teacher_tau is not None and abs(teacher_tau - tau) > 1e-12 * max(1.0, tau):
        raise ValueError(f"teacher log-probs were computed at tau={teacher_tau} but the loss uses tau={tau}; "
                         "both sides must use the same temperature")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not student_logits.dtype.is_floating_point:
        raise ValueError(f"student_logits must be floating point, got {student_logits.dtype}")
    lead = student_logits.shape[:-1]
    ids = _check_ids(union_ids, "union_ids")
    expect = {"union_ids": (ids.shape[:-1], lead), "teacher_logprobs": (teacher_logprobs.shape, ids.shape),
              "teacher_tail_logprob": (teacher_tail_logprob.shape, lead)}
    if mask is not None:
        expect["mask"] = (mask.shape, lead)
    for name, (got, want) in expect.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"{name} has shape {tuple(got)}, expected {tuple(want)} "
                             f"(student_logits {tuple(student_logits.shape)}, union_ids {tuple(ids.shape)})")
    _check_range(ids, student_logits.shape[-1])

    dt = _compute_dtype(student_logits)
    valid = first_occurrence(ids)
    pos_ok = valid.sum(-1) >= 2
    if mask is not None:
        pos_ok = pos_ok & mask.to(torch.bool)

    s_lp, s_tail = _bucket_logprobs(student_logits.to(dt) / tau, ids, valid)
    # positions not trained may hold anything (padding): make them zero-mass so no nan leaks in
    t_lp = teacher_logprobs.detach().to(dt).masked_fill(~(valid & pos_ok[..., None]), NEG_INF)
    t_tail = teacher_tail_logprob.detach().to(dt).masked_fill(~pos_ok, NEG_INF)
    _check_teacher_mass(t_lp, t_tail, pos_ok)

    # p_T log(p_T / p_S) per bucket; buckets the teacher gives zero mass add exactly 0 (no 0 * inf)
    t_has = t_lp > NEG_INF
    t_p = t_lp.exp()
    terms = t_p * torch.where(t_has, t_lp - s_lp, torch.zeros_like(s_lp))
    tail_has = t_tail > NEG_INF
    tail_term = t_tail.exp() * torch.where(tail_has, t_tail - s_tail, torch.zeros_like(s_tail))
    kl = torch.where(pos_ok, terms.sum(-1) + tail_term, torch.zeros_like(tail_term))

    n_valid = pos_ok.sum()
    scaled = kl * tau ** 2
    if reduction == "mean":
        loss = scaled.sum() / n_valid.clamp(min=1)
    elif reduction == "sum":
        loss = scaled.sum()
    else:
        loss = scaled
    with torch.no_grad():
        denom = n_valid.clamp(min=1).to(dt)

        def mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(pos_ok, x.to(dt), torch.zeros((), dtype=dt, device=x.device)).sum() / denom

        stats = {
            "kl": mean(kl.detach()),
            "union_size": mean(valid.sum(-1)),
            "teacher_mass": mean(torch.where(valid, t_p, 0.0).sum(-1)),
            "student_mass": mean(torch.where(valid, s_lp.detach().exp(), 0.0).sum(-1)),
            "positions": n_valid.to(dt),
        }
    return loss, stats


def _check_teacher_mass(t_lp: torch.Tensor, t_tail: torch.Tensor, pos_ok: torch.Tensor) -> None:
    """Union buckets + tail must be a distribution: catches raw logits passed as log-probs."""
    with torch.no_grad():
        bad_value = t_lp.isnan().any() | t_tail.isnan().any()
        bad_value |= (t_lp > _MASS_TOL).any() | (t_tail > _MASS_TOL).any()
        if bad_value:
            raise ValueError("teacher_logprobs / teacher_tail_logprob contain nan or values > 0 "
                             "(log-probs are <= 0): pass log-probs, not raw logits")
        total = torch.logsumexp(torch.cat([t_lp, t_tail[..., None]], dim=-1), dim=-1).exp()
        bad = pos_ok & ((total - 1).abs() > _MASS_TOL)
        if bad.any():
            example = float(total[bad][0])
            raise ValueError(f"teacher buckets sum to {example:.6g} (not 1) at {int(bad.sum())} position(s): "
                             "pass log-probs (log_softmax at the loss temperature) and the matching tail "
                             "from gather_teacher_logprobs, not raw logits")


class OpdLoss:
    """The OPD loss as a learner loss object (`ark_ray.train.losses.Loss`): tau^2 * forward KL over
    the union buckets + tail at each response token, summed; the learner divides by the step's
    response tokens (every response position, EOS included, as `response_mask` marks them).

    Batch columns (`TrajectoryBatch.to_learner_batch`): input_ids/attention_mask (prompt + response,
    right padded), input_features/feature_lengths, response_start, union_ids, teacher_logprobs,
    teacher_tail_logprob, response_mask. Logits are computed only on the response span.
    """

    def __init__(self, tau: float = 1.0):
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = float(tau)

    def tokens(self, batch) -> int:
        return int(np.asarray(batch["response_mask"]).sum())

    def __call__(self, model, b: dict) -> tuple[torch.Tensor, dict]:
        # logits at position p predict token p + 1: response token j (at start + j) comes from
        # position start + j - 1; only that span is computed
        t = b["union_ids"].shape[1]
        width = b["input_ids"].shape[1]
        start = b["response_start"]
        lo = max(0, int(start.min()) - 1)
        hi = min(width - 1, int(start.max()) - 2 + t)
        logits = forward_logits(model, b, lo, hi)
        pos = start[:, None] - 1 + torch.arange(t, device=start.device)[None, :]
        pos = pos.clamp(min=lo, max=hi) - lo
        logits = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).float()
        loss_sum, st = opd_kl_loss(logits, b["union_ids"], b["teacher_logprobs"].float(),
                                   b["teacher_tail_logprob"].float(), b["response_mask"], tau=self.tau,
                                   reduction="sum")
        n = float(st["positions"])
        return loss_sum, {"kl_sum": float(loss_sum.detach()), "positions": n,
                          **{f"{k}_sum": float(st[k]) * n for k in ("union_size", "teacher_mass", "student_mass")}}

    def summarize(self, stats: dict, tokens: int) -> dict:
        loss = stats["kl_sum"] / max(1, tokens)
        n = max(1.0, stats["positions"])
        return {"loss": loss, "kl": loss / self.tau ** 2,   # the same per-token KL without the tau^2 factor
                "tokens": tokens,
                **{k: stats[f"{k}_sum"] / n for k in ("union_size", "teacher_mass", "student_mass")}}
