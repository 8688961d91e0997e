"""SwAV's swapped-prediction loss against plain float64 loops and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import swav_loss


def ref_swav(scores: list[torch.Tensor], codes: list[torch.Tensor], t: float) -> float:
    total, terms = 0.0, 0
    for i, q in enumerate(codes):
        for v, s in enumerate(scores):
            if v == i:
                continue
            term = 0.0
            for b in range(s.shape[0]):
                logits = [float(x) / t for x in s[b]]
                m = max(logits)
                lse = m + math.log(sum(math.exp(x - m) for x in logits))
                term -= sum(float(q[b, k]) * (logits[k] - lse) for k in range(len(logits)))
            total += term / s.shape[0]
            terms += 1
    return total / terms


def _codes(b: int, k: int) -> torch.Tensor:
    return torch.softmax(torch.randn(b, k), dim=1)


def test_swav_matches_loops_multi_crop() -> None:
    scores = [torch.randn(4, 5) for _ in range(4)]  # 2 global + 2 local crops
    codes = [_codes(4, 5), _codes(4, 5)]
    got = swav_loss(scores, codes, temperature=0.1)
    expected = ref_swav([s.double() for s in scores], [c.double() for c in codes], 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_swav_uniform_scores_give_log_k() -> None:
    k = 7
    scores = [torch.zeros(3, k, dtype=torch.float64) for _ in range(3)]
    codes = [torch.softmax(torch.randn(3, k, dtype=torch.float64), 1) for _ in range(2)]
    assert swav_loss(scores, codes).item() == pytest.approx(math.log(k), rel=1e-12)


def test_swav_codes_receive_no_gradient_and_gradcheck() -> None:
    s1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    s2 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.softmax(torch.randn(3, 4, dtype=torch.float64), 1).requires_grad_()
    swav_loss([s1, s2], [c, c]).backward()
    assert c.grad is None and s1.grad is not None
    codes = [torch.softmax(torch.randn(3, 4, dtype=torch.float64), 1) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda a, b: swav_loss([a, b], codes, 0.1), (s1, s2))


def test_swav_rejects_bad_view_counts() -> None:
    with pytest.raises(ValueError):
        swav_loss([torch.randn(2, 3)], [torch.randn(2, 3)])


def test_bf16_autocast_gives_float32() -> None:
    scores = [torch.randn(4, 8).bfloat16() for _ in range(3)]
    codes = [torch.softmax(torch.randn(4, 8), 1).bfloat16() for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = swav_loss(scores, codes)
    ref = swav_loss([s.float() for s in scores], [c.float() for c in codes])
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
