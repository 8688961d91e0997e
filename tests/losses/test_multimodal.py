"""CLIP's symmetric image-text loss against float64 loops and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import CLIP_INIT_LOGIT_SCALE, clip_loss


def ref_clip(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / math.sqrt(float((v * v).sum()))

    b = img.shape[0]
    im = [unit(v) for v in img]
    tx = [unit(v) for v in txt]
    sim = [[scale * float((im[i] * tx[j]).sum()) for j in range(b)] for i in range(b)]

    def ce(row: list[float], target: int) -> float:
        m = max(row)
        return -(row[target] - m - math.log(sum(math.exp(x - m) for x in row)))

    loss_i = sum(ce(sim[i], i) for i in range(b)) / b
    loss_t = sum(ce([sim[i][j] for i in range(b)], j) for j in range(b)) / b
    return (loss_i + loss_t) / 2


def test_clip_matches_loops() -> None:
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    scale = torch.tensor(CLIP_INIT_LOGIT_SCALE)
    got = clip_loss(img, txt, scale)
    assert got.item() == pytest.approx(ref_clip(img.double(), txt.double(), 1 / 0.07), rel=1e-5)
    assert torch.equal(clip_loss(img, txt, scale, gather=True), got)


def test_clip_closed_form_and_clamp() -> None:
    b = 4
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    z = q[:b]
    s = 2.0
    expected = math.log(1 + (b - 1) * math.exp(-s))
    got = clip_loss(z, z, torch.tensor(math.log(s), dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # the multiplier is clipped at 100
    big = clip_loss(z, z.roll(1, 0), torch.tensor(math.log(1e4), dtype=torch.float64))
    at_100 = clip_loss(z, z.roll(1, 0), torch.tensor(math.log(100.0), dtype=torch.float64))
    assert big.item() == pytest.approx(at_100.item(), rel=1e-12)


def test_clip_gradients_reach_both_towers_and_scale() -> None:
    img = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(clip_loss, (img, txt, scale))


def test_bf16_autocast_gives_float32() -> None:
    img, txt = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    scale = torch.tensor(CLIP_INIT_LOGIT_SCALE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = clip_loss(img, txt, scale)
    ref = clip_loss(img.float(), txt.float(), scale)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
