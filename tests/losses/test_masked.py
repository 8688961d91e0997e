"""MAE's masked MSE and SimMIM's masked L1 against float64 loops and invariances."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import masked_l1, masked_mse


def ref_masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> float:
    total, count = 0.0, 0
    b, l, p = pred.shape
    for i in range(b):
        for j in range(l):
            if not bool(mask[i, j]):
                continue
            t = [float(v) for v in target[i, j]]
            if norm_pix:
                mean = sum(t) / p
                var = sum((v - mean) ** 2 for v in t) / (p - 1)  # unbiased, as MAE
                t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
            total += sum((float(pred[i, j, k]) - t[k]) ** 2 for k in range(p)) / p
            count += 1
    return total / count


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pred, target = torch.randn(2, 5, 6), torch.randn(2, 5, 6) * 2 + 1
    mask = torch.tensor([[True, False, True, False, False], [False, True, True, True, False]])
    return pred, target, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_matches_loops(norm_pix: bool) -> None:
    pred, target, mask = _inputs()
    got = masked_mse(pred, target, mask, norm_pix=norm_pix)
    expected = ref_masked_mse(pred.double(), target.double(), mask, norm_pix)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_masked_mse_ignores_unmasked_patches() -> None:
    pred, target, mask = _inputs()
    base = masked_mse(pred, target, mask)
    changed = pred.clone()
    changed[~mask] = 100.0
    target2 = target.clone()
    target2[~mask] = -50.0
    assert masked_mse(changed, target2, mask).item() == pytest.approx(base.item(), rel=1e-7)
    pred.requires_grad_(True)
    masked_mse(pred, target, mask).backward()
    assert torch.all(pred.grad[~mask] == 0) and torch.all(pred.grad[mask].abs().sum(-1) > 0)


def test_masked_mse_closed_forms() -> None:
    pred, target, mask = _inputs()
    exact = torch.where(mask[..., None], target, pred)
    assert masked_mse(exact, target, mask).item() == 0.0
    assert masked_mse(pred, target, torch.zeros_like(mask)).item() == 0.0
    # norm_pix is blind to a per-patch offset of the target
    shifted = target + torch.randn(2, 5, 1) * 3
    assert masked_mse(pred, shifted, mask, norm_pix=True).item() == pytest.approx(
        masked_mse(pred, target, mask, norm_pix=True).item(), rel=1e-5
    )


def test_masked_l1_matches_loops_and_ignores_unmasked() -> None:
    pred, target, mask = _inputs()
    total, count = 0.0, 0
    for i in range(2):
        for j in range(5):
            if mask[i, j]:
                total += sum(abs(float(pred[i, j, k]) - float(target[i, j, k])) for k in range(6))
                count += 6
    assert masked_l1(pred, target, mask).item() == pytest.approx(total / count, rel=1e-5)
    changed = pred.clone()
    changed[~mask] = 7.0
    assert masked_l1(changed, target, mask).item() == pytest.approx(total / count, rel=1e-5)


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        masked_mse(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))


def test_bf16_autocast_gives_float32() -> None:
    pred, target, mask = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_mse(pred.bfloat16(), target.bfloat16(), mask, norm_pix=True)
        out1 = masked_l1(pred.bfloat16(), target.bfloat16(), mask)
    assert out.dtype == torch.float32 and out1.dtype == torch.float32
    ref = masked_mse(pred.bfloat16().float(), target.bfloat16().float(), mask, norm_pix=True)
    assert torch.allclose(out, ref, rtol=1e-6)
