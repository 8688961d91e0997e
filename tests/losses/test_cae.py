"""CAE's reconstruction + alignment objective against a float64 loop; the target's stop-gradient."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import cae_alignment_loss, cae_loss


def ref_cae(
    pred: torch.Tensor,
    target: torch.Tensor,
    lat_pred: torch.Tensor,
    lat_target: torch.Tensor,
    weight: float,
    norm_pix: bool,
) -> tuple[float, float, float]:
    b, m, p = pred.shape
    recon = 0.0
    for i in range(b):
        for j in range(m):
            t = [float(v) for v in target[i, j]]
            if norm_pix:
                mean = sum(t) / p
                var = sum((v - mean) ** 2 for v in t) / (p - 1)  # unbiased, as MAE
                t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
            recon += sum((float(pred[i, j, k]) - t[k]) ** 2 for k in range(p)) / p
    recon /= b * m
    d = lat_pred.shape[-1]
    align = sum(
        (float(lat_pred[i, j, k]) - float(lat_target[i, j, k])) ** 2
        for i in range(b)
        for j in range(m)
        for k in range(d)
    ) / (b * m * d)
    return recon + weight * align, recon, align


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("weight", [2.0, 0.5])
def test_cae_loss_matches_the_float64_formula(norm_pix: bool, weight: float) -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g) * 3 + 1
    lat_pred, lat_target = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    total, recon, align = cae_loss(pred, target, lat_pred, lat_target, align_weight=weight, norm_pix=norm_pix)
    expected = ref_cae(pred.double(), target.double(), lat_pred.double(), lat_target.double(), weight, norm_pix)
    for got, exp in zip((total, recon, align), expected):
        assert float(got) == pytest.approx(exp, rel=1e-5)


def test_alignment_target_carries_no_gradient() -> None:
    pred = torch.randn(2, 4, 6, requires_grad=True)
    target = torch.randn(2, 4, 6, requires_grad=True)
    loss = cae_alignment_loss(pred, target)
    loss.backward()
    assert target.grad is None
    assert pred.grad is not None
    torch.testing.assert_close(pred.grad, 2 * (pred - target).detach() / pred.numel())
    # The same through the combined loss: neither pixel nor latent targets receive a gradient.
    pix_target = torch.randn(2, 4, 9, requires_grad=True)
    total, _, _ = cae_loss(torch.randn(2, 4, 9, requires_grad=True), pix_target, pred, target)
    total.backward()
    assert target.grad is None and pix_target.grad is None


def test_alignment_loss_is_zero_at_the_target_and_checks_shapes() -> None:
    z = torch.randn(3, 2, 4)
    assert float(cae_alignment_loss(z, z.clone())) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        cae_alignment_loss(z, z[:, :1])
