"""The OPD loss: forward KL(teacher || student) on the union of top-k ids plus one tail bucket.

At each response position t, U_t = teacher top-k ∪ student top-k (deduplicated). Both sides are
made proper distributions over |U_t| + 1 outcomes: the ids in U_t, and a tail bucket holding the
mass outside U_t (log(1 - sum_{u in U_t} p(u))). Then

    KL_t = sum_{o in U_t ∪ {tail}} p_T(o) (log p_T(o) - log p_S(o)),   loss = tau^2 * mean_t KL_t

over valid positions (mask true and at least 2 valid union ids). The student's log-probs come from
log_softmax(student_logits / tau) over the full vocabulary, so the gradient also pushes the tail.
The teacher's log-probs must be computed at the same tau (TeacherScorer divides by tau).

How this differs from the seed (open-audio-opd `compute_union_topk_logprob_opd_loss`):
* the seed mixes the teacher's raw top-k *logits* with teacher *log-probs* for student-only ids and
  renormalises the mixture with a softmax — two different scales in one distribution, so the
  target is wrong wherever the union holds student-only ids; we use log-probs everywhere;
* the seed drops the mass outside the union (renormalising on U_t only), so a student that puts
  mass on tokens neither model ranks highly is not penalised; the tail bucket keeps it honest;
* the seed re-scores the student on the teacher's re-tokenisation of its text, not its own ids;
  here the student is scored on exactly the ids it generated (the union is in its vocabulary);
* the seed trains bf16 weights with no fp32 master copy; our learner keeps fp32 master weights.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _f(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits are upcast; float64 stays float64 for tests)."""
    return x if x.dtype == torch.float64 else x.float()


def union_topk(teacher_topk_ids: torch.Tensor, student_topk_ids: torch.Tensor) -> torch.Tensor:
    """[N, k] ∪ [N, k] -> [N, 2k] ids: teacher ids first, then new student ids, -1 padded.

    Negative ids in the inputs are padding and ignored. Deterministic order.
    """
    cand = torch.cat([teacher_topk_ids, student_topk_ids], dim=-1).long()
    n, w = cand.shape
    # a candidate is a duplicate if the same id appears earlier in its row
    same = cand[:, :, None] == cand[:, None, :]
    earlier = torch.tril(torch.ones(w, w, dtype=torch.bool, device=cand.device), diagonal=-1)
    dup = (same & earlier[None]).any(-1) | (cand < 0)
    keep = ~dup
    # stable compaction: kept ids to the front, in their original order
    rank = torch.where(keep, torch.arange(w, device=cand.device)[None].expand(n, w), w + torch.arange(w, device=cand.device)[None].expand(n, w))
    order = rank.argsort(dim=-1)
    out = torch.gather(torch.where(keep, cand, torch.full_like(cand, -1)), 1, order)
    return out


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both ends (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _bucket_logprobs(logp_full: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p at `ids` (-inf at pads and duplicates), and the log tail mass outside the ids."""
    valid = ids >= 0
    # duplicates must not be counted twice: keep the first occurrence only
    w = ids.shape[-1]
    same = ids[..., :, None] == ids[..., None, :]
    earlier = torch.tril(torch.ones(w, w, dtype=torch.bool, device=ids.device), diagonal=-1)
    valid = valid & ~(same & earlier).any(-1)
    lp = torch.gather(logp_full, -1, ids.clamp(min=0)).masked_fill(~valid, NEG_INF)
    in_mass = torch.logsumexp(lp, dim=-1)
    tail = _log1mexp(in_mass.masked_fill(~valid.any(-1), NEG_INF))
    return lp, tail, valid


def gather_teacher_logprobs(teacher_logits: torch.Tensor, union_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits [N, V] (already / tau and masked) -> (log-probs at union [N, U], log tail [N])."""
    logp = torch.log_softmax(_f(teacher_logits), dim=-1)
    lp, tail, _ = _bucket_logprobs(logp, union_ids.long())
    return lp, tail


def opd_kl_loss(student_logits: torch.Tensor, union_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                teacher_tail_logprob: torch.Tensor, mask: torch.Tensor | None = None, tau: float = 1.0,
                reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """tau^2 * KL(p_T || p_S) over union buckets + tail. Shapes: [..., V], [..., U], [..., U], [...], [...].

    reduction: "mean" over valid positions, "sum", or "none" (per position, 0 where invalid).
    """
    lead = student_logits.shape[:-1]
    ids = union_ids.long()
    s_logp = torch.log_softmax(_f(student_logits) / tau, dim=-1)
    s_lp, s_tail, valid = _bucket_logprobs(s_logp, ids)
    t_lp = _f(teacher_logprobs).to(s_logp.dtype).masked_fill(~valid, NEG_INF)
    t_tail = _f(teacher_tail_logprob).to(s_logp.dtype)
    pos_ok = valid.sum(-1) >= 2
    if mask is not None:
        pos_ok = pos_ok & mask.bool()
    # per-bucket terms; 0 * (-inf - x) would be nan, so zero the invalid buckets explicitly
    t_p = t_lp.exp()
    term = torch.where(valid, t_p * (t_lp - s_lp.clamp(min=-1e30)), torch.zeros_like(t_p))
    tail_p = t_tail.exp()
    tail_term = torch.where(tail_p > 0, tail_p * (t_tail - s_tail.clamp(min=-1e30)), torch.zeros_like(tail_p))
    kl = (term.sum(-1) + tail_term) * (tau ** 2)
    kl = torch.where(pos_ok, kl, torch.zeros_like(kl))
    n_valid = pos_ok.sum()
    if reduction == "mean":
        loss = kl.sum() / n_valid.clamp(min=1)
    elif reduction == "sum":
        loss = kl.sum()
    elif reduction == "none":
        loss = kl
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    with torch.no_grad():
        denom = n_valid.clamp(min=1).float()
        stats = {
            "kl": (kl.sum() / denom).detach(),
            "union_size": (valid.sum(-1).float() * pos_ok).sum() / denom,
            "teacher_mass": (torch.where(valid, t_p, torch.zeros_like(t_p)).sum(-1) * pos_ok).sum() / denom,
            "student_mass": (torch.where(valid, s_lp.exp(), torch.zeros_like(t_p)).sum(-1) * pos_ok).sum() / denom,
            "positions": n_valid.float(),
        }
    del lead
    return loss, stats
