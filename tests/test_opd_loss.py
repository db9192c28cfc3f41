"""OPD loss against a brute-force float64 reference (explicit bucket distributions, python loops)."""
import math

import pytest
import torch

from ark_ray.opd.loss import gather_teacher_logprobs, opd_kl_loss, union_topk


def brute(student_logits, teacher_logits, union, mask, tau):
    """Per position: buckets = unique valid union ids + tail; KL(p_T || p_S) * tau^2."""
    total, n = 0.0, 0
    for i in range(student_logits.shape[0]):
        if not mask[i]:
            continue
        ids = []
        for u in union[i].tolist():
            if u >= 0 and u not in ids:
                ids.append(u)
        if len(ids) < 2:
            continue
        ps = torch.softmax(student_logits[i].double() / tau, -1)
        pt = torch.softmax(teacher_logits[i].double() / tau, -1)
        pt_b = [float(pt[u]) for u in ids] + [1.0 - sum(float(pt[u]) for u in ids)]
        ps_b = [float(ps[u]) for u in ids] + [1.0 - sum(float(ps[u]) for u in ids)]
        kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt_b, ps_b) if a > 0)
        total += kl * tau ** 2
        n += 1
    return total / max(n, 1)


def case(dtype, seed=0, n=12, v=50, k=4, tau=1.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=dtype) * 2
    t = torch.randn(n, v, generator=g, dtype=dtype) * 2
    s_top = s.topk(k, -1).indices
    t_top = (t / tau).topk(k, -1).indices
    union = union_topk(t_top, s_top)
    t_lp, t_tail = gather_teacher_logprobs(t / tau, union)
    return s, t, union, t_lp, t_tail


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_matches_bruteforce(dtype, tol, tau):
    s, t, union, t_lp, t_tail = case(dtype, tau=tau)
    mask = torch.ones(s.shape[0], dtype=torch.bool)
    mask[3] = False   # e.g. padding after EOS
    loss, stats = opd_kl_loss(s, union, t_lp.to(dtype), t_tail.to(dtype), mask, tau=tau)
    ref = brute(s.double(), t.double(), union, mask, tau)
    assert abs(float(loss) - ref) <= tol * max(1.0, abs(ref))
    assert 4 <= float(stats["union_size"]) <= 8 and float(stats["positions"]) == s.shape[0] - 1


def test_duplicates_and_short_positions():
    s, t, union, _, _ = case(torch.float64, seed=1, n=6)
    union = union.clone()
    union[0, 5] = union[0, 0]          # a duplicate id must not be counted twice
    union[1, 1:] = -1                  # one valid id: excluded
    union[2, :] = -1                   # no valid ids: excluded
    t_lp, t_tail = gather_teacher_logprobs(t, union)
    mask = torch.ones(6, dtype=torch.bool)
    loss, stats = opd_kl_loss(s, union, t_lp, t_tail, mask)
    assert abs(float(loss) - brute(s, t, union, mask, 1.0)) < 1e-10
    assert float(stats["positions"]) == 4


def test_whole_vocab_union_equals_full_kl():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    union = torch.arange(8).expand(5, 8)
    t_lp, t_tail = gather_teacher_logprobs(t, union)
    loss, _ = opd_kl_loss(s, union, t_lp, t_tail)
    full = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    assert abs(float(loss) - float(full)) < 1e-10


def test_zero_when_student_equals_teacher_and_batched_shapes():
    s, _, union, _, _ = case(torch.float64, seed=3)
    t_lp, t_tail = gather_teacher_logprobs(s, union)
    loss, _ = opd_kl_loss(s, union, t_lp, t_tail)
    assert abs(float(loss)) < 1e-12
    b = opd_kl_loss(s.view(3, 4, -1), union.view(3, 4, -1), t_lp.view(3, 4, -1), t_tail.view(3, 4))[0]
    assert abs(float(b)) < 1e-12


def test_gradcheck():
    s, t, union, t_lp, t_tail = case(torch.float64, seed=4, n=3, v=10, k=2)
    s = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: opd_kl_loss(x, union, t_lp, t_tail)[0], (s,))


def test_union_topk_dedupes_and_pads():
    t = torch.tensor([[3, 1, 2], [5, 6, 7]])
    s = torch.tensor([[1, 9, 3], [-1, 5, 8]])
    u = union_topk(t, s)
    assert u.tolist() == [[3, 1, 2, 9, -1, -1], [5, 6, 7, 8, -1, -1]]
