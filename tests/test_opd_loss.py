"""OPD loss against a brute-force float64 reference (explicit bucket distributions, python loops)."""
import math

import pytest
import torch

from ark_ray.opd.loss import first_occurrence, gather_teacher_logprobs, opd_kl_loss, union_topk


def buckets(logits_row, ids_row, tau):
    """Explicit distribution over [unique valid ids..., tail] from a full float64 softmax."""
    p = torch.softmax(logits_row.double() / tau, -1).tolist()
    ids = []
    for u in ids_row.tolist():
        if u >= 0 and u not in ids:
            ids.append(u)
    tail = sum(p[j] for j in range(len(p)) if j not in ids)
    return ids, [p[u] for u in ids] + [tail]


def brute_positions(student, teacher, union, mask, tau):
    """Per-position tau^2 * KL(p_T || p_S) (None where the position is not trained)."""
    out = []
    for i in range(student.shape[0]):
        ids, pt = buckets(teacher[i], union[i], tau)
        _, ps = buckets(student[i], union[i], tau)
        if not mask[i] or len(ids) < 2:
            out.append(None)
            continue
        out.append(tau ** 2 * sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps) if a > 0))
    return out


def brute_mean(*args):
    vals = [v for v in brute_positions(*args) if v is not None]
    return sum(vals) / max(len(vals), 1)


