"""DINO loss and centre, and the KoLeo regulariser, against float64 loops and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import cross_view_cross_entropy, dino_center_update, dino_loss, koleo_loss, swav_loss


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def ref_dino(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    center: torch.Tensor,
    ts: float,
    tt: float,
) -> float:
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            term = 0.0
            for b in range(s.shape[0]):
                centred = [float(t[b, k]) - float(center[0, k]) for k in range(t.shape[1])]
                p_t = _softmax([c / tt for c in centred])
                p_s = _softmax([float(x) / ts for x in s[b]])
                term -= sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s))
            total += term / s.shape[0]
            pairs += 1
    return total / pairs


def test_dino_matches_loops_multi_crop() -> None:
    student = [torch.randn(3, 6) for _ in range(4)]
    teacher = [torch.randn(3, 6) for _ in range(2)]
    center = torch.randn(1, 6) * 0.1
    got = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    expected = ref_dino([s.double() for s in student], [t.double() for t in teacher], center.double(), 0.1, 0.04)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_is_swavs_swapped_prediction_of_the_centred_softmax() -> None:
    student = [torch.randn(3, 6) for _ in range(3)]
    teacher, center = [torch.randn(3, 6) for _ in range(2)], torch.randn(1, 6)
    softmaxed = [torch.softmax((t - center) / 0.04, dim=-1) for t in teacher]
    torch.testing.assert_close(dino_loss(student, teacher, center), swav_loss(student, softmaxed, 0.1))


def test_dino_closed_forms() -> None:
    k = 5
    # teacher equal to the centre -> uniform targets; constant student -> uniform predictions
    center = torch.randn(1, k, dtype=torch.float64)
    teacher = [center.repeat(2, 1), center.repeat(2, 1)]
    student = [torch.full((2, k), 3.0, dtype=torch.float64) for _ in range(3)]
    assert dino_loss(student, teacher, center).item() == pytest.approx(math.log(k), rel=1e-12)
    # shifting teacher and centre together changes nothing
    t = [torch.randn(2, k, dtype=torch.float64) for _ in range(2)]
    s = [torch.randn(2, k, dtype=torch.float64) for _ in range(3)]
    shift = torch.randn(1, k, dtype=torch.float64)
    a = dino_loss(s, t, center)
    b = dino_loss(s, [x + shift for x in t], center + shift)
    assert torch.allclose(a, b)


def test_dino_teacher_gets_no_gradient_and_gradcheck() -> None:
    s = [torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    center = torch.zeros(1, 4, dtype=torch.float64)
    dino_loss(s, t, center).backward()
    assert all(x.grad is None for x in t) and all(x.grad is not None for x in s)
    t_fixed = [x.detach() for x in t]
    assert torch.autograd.gradcheck(lambda a, b, c: dino_loss([a, b, c], t_fixed, center, 0.1, 0.04), tuple(s))


def pairwise_cross_entropy(student: torch.Tensor, targets: torch.Tensor, views: int, temp: float) -> torch.Tensor:
    """The paper's formula written out: one term per (target view i, student view v != i)."""
    batch = student.shape[0] // views
    s, q = student.chunk(views), targets.chunk(targets.shape[0] // batch)
    terms = [
        -(q_i * torch.log_softmax(s_v / temp, dim=1)).sum(dim=1).mean()
        for i, q_i in enumerate(q)
        for v, s_v in enumerate(s)
        if v != i
    ]
    return torch.stack(terms).mean()


@pytest.mark.parametrize(("num_targets", "num_views"), [(1, 2), (1, 4), (2, 2), (2, 8), (3, 5)])
def test_cross_view_cross_entropy_equals_the_pairwise_sum_in_float64(num_targets: int, num_views: int) -> None:
    # Summing each student view's targets first (cross-entropy is linear in the target) and
    # the hand-written backward give the pairwise formula's loss and gradient.
    g = torch.Generator().manual_seed(num_targets * 10 + num_views)
    student = torch.randn(num_views * 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.softmax(torch.randn(num_targets * 3, 7, dtype=torch.float64, generator=g), dim=1)
    targets[0] *= 0.5  # rows need not sum to 1
    got = cross_view_cross_entropy(student, targets, num_views, temperature=0.1)
    expected = pairwise_cross_entropy(student, targets, num_views, 0.1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (grad_got,) = torch.autograd.grad(2.5 * got, student)
    (grad_expected,) = torch.autograd.grad(2.5 * expected, student)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, swav_loss(student.chunk(num_views), targets.chunk(num_targets), 0.1))
    assert torch.autograd.gradcheck(lambda x: cross_view_cross_entropy(x, targets, num_views, 0.1), (student,))


def test_cross_view_cross_entropy_gives_targets_no_gradient_and_checks_shapes() -> None:
    student = torch.randn(6, 4, requires_grad=True)
    targets = torch.softmax(torch.randn(4, 4), dim=1).requires_grad_()
    cross_view_cross_entropy(student, targets, 3).backward()
    assert targets.grad is None and student.grad is not None
    with pytest.raises(ValueError, match="num_views"):
        cross_view_cross_entropy(student, targets[:3], 3)
    with pytest.raises(ValueError, match="target views"):
        cross_view_cross_entropy(student, torch.cat([targets, targets]), 3)


def test_dino_center_update_is_pure_ema_of_batch_mean() -> None:
    center = torch.randn(1, 4, dtype=torch.float64)
    before = center.clone()
    out = torch.randn(6, 4, dtype=torch.float64)
    new = dino_center_update(center, out, momentum=0.9)
    expected = [0.9 * float(before[0, k]) + 0.1 * sum(float(out[b, k]) for b in range(6)) / 6 for k in range(4)]
    assert new.shape == (1, 4)
    assert torch.allclose(new[0], torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(center, before)


def ref_koleo(x: torch.Tensor, eps: float) -> float:
    rows = [r / math.sqrt(float((r * r).sum())) for r in x]
    total = 0.0
    for i, r in enumerate(rows):
        d = min(math.sqrt(float(((r - o) ** 2).sum())) for j, o in enumerate(rows) if j != i)
        total += -math.log(d + eps)
    return total / len(rows)


def test_koleo_matches_loops_and_closed_form() -> None:
    x = torch.randn(6, 3)
    assert koleo_loss(x).item() == pytest.approx(ref_koleo(x.double(), 1e-8), rel=1e-5)
    # orthonormal rows: every nearest neighbour is at distance sqrt(2)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    assert koleo_loss(q * 4).item() == pytest.approx(-math.log(math.sqrt(2) + 1e-8), rel=1e-12)


def test_koleo_spreading_lowers_loss_and_gradcheck() -> None:
    clustered = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [0.0, 1.0]])
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert koleo_loss(spread) < koleo_loss(clustered)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(koleo_loss, (x,))


def test_bf16_autocast_gives_float32() -> None:
    s = [torch.randn(4, 8).bfloat16() for _ in range(3)]
    t = [torch.randn(4, 8).bfloat16() for _ in range(2)]
    c = torch.zeros(1, 8)
    x = torch.randn(6, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [dino_loss(s, t, c), koleo_loss(x)]
    refs = [dino_loss([a.float() for a in s], [a.float() for a in t], c), koleo_loss(x.float())]
    for out, ref in zip(outs, refs):
        assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
