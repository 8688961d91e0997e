"""SimSiam, BYOL and Barlow Twins losses against plain float64 loops and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import barlow_twins_loss, byol_loss, negative_cosine


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum()) / math.sqrt(float((a * a).sum()) * float((b * b).sum()))


def ref_barlow(z1: torch.Tensor, z2: torch.Tensor, lam: float, eps: float) -> float:
    n, d = z1.shape

    def standardise(z: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(z)
        for j in range(d):
            col = [float(z[b, j]) for b in range(n)]
            mean = sum(col) / n
            var = sum((v - mean) ** 2 for v in col) / n
            for b in range(n):
                out[b, j] = (col[b] - mean) / math.sqrt(var + eps)
        return out

    a, b_ = standardise(z1), standardise(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(float(a[k, i] * b_[k, j]) for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lam * c**2
    return loss


def test_negative_cosine_matches_loops_and_stops_gradient() -> None:
    p = torch.randn(5, 6, requires_grad=True)
    z = torch.randn(5, 6, requires_grad=True)
    loss = negative_cosine(p, z)
    expected = -sum(_cos(p[i].detach().double(), z[i].detach().double()) for i in range(5)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None  # the stop-gradient branch


def test_negative_cosine_closed_forms() -> None:
    z = torch.randn(4, 3, dtype=torch.float64)
    assert negative_cosine(2 * z, z).item() == pytest.approx(-1.0, abs=1e-12)
    assert negative_cosine(-z, z).item() == pytest.approx(1.0, abs=1e-12)


def test_byol_matches_loops_closed_forms_and_detaches_target() -> None:
    p = torch.randn(5, 6, requires_grad=True)
    z = torch.randn(5, 6, requires_grad=True)
    loss = byol_loss(p, z)
    pd, zd = p.detach().double(), z.detach().double()
    expected = sum(2 - 2 * _cos(pd[i], zd[i]) for i in range(5)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert z.grad is None and p.grad is not None
    basis = torch.eye(4, dtype=torch.float64)
    assert byol_loss(3 * basis, basis).item() == pytest.approx(0.0, abs=1e-12)
    assert byol_loss(basis, basis.roll(1, dims=0)).item() == pytest.approx(2.0, abs=1e-12)


def test_barlow_twins_matches_loops() -> None:
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    got = barlow_twins_loss(z1, z2, lambda_offdiag=0.1)
    expected = ref_barlow(z1.double(), z2.double(), 0.1, 1e-5)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(barlow_twins_loss(z1, z2, lambda_offdiag=0.1, gather=True), got)


def test_barlow_twins_zero_at_identity_correlation() -> None:
    # centred, unit-variance, mutually orthogonal columns: C = I exactly
    z = (
        torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)
        * 3
        + 0.5
    )
    assert barlow_twins_loss(z, z, eps=0.0).item() == pytest.approx(0.0, abs=1e-20)
    # swapping two dimensions of the second view moves C's mass off the diagonal
    swapped = z[:, [1, 0, 2]]
    lam = 5e-3
    assert barlow_twins_loss(z, swapped, lambda_offdiag=lam, eps=0.0).item() == pytest.approx(2.0 + 2 * lam, rel=1e-12)


def test_barlow_twins_gradcheck() -> None:
    z1 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins_loss(a, b, 0.1), (z1, z2))


def test_bf16_autocast_gives_float32_computed_in_float32() -> None:
    z1, z2 = torch.randn(8, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [negative_cosine(z1, z2), byol_loss(z1, z2), barlow_twins_loss(z1, z2)]
    refs = [
        negative_cosine(z1.float(), z2.float()),
        byol_loss(z1.float(), z2.float()),
        barlow_twins_loss(z1.float(), z2.float()),
    ]
    for out, ref in zip(outs, refs):
        assert out.dtype == torch.float32
        assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