def random_case(dtype, seed=0, n=16, v=64, k=5, tau=1.0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    union = union_topk(t.topk(k, -1).indices, s.topk(k, -1).indices)
    t_lp, t_tail = gather_teacher_logprobs(t, union, tau=tau)
    return s, t, union, t_lp, t_tail


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("tau", [1.0, 0.7, 2.5])
def test_matches_bruteforce(dtype, tol, tau):
    s, t, union, t_lp, t_tail = random_case(dtype, tau=tau)
    mask = torch.ones(s.shape[0], dtype=torch.bool)
    mask[[3, 9]] = False
    ref = brute_positions(s, t, union, mask, tau)
    loss, stats = opd_kl_loss(s, union, t_lp, t_tail, mask, tau=tau)
    want = [r for r in ref if r is not None]
    assert abs(float(loss) - sum(want) / len(want)) <= tol
    per = opd_kl_loss(s, union, t_lp, t_tail, mask, tau=tau, reduction="none")[0]
    for got, r in zip(per.tolist(), ref):
        assert abs(got - (0.0 if r is None else r)) <= tol
    total = opd_kl_loss(s, union, t_lp, t_tail, mask, tau=tau, reduction="sum")[0]
    assert abs(float(total) - sum(want)) <= tol * len(want)
    assert float(stats["positions"]) == len(want) == s.shape[0] - 2
    assert abs(float(stats["kl"]) * tau ** 2 - float(loss)) <= tol
    # masses and union size, from the explicit buckets
    kept = [i for i in range(s.shape[0]) if mask[i]]
    t_mass = sum(1 - buckets(t[i], union[i], tau)[1][-1] for i in kept) / len(kept)
    s_mass = sum(1 - buckets(s[i], union[i], tau)[1][-1] for i in kept) / len(kept)
    size = sum(len(buckets(t[i], union[i], tau)[0]) for i in kept) / len(kept)
    assert abs(float(stats["teacher_mass"]) - t_mass) <= tol
    assert abs(float(stats["student_mass"]) - s_mass) <= tol
    assert float(stats["union_size"]) == pytest.approx(size) and 5 <= size <= 10


def test_batched_with_eos_and_padding():
    """[B, T, V] rows of different lengths: the EOS position trains, padding after it never counts."""
    b, t_len, v, eos = 3, 6, 40, 7
    lengths = [6, 4, 1]
    g = torch.Generator().manual_seed(5)
    s = torch.randn(b, t_len, v, generator=g, dtype=torch.float64)
    t = torch.randn(b, t_len, v, generator=g, dtype=torch.float64)
    mask = torch.zeros(b, t_len, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
        t[i, n - 1, eos] = 9.0           # the teacher is sure the utterance ends here
    union = union_topk(t.topk(4, -1).indices, s.topk(4, -1).indices)
    t_lp, t_tail = gather_teacher_logprobs(t, union)
    loss, stats = opd_kl_loss(s, union, t_lp, t_tail, mask)
    ref = brute_mean(s.view(-1, v), t.view(-1, v), union.view(-1, 8), mask.view(-1), 1.0)
    assert abs(float(loss) - ref) < 1e-10
    assert float(stats["positions"]) == sum(lengths)
    # garbage after EOS (huge logits, nan teacher values) changes nothing, and no nan reaches the grad
    s2, t_lp2, t_tail2 = s.clone(), t_lp.clone(), t_tail.clone()
    s2[~mask] = 1e4
    t_lp2[~mask] = float("nan")
    t_tail2[~mask] = float("nan")
    s2.requires_grad_(True)
    loss2, _ = opd_kl_loss(s2, union, t_lp2, t_tail2, mask)
    loss2.backward()
    assert abs(float(loss2.detach()) - float(loss)) < 1e-12
    assert torch.isfinite(s2.grad).all() and (s2.grad[~mask] == 0).all()
    # the EOS positions themselves are trained: the student's EOS logit there moves the loss
    s3 = s.clone()
    for i, n in enumerate(lengths):
        s3[i, n - 1, eos] += 3.0
    assert float(opd_kl_loss(s3, union, t_lp, t_tail, mask)[0]) < float(loss)


def test_duplicate_ids_are_counted_once():
    s, t, union, _, _ = random_case(torch.float64, seed=1, n=6)
    union = union.clone()
    union[0, 7] = union[0, 0]            # duplicate across the two halves
    union[1, 1] = union[1, 0]            # adjacent duplicate
    union[2, 3:] = union[2, 2]           # one id repeated to the end
    t_lp, t_tail = gather_teacher_logprobs(t, union)
    assert torch.isinf(t_lp[0, 7]) and torch.isinf(t_lp[2, 3:]).all()   # gathered once only
    mask = torch.ones(6, dtype=torch.bool)
    ref = brute_mean(s, t, union, mask, 1.0)
    loss, stats = opd_kl_loss(s, union, t_lp, t_tail, mask)
    assert abs(float(loss) - ref) < 1e-10
    # a caller that put the real teacher value in a repeated slot must not double count it
    t_lp_dup = t_lp.clone()
    t_lp_dup[0, 7] = t_lp[0, 0]
    assert abs(float(opd_kl_loss(s, union, t_lp_dup, t_tail, mask)[0]) - ref) < 1e-10
    assert float(stats["union_size"]) == pytest.approx(sum(len(set(r) - {-1}) for r in union.tolist()) / 6)


def test_positions_with_zero_or_one_valid_id_are_excluded():
    s, t, union, _, _ = random_case(torch.float64, seed=2, n=6)
    union = union.clone()
    union[0, :] = -1                      # no ids
    union[1, 1:] = -1                     # one id
    union[2, :] = union[2, 0]             # one id, repeated
    t_lp, t_tail = gather_teacher_logprobs(t, union)
    mask = torch.ones(6, dtype=torch.bool)
    loss, stats = opd_kl_loss(s, union, t_lp, t_tail, mask)
    assert abs(float(loss) - brute_mean(s, t, union, mask, 1.0)) < 1e-10
    assert float(stats["positions"]) == 3
    per = opd_kl_loss(s, union, t_lp, t_tail, mask, reduction="none")[0]
    assert per[:3].tolist() == [0.0, 0.0, 0.0] and (per[3:] > 0).all()


def test_no_valid_position_gives_zero_loss_that_still_backpropagates():
    s, _, union, t_lp, t_tail = random_case(torch.float64, seed=3, n=4)
    s.requires_grad_(True)
    loss, stats = opd_kl_loss(s, union, t_lp, t_tail, torch.zeros(4, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and float(stats["positions"]) == 0 and loss.requires_grad
    loss.backward()
    assert (s.grad == 0).all()


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_whole_vocab_union_equals_full_kl(tau):
    g = torch.Generator().manual_seed(4)
    v = 12
    s = torch.randn(5, v, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, v, generator=g, dtype=torch.float64) * 3
    union = torch.stack([torch.randperm(v, generator=g) for _ in range(5)])
    t_lp, t_tail = gather_teacher_logprobs(t, union, tau=tau)
    assert torch.isneginf(t_tail).all()            # no mass outside the union: exactly -inf
    loss, stats = opd_kl_loss(s, union, t_lp, t_tail, tau=tau)
    pt, ls = (t / tau).log_softmax(-1), (s / tau).log_softmax(-1)
    full = tau ** 2 * (pt.exp() * (pt - ls)).sum(-1).mean()
    assert abs(float(loss.detach()) - float(full.detach())) < 1e-10
    assert float(stats["teacher_mass"]) == pytest.approx(1.0)
    assert float(stats["student_mass"]) == pytest.approx(1.0)
    want = torch.autograd.grad(full, s, retain_graph=True)[0]
    assert torch.allclose(torch.autograd.grad(loss, s)[0], want, atol=1e-12)


def test_teacher_blocked_ids_and_union_covering_its_support():
    """The teacher masks ids with -inf: its tail is empty while the student's is not."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 10, generator=g, dtype=torch.float64)
    t[:, 5:] = float("-inf")                       # ids 5.. are blocked for the teacher
    union = torch.tensor([[0, 1, 2, 3, 4, 7]] * 4)  # 7: a student-only id the teacher gives 0 mass
    t_lp, t_tail = gather_teacher_logprobs(t, union)
    assert torch.isneginf(t_tail).all() and torch.isneginf(t_lp[:, 5]).all()
    mask = torch.ones(4, dtype=torch.bool)
    loss, _ = opd_kl_loss(s, union, t_lp, t_tail, mask)
    assert abs(float(loss.detach()) - brute_mean(s.detach(), t, union, mask, 1.0)) < 1e-10
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[:, 7] > 0).all() and (s.grad[:, 5] > 0).all()   # mass on blocked ids is pushed down


def test_tail_is_precise_for_a_confident_model_in_float32():
    """Union mass 1 - 1e-9: log(1 - sum p) would be rounding noise in float32, ours is not."""
    v = 100
    t = torch.zeros(3, v, dtype=torch.float64)
    t[:, 0] = 25.0
    union = torch.tensor([[0, 1, 2, -1]] * 3)
    ref = math.log((v - 3) * math.exp(-25.0) / (1 + (v - 1) * math.exp(-25.0)))
    _, tail32 = gather_teacher_logprobs(t.float(), union)
    assert torch.allclose(tail32.double(), torch.full((3,), ref, dtype=torch.float64), rtol=1e-5)


def test_zero_when_student_equals_teacher():
    s, _, union, _, _ = random_case(torch.float64, seed=7)
    for tau in (1.0, 1.7):
        t_lp, t_tail = gather_teacher_logprobs(s, union, tau=tau)
        x = s.clone().requires_grad_(True)
        loss, stats = opd_kl_loss(x.view(4, 4, -1), union.view(4, 4, -1), t_lp.view(4, 4, -1),
                                  t_tail.view(4, 4), tau=tau)
        loss.backward()
        assert abs(float(loss.detach())) < 1e-12 and x.grad.abs().max() < 1e-12
        assert float(stats["teacher_mass"]) == pytest.approx(float(stats["student_mass"]), abs=1e-12)


def test_gradcheck_and_gradient_reaches_the_student_only():
    s, t, union, t_lp, t_tail = random_case(torch.float64, seed=8, n=4, v=9, k=2, tau=1.5)
    union = union.clone()
    union[1, 3] = union[1, 0]
    t_lp, t_tail = gather_teacher_logprobs(t, union, tau=1.5)
    mask = torch.tensor([True, True, False, True])
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: opd_kl_loss(z, union, t_lp, t_tail, mask, tau=1.5)[0], (x,))
    t_lp_g, t_tail_g = t_lp.clone().requires_grad_(True), t_tail.clone().requires_grad_(True)
    loss, _ = opd_kl_loss(x, union, t_lp_g, t_tail_g, mask, tau=1.5)
    loss.backward()
    assert t_lp_g.grad is None and t_tail_g.grad is None and x.grad.abs().sum() > 0


def test_bf16_student_logits_are_computed_in_float32():
    s, t, union, t_lp, t_tail = random_case(torch.float32, seed=9)
    sb = s.bfloat16().requires_grad_(True)
    loss, _ = opd_kl_loss(sb, union, t_lp, t_tail)
    assert loss.dtype == torch.float32
    ref = brute_mean(sb.detach().double(), t, union, torch.ones(len(s), dtype=torch.bool), 1.0)
    assert abs(float(loss.detach()) - ref) < 1e-5
    loss.backward()
    assert sb.grad.dtype == torch.bfloat16 and torch.isfinite(sb.grad.float()).all()


def test_union_topk_dedupes_pads_and_keeps_order():
    t = torch.tensor([[3, 1, 2], [5, 6, 7], [4, 4, -1], [0, 1, 2]])
    s = torch.tensor([[1, 9, 3], [-1, 5, 8], [4, 4, 4], [2, 1, 0]])
    assert union_topk(t, s).tolist() == [[3, 1, 2, 9, -1, -1], [5, 6, 7, 8, -1, -1],
                                         [4, -1, -1, -1, -1, -1], [0, 1, 2, -1, -1, -1]]
    # batched leading dims and the int32 ids that the trajectory batch stores
    bt = torch.randint(0, 20, (2, 5, 4), dtype=torch.int32)
    bs = torch.randint(0, 20, (2, 5, 4), dtype=torch.int32)
    u = union_topk(bt, bs)
    assert u.shape == (2, 5, 8) and u.dtype == torch.int64
    for row, a, b in zip(u.view(-1, 8).tolist(), bt.view(-1, 4).tolist(), bs.view(-1, 4).tolist()):
        want = list(dict.fromkeys(a + b))
        assert row == want + [-1] * (8 - len(want))
    first = first_occurrence(torch.tensor([[2, -1, 2, 0, -1, 0]]))
    assert first.tolist() == [[True, False, False, True, False, False]]


def test_bad_inputs_raise_value_error():
    s, t, union, t_lp, t_tail = random_case(torch.float64, seed=10, n=4, v=20)
    raw = t.gather(-1, union.clamp(min=0)).masked_fill(union < 0, float("-inf"))
    with pytest.raises(ValueError, match="not raw logits|log-probs"):
        opd_kl_loss(s, union, raw - raw.max(), t_tail)   # shifted <= 0: still not a distribution
    with pytest.raises(ValueError, match="log-probs"):
        opd_kl_loss(s, union, raw, t_tail)
    with pytest.raises(ValueError, match="teacher_logprobs has shape"):
        opd_kl_loss(s, union, t_lp[:, :3], t_tail)
    with pytest.raises(ValueError, match="mask has shape"):
        opd_kl_loss(s, union, t_lp, t_tail, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        opd_kl_loss(s, union.masked_fill(union == union[0, 0], 20), t_lp, t_tail)
    with pytest.raises(ValueError, match="same temperature"):
        opd_kl_loss(s, union, t_lp, t_tail, tau=2.0, teacher_tau=1.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        opd_kl_loss(s, union, t_lp, t_tail, tau=0.0)
    with pytest.raises(ValueError, match="reduction"):
        opd_kl_loss(s, union, t_lp, t_tail, reduction="avg")
    with pytest.raises(ValueError, match="integer"):
        union_topk(t.topk(2).values, s.topk(2).indices)
    with pytest.raises(ValueError, match="leading dims"):
        union_topk(torch.zeros(3, 2, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long))
