"""MaskFeat's masked MSE and data2vec's targets and smooth L1 against plain float64 loops."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import data2vec_loss, data2vec_targets, maskfeat_loss


def _inputs(d: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, d, generator=g), torch.randn(2, 5, d, generator=g) * 2 + 1
    mask = torch.tensor([[True, False, True, False, False], [False, True, True, True, False]])
    return pred, target, mask


# ------------------------------------------------------------------------------ MaskFeat


def ref_maskfeat(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    total, count = 0.0, 0
    b, l, d = pred.shape
    for i in range(b):
        for j in range(l):
            if bool(mask[i, j]):
                total += sum((float(pred[i, j, k]) - float(target[i, j, k])) ** 2 for k in range(d)) / d
                count += 1
    return total / count


def test_maskfeat_loss_matches_loop_and_ignores_visible_patches() -> None:
    pred, target, mask = _inputs()
    got = maskfeat_loss(pred, target, mask)
    assert got.item() == pytest.approx(ref_maskfeat(pred.double(), target.double(), mask), rel=1e-6)
    changed_pred, changed_target = pred.clone(), target.clone()
    changed_pred[~mask], changed_target[~mask] = 100.0, -50.0
    assert maskfeat_loss(changed_pred, changed_target, mask).item() == pytest.approx(got.item(), rel=1e-6)
    p = pred.clone().requires_grad_(True)
    maskfeat_loss(p, target, mask).backward()
    assert p.grad is not None and torch.all(p.grad[~mask] == 0) and torch.all(p.grad[mask].abs().sum(-1) > 0)
    assert maskfeat_loss(pred, pred, mask).item() == 0.0
    assert maskfeat_loss(pred, target, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="bool mask"):
        maskfeat_loss(pred, target, mask.long())


# ------------------------------------------------------------------------------ data2vec


def ref_targets(blocks: list[torch.Tensor], layer_norm: bool, eps: float = 1e-5) -> torch.Tensor:
    """Instance norm of each block over the tokens (per sample and channel), then the mean."""
    b, l, d = blocks[0].shape
    out = torch.zeros(b, l, d, dtype=torch.float64)
    for y in blocks:
        for i in range(b):
            for c in range(d):
                col = [float(y[i, t, c]) for t in range(l)]
                mu = sum(col) / l
                var = sum((v - mu) ** 2 for v in col) / l  # biased, as instance norm
                for t in range(l):
                    out[i, t, c] += (col[t] - mu) / math.sqrt(var + eps) / len(blocks)
    if layer_norm:
        for i in range(b):
            for t in range(l):
                row = [float(out[i, t, c]) for c in range(d)]
                mu = sum(row) / d
                var = sum((v - mu) ** 2 for v in row) / d
                for c in range(d):
                    out[i, t, c] = (row[c] - mu) / math.sqrt(var + eps)
    return out


@pytest.mark.parametrize("layer_norm", [False, True])
def test_data2vec_targets_match_float64_recompute(layer_norm: bool) -> None:
    g = torch.Generator().manual_seed(1)
    # Blocks with their own offsets and scales per channel: the instance norm must remove them.
    blocks = [torch.randn(2, 7, 4, generator=g) * (k + 1) * 3 + k for k in range(3)]
    got = data2vec_targets(blocks, layer_norm_targets=layer_norm)
    expected = ref_targets([y.double() for y in blocks], layer_norm)
    assert got.dtype == torch.float32 and got.shape == (2, 7, 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # float64 in, float64 out, to float64 precision.
    torch.testing.assert_close(data2vec_targets([y.double() for y in blocks], layer_norm), expected)


def test_data2vec_targets_of_one_block_are_unit_variance_over_tokens() -> None:
    y = torch.randn(3, 16, 8) * 5 + 2
    t = data2vec_targets([y])
    torch.testing.assert_close(t.mean(dim=1), torch.zeros(3, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(dim=1, correction=0), torch.ones(3, 8), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="at least one"):
        data2vec_targets([])


def ref_smooth_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, beta: float) -> float:
    b, l, d = pred.shape
    total, count = 0.0, 0
    for i in range(b):
        for j in range(l):
            if not bool(mask[i, j]):
                continue
            s = 0.0
            for k in range(d):
                x = abs(float(pred[i, j, k]) - float(target[i, j, k]))
                if beta == 0:
                    s += x * x
                else:
                    s += 0.5 * x * x / beta if x < beta else x - 0.5 * beta
            total += s / math.sqrt(d)
            count += 1
    return total / count


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_data2vec_loss_is_scaled_smooth_l1_over_masked_tokens(beta: float) -> None:
    pred, target, mask = _inputs(d=9)
    got = data2vec_loss(pred, target, mask, beta=beta)
    expected = ref_smooth_l1_loss(pred.double(), target.double(), mask, beta)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Both regimes are exercised: some differences are below beta, some above.
    if beta == 2.0:
        diff = (pred - target)[mask].abs()
        assert (diff < beta).any() and (diff >= beta).any()
    # An explicit scale replaces 1 / sqrt(D).
    scaled = data2vec_loss(pred, target, mask, beta=beta, scale=1.0)
    assert scaled.item() == pytest.approx(expected * 3.0, rel=1e-5)
    # Visible positions have no effect.
    changed = pred.clone()
    changed[~mask] = 1e3
    assert data2vec_loss(changed, target, mask, beta=beta).item() == pytest.approx(got.item(), rel=1e-6)


def test_data2vec_loss_rejects_negative_beta() -> None:
    pred, target, mask = _inputs()
    with pytest.raises(ValueError, match="beta"):
        data2vec_loss(pred, target, mask, beta=-1.0)
