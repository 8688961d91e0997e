"""Sinkhorn-Knopp codes: marginals, agreement with a plain float64 loop, stability."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.nn.sinkhorn import sinkhorn_knopp


def ref_sinkhorn(scores: list[list[float]], eps: float, iters: int) -> list[list[float]]:
    b, k = len(scores), len(scores[0])
    q = [[math.exp(s / eps) for s in row] for row in scores]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        col = [sum(q[i][j] for i in range(b)) for j in range(k)]
        q = [[q[i][j] / col[j] / k for j in range(k)] for i in range(b)]
        row = [sum(r) for r in q]
        q = [[q[i][j] / row[i] / b for j in range(k)] for i in range(b)]
    return [[v * b for v in r] for r in q]


def test_matches_plain_loop() -> None:
    scores = torch.randn(6, 4) * 0.2
    got = sinkhorn_knopp(scores, epsilon=0.1, iterations=3)
    expected = torch.tensor(ref_sinkhorn(scores.double().tolist(), 0.1, 3), dtype=torch.float64)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_marginals() -> None:
    b, k = 12, 4
    codes = sinkhorn_knopp(torch.randn(b, k, dtype=torch.float64), epsilon=0.5, iterations=200)
    assert torch.allclose(codes.sum(dim=1), torch.ones(b, dtype=torch.float64))
    # equipartition: every prototype gets B / K samples' worth of mass
    assert torch.allclose(codes.sum(dim=0), torch.full((k,), b / k, dtype=torch.float64), atol=1e-8)
    assert (codes >= 0).all()


def test_stable_for_offset_scores_and_small_epsilon() -> None:
    cosines = torch.rand(8, 5) * 2 - 1  # the range of SwAV's normalised prototype scores
    # exp((c + 100) / 0.05) overflows float32 unless the maximum is subtracted first
    codes = sinkhorn_knopp(cosines + 100.0, epsilon=0.05, iterations=3)
    assert torch.isfinite(codes).all()
    assert torch.allclose(codes, sinkhorn_knopp(cosines, epsilon=0.05, iterations=3), atol=1e-4)
    assert torch.allclose(codes.sum(dim=1), torch.ones(8), atol=1e-5)


def test_no_grad_and_half_input() -> None:
    scores = torch.randn(4, 3, requires_grad=True)
    assert not sinkhorn_knopp(scores).requires_grad
    out = sinkhorn_knopp(scores.detach().bfloat16())
    assert out.dtype == torch.float32
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.randn(2, 3, 4))
