"""InfoNCE, MoCo v3 and NT-Xent against plain float64 loops and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import info_nce, moco_v3_loss, nt_xent


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / math.sqrt(float((v * v).sum()))


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def _ce(logits: list[float], target: int) -> float:
    m = max(logits)
    return -(logits[target] - m - math.log(sum(math.exp(x - m) for x in logits)))


def ref_info_nce_queue(q: torch.Tensor, k: torch.Tensor, negs: torch.Tensor, t: float) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        qi = _unit(q[i])
        logits = [_dot(qi, _unit(k[i])) / t] + [_dot(qi, _unit(n)) / t for n in negs]
        total += _ce(logits, 0)
    return total / q.shape[0]


def ref_info_nce_batch(q: torch.Tensor, k: torch.Tensor, t: float) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        logits = [_dot(_unit(q[i]), _unit(k[j])) / t for j in range(k.shape[0])]
        total += _ce(logits, i)
    return total / q.shape[0]


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    z = [_unit(v) for v in torch.cat([z1, z2])]
    n = z1.shape[0]
    total = 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        others = [b for b in range(2 * n) if b != a]
        logits = [_dot(z[a], z[b]) / t for b in others]
        total += _ce(logits, others.index(pos))
    return total / (2 * n)


def _orthonormal(rows: int, dim: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    return q[:rows]


def test_info_nce_with_queue_matches_loops() -> None:
    q, k, negs = torch.randn(5, 8), torch.randn(5, 8), torch.randn(7, 8)
    got = info_nce(q, k, negs, temperature=0.2)
    assert got.shape == ()
    expected = ref_info_nce_queue(q.double(), k.double(), negs.double(), 0.2)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_in_batch_matches_loops_and_gather_is_identity_alone() -> None:
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    got = info_nce(q, k, temperature=0.3)
    assert got.item() == pytest.approx(ref_info_nce_batch(q.double(), k.double(), 0.3), rel=1e-5)
    assert torch.equal(info_nce(q, k, temperature=0.3, gather=True), got)


def test_info_nce_closed_forms() -> None:
    t = 0.1
    # positive identical to the query, M negatives orthogonal to it
    basis = _orthonormal(6, 6)
    q = basis[:1].repeat(3, 1)
    negs = basis[1:]
    expected = math.log(1 + 5 * math.exp(-1 / t))
    assert info_nce(q, q, negs, temperature=t).item() == pytest.approx(expected, rel=1e-10)
    # in-batch with orthonormal queries equal to keys: B - 1 orthogonal negatives each
    z = _orthonormal(4, 6)
    expected = math.log(1 + 3 * math.exp(-1 / t))
    assert info_nce(z, z, temperature=t).item() == pytest.approx(expected, rel=1e-10)


def test_moco_v3_matches_loops() -> None:
    q1, q2, k1, k2 = (torch.randn(4, 6) for _ in range(4))
    t = 0.2
    expected = (
        2 * t * (ref_info_nce_batch(q1.double(), k2.double(), t) + ref_info_nce_batch(q2.double(), k1.double(), t))
    )
    assert moco_v3_loss(q1, q2, k1, k2, temperature=t).item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_matches_loops() -> None:
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    got = nt_xent(z1, z2, temperature=0.5)
    assert got.item() == pytest.approx(ref_nt_xent(z1.double(), z2.double(), 0.5), rel=1e-5)
    assert torch.equal(nt_xent(z1, z2, temperature=0.5, gather=True), got)


def test_nt_xent_closed_forms() -> None:
    t, b = 0.5, 4
    z = _orthonormal(b, 8)
    # identical views, all other rows orthogonal: 1 positive at cos 1, 2B-2 at cos 0
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * b - 2))
    assert nt_xent(z, z, temperature=t).item() == pytest.approx(expected, rel=1e-10)
    # every embedding orthogonal to every other one: uniform over 2B-1 candidates
    z_all = _orthonormal(2 * b, 8)
    assert nt_xent(z_all[:b], z_all[b:], temperature=t).item() == pytest.approx(math.log(2 * b - 1), rel=1e-10)


def test_nt_xent_scale_invariant_and_symmetric() -> None:
    z1, z2 = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    base = nt_xent(z1, z2)
    assert torch.allclose(nt_xent(3 * z1, 0.5 * z2), base)
    assert torch.allclose(nt_xent(z2, z1), base)


def test_gradcheck() -> None:
    z1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    negs = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.5), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b, n: info_nce(a, b, n, 0.2), (z1, z2, negs))
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, None, 0.2), (z1, z2))


def test_bf16_autocast_gives_float32_computed_in_float32() -> None:
    z1 = torch.randn(8, 16).bfloat16()
    z2 = torch.randn(8, 16).bfloat16()
    negs = torch.randn(10, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [nt_xent(z1, z2, 0.1), info_nce(z1, z2, negs, 0.07), moco_v3_loss(z1, z2, z2, z1)]
    refs = [
        nt_xent(z1.float(), z2.float(), 0.1),
        info_nce(z1.float(), z2.float(), negs.float(), 0.07),
        moco_v3_loss(z1.float(), z2.float(), z2.float(), z1.float()),
    ]
    for out, ref in zip(outs, refs):
        assert out.dtype == torch.float32
        # equal to the float32 result: the matmuls inside did not fall back to bf16
        assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_key_gradient_flows_only_when_key_requires_grad() -> None:
    q = torch.randn(4, 6, requires_grad=True)
    k = torch.randn(4, 6)
    info_nce(q, k).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    k2 = torch.randn(4, 6, requires_grad=True)
    info_nce(q, k2).backward()
    assert k2.grad is not None and k2.grad.abs().sum() > 0
