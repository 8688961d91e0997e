"""The metric-learning catalogue against plain float64 loops and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import (
    contrastive_pair_loss,
    lifted_structured_loss,
    n_pair_loss,
    nce_loss,
    soft_nearest_neighbour_loss,
    triplet_loss,
)


def _dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / math.sqrt(float((v * v).sum()))


def test_contrastive_pair_matches_loops() -> None:
    x1, x2 = torch.randn(6, 3) * 0.5, torch.randn(6, 3) * 0.5
    same = torch.tensor([True, False, True, False, False, True])
    expected = 0.0
    for i in range(6):
        d = _dist(x1[i], x2[i])
        expected += 0.5 * d**2 if same[i] else 0.5 * max(0.0, 1.0 - d) ** 2
    got = contrastive_pair_loss(x1, x2, same, margin=1.0)
    assert got.item() == pytest.approx(expected / 6, rel=1e-5)
    # dissimilar pairs beyond the margin cost nothing; coincident ones get a finite grad
    far = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 0.0]])
    assert contrastive_pair_loss(*far, torch.tensor([False])).item() == 0.0
    x = torch.zeros(1, 2, requires_grad=True)
    contrastive_pair_loss(x, torch.zeros(1, 2), torch.tensor([False])).backward()
    assert torch.isfinite(x.grad).all()


def test_triplet_matches_loops_and_closed_forms() -> None:
    a, p, n = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    expected = 0.0
    for i in range(5):
        ua, up, un = _unit(a[i].double()), _unit(p[i].double()), _unit(n[i].double())
        expected += max(0.0, _dist(ua, up) ** 2 - _dist(ua, un) ** 2 + 0.2)
    assert triplet_loss(a, p, n).item() == pytest.approx(expected / 5, rel=1e-5)
    e = torch.eye(3)
    # positive identical, negative orthogonal: 0 - 2 + 0.2 < 0
    assert triplet_loss(e, e, e.roll(1, 0)).item() == 0.0
    # negative identical, positive orthogonal: 2 - 0 + 0.2
    assert triplet_loss(e, e.roll(1, 0), e).item() == pytest.approx(2.2, rel=1e-6)
    raw = triplet_loss(2 * e, e, e.roll(1, 0), normalize=False)
    assert raw.item() == pytest.approx(max(0.0, 1 - 5 + 0.2), abs=1e-6)


def ref_lifted(x: torch.Tensor, labels: list[int], margin: float) -> float:
    b = x.shape[0]
    d = [[_dist(x[i], x[j]) for j in range(b)] for i in range(b)]
    pairs = [(i, j) for i in range(b) for j in range(i + 1, b) if labels[i] == labels[j]]
    total = 0.0
    for i, j in pairs:
        s = sum(math.exp(margin - d[i][k]) for k in range(b) if labels[k] != labels[i])
        s += sum(math.exp(margin - d[j][l]) for l in range(b) if labels[l] != labels[j])
        if s > 0:
            total += max(0.0, math.log(s) + d[i][j]) ** 2
    return total / (2 * len(pairs))


def test_lifted_structured_matches_loops() -> None:
    x = torch.randn(7, 3)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    got = lifted_structured_loss(x, labels, margin=1.0)
    assert got.item() == pytest.approx(ref_lifted(x.double(), labels.tolist(), 1.0), rel=1e-5)


def test_lifted_structured_edge_cases() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    # one class: positive pairs but no negatives; all distinct: no positive pairs
    for labels in (torch.zeros(4, dtype=torch.long), torch.arange(4)):
        loss = lifted_structured_loss(x, labels)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(x.grad).all()
    # well separated classes with margin below the gap: zero loss
    sep = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]])
    assert lifted_structured_loss(sep, torch.tensor([0, 0, 1, 1]), margin=1.0).item() == 0.0


def test_n_pair_matches_loops() -> None:
    a, p = torch.randn(5, 4), torch.randn(5, 4)
    expected = 0.0
    for i in range(5):
        fi = float((a[i].double() * p[i].double()).sum())
        others = [float((a[i].double() * p[j].double()).sum()) for j in range(5) if j != i]
        expected += math.log(1 + sum(math.exp(f - fi) for f in others))
    assert n_pair_loss(a, p).item() == pytest.approx(expected / 5, rel=1e-5)


def test_nce_matches_posterior_form() -> None:
    data, noise = torch.randn(4), torch.randn(4, 3)
    log_pn = -math.log(10)
    m, pn = 3, 0.1
    expected = 0.0
    for b in range(4):
        p = math.exp(float(data[b]))
        expected -= math.log(p / (p + m * pn))
        for j in range(3):
            pj = math.exp(float(noise[b, j]))
            expected -= math.log(1 - pj / (pj + m * pn))
    assert nce_loss(data, noise, log_pn).item() == pytest.approx(expected / 4, rel=1e-5)
    # at p = M * Pn both posteriors are 1/2: (1 + M) log 2
    at_half = torch.full((2,), math.log(m * pn))
    got = nce_loss(at_half, at_half[:, None].repeat(1, 3), log_pn)
    assert got.item() == pytest.approx(4 * math.log(2), rel=1e-6)
    # huge scores stay finite
    assert torch.isfinite(nce_loss(torch.full((2,), 1e4), torch.full((2, 3), -1e4), log_pn))


def ref_snn(x: torch.Tensor, labels: list[int], t: float) -> float:
    b = x.shape[0]
    total, count = 0.0, 0
    for i in range(b):
        same = [j for j in range(b) if j != i and labels[j] == labels[i]]
        num = sum(math.exp(-(_dist(x[i], x[j]) ** 2) / t) for j in same)
        den = sum(math.exp(-(_dist(x[i], x[k]) ** 2) / t) for k in range(b) if k != i)
        if num > 0:
            total -= math.log(num / den)
            count += 1
    return total / count


def test_soft_nearest_neighbour_matches_loops() -> None:
    x = torch.randn(7, 3)
    labels = torch.tensor([0, 1, 0, 1, 1, 2, 0])  # class 2 has no partner: left out
    got = soft_nearest_neighbour_loss(x, labels, temperature=2.0)
    assert got.item() == pytest.approx(ref_snn(x.double(), labels.tolist(), 2.0), rel=1e-5)


def test_soft_nearest_neighbour_closed_forms() -> None:
    far = torch.tensor([[0.0, 0.0], [0.1, 0.0], [50.0, 0.0], [50.1, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert soft_nearest_neighbour_loss(far, labels).item() == pytest.approx(0.0, abs=1e-12)
    # all points coincide: uniform neighbourhood, class share 1/3 of 3 others
    same = torch.zeros(4, 2)
    assert soft_nearest_neighbour_loss(same, labels).item() == pytest.approx(math.log(3), rel=1e-6)
    assert soft_nearest_neighbour_loss(torch.randn(3, 2), torch.arange(3)).item() == 0.0


def test_gradients_are_finite() -> None:
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda v: soft_nearest_neighbour_loss(v, labels), (x,))
    assert torch.autograd.gradcheck(lambda v: lifted_structured_loss(v, labels), (x,))


def test_bf16_autocast_gives_float32() -> None:
    x, y = torch.randn(6, 4).bfloat16(), torch.randn(6, 4).bfloat16()
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [
            n_pair_loss(x, y),
            lifted_structured_loss(x, labels),
            soft_nearest_neighbour_loss(x, labels),
        ]
    refs = [
        n_pair_loss(x.float(), y.float()),
        lifted_structured_loss(x.float(), labels),
        soft_nearest_neighbour_loss(x.float(), labels),
    ]
    for out, ref in zip(outs, refs):
        assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
