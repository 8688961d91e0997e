"""MoCHi's hard negative mixing against plain float64 computations of the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses import (
    MixingDraw,
    draw_mixing,
    info_nce,
    mix_hard_negatives,
    mochi_info_nce,
    mochi_logits,
)
from selfsup.losses.hard_negatives import hardest_indices

B, K, D, N, S, S_Q = 3, 40, 8, 6, 7, 5


def _unit(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def _draw(seed: int = 0, batch: int = B) -> MixingDraw:
    return draw_mixing(batch, N, S, S_Q, generator=torch.Generator().manual_seed(seed))


def _coefficients(target: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares ``(c_a, c_b)`` with ``c_a a + c_b b = target``, and the residual norm."""
    basis = torch.stack([a, b], dim=1)  # (D, 2)
    coef = torch.linalg.lstsq(basis, target.unsqueeze(1)).solution.squeeze(1)
    return coef, (basis @ coef - target).norm()


def test_draw_ranges_and_distinct_pairs() -> None:
    draw = draw_mixing(64, N, 50, 50, generator=torch.Generator().manual_seed(1))
    assert draw.pairs.shape == (64, 50, 2) and draw.partners.shape == (64, 50) and draw.num_synthetic == 100
    assert bool((draw.pairs >= 0).all()) and bool((draw.pairs < N).all())
    assert bool((draw.pairs[..., 0] != draw.pairs[..., 1]).all()), "a pair mixes two different negatives"
    assert bool((draw.partners >= 0).all()) and bool((draw.partners < N).all())
    assert 0 <= float(draw.alpha.min()) and float(draw.alpha.max()) < 1
    assert 0 <= float(draw.beta.min()) and float(draw.beta.max()) < 0.5  # the query's share stays below half
    # Every position is used (uniform draws), both as first and second of a pair.
    assert set(draw.pairs[..., 0].unique().tolist()) == set(draw.pairs[..., 1].unique().tolist()) == set(range(N))
    # Reproducible from the generator.
    again = draw_mixing(64, N, 50, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.pairs, draw.pairs) and torch.equal(again.beta, draw.beta)


def test_chosen_negatives_are_the_n_hardest_in_float64() -> None:
    q = _unit(B, D, seed=1, dtype=torch.float32)
    n = _unit(K, D, seed=2, dtype=torch.float32)
    chosen = hardest_indices(q @ n.T, N)
    sims = q.double() @ n.double().T
    for b in range(B):
        picked = sims[b, chosen[b]]
        rest = sims[b, [j for j in range(K) if j not in set(chosen[b].tolist())]]
        assert float(picked.min()) >= float(rest.max()) - 1e-6, "a harder negative was left out"
        assert bool((picked[:-1] >= picked[1:] - 1e-6).all()), "hardest first"
    with pytest.raises(ValueError, match="queue size"):
        hardest_indices(q @ n.T, K + 1)


def test_mixed_points_are_renormalised_convex_combinations_of_the_chosen_hardest() -> None:
    q, n = _unit(B, D, seed=3), _unit(K, D, seed=4)
    draw = _draw()
    hardest = hardest_indices(q @ n.T, N)
    synthetic = mix_hard_negatives(q, n, hardest, draw)
    assert synthetic.shape == (B, S + S_Q, D) and synthetic.dtype == torch.float64
    torch.testing.assert_close(synthetic.norm(dim=-1), torch.ones(B, S + S_Q, dtype=torch.float64))
    for b in range(B):
        for k in range(S):
            n_i = n[hardest[b, draw.pairs[b, k, 0]]]
            n_j = n[hardest[b, draw.pairs[b, k, 1]]]
            coef, residual = _coefficients(synthetic[b, k], n_i, n_j)
            assert float(residual) < 1e-10, "not in the span of its two hard negatives"
            assert float(coef.min()) >= 0, "not a convex combination"
            alpha = coef[0] / coef.sum()  # the re-normalisation divided both by the same norm
            assert float(alpha) == pytest.approx(float(draw.alpha[b, k]), abs=1e-9)
        for k in range(S_Q):
            n_p = n[hardest[b, draw.partners[b, k]]]
            coef, residual = _coefficients(synthetic[b, S + k], q[b], n_p)
            assert float(residual) < 1e-10 and float(coef.min()) >= 0
            beta = coef[0] / coef.sum()
            assert float(beta) == pytest.approx(float(draw.beta[b, k]), abs=1e-9)


def test_synthetic_negatives_carry_no_gradient_into_the_queue_or_through_the_query() -> None:
    q = _unit(B, D, seed=5).requires_grad_(True)
    k = _unit(B, D, seed=6)
    n = _unit(K, D, seed=7).requires_grad_(True)
    draw = _draw(1)
    synthetic = mix_hard_negatives(q, n, hardest_indices(q @ n.T, N), draw)
    assert not synthetic.requires_grad

    t = 0.07
    logits = mochi_logits(q, k, n, t, draw)
    logits[:, 1 + K :].sum().backward()  # the synthetic columns only
    assert n.grad is None or not bool(n.grad.any()), "a synthetic negative sent gradient into the queue"
    # The query's gradient is that of q.h / t with every h held constant (h' = b q + (1-b) n is
    # detached in q as well): recompute it with the synthetic points as plain constants.
    q2 = q.detach().clone().requires_grad_(True)
    (torch.einsum("bd,bsd->bs", F.normalize(q2, dim=1), synthetic) / t).sum().backward()
    torch.testing.assert_close(q.grad, q2.grad)


def _reference_logits(q: Tensor, k: Tensor, n: Tensor, t: float, draw: MixingDraw) -> Tensor:
    """The paper's logits in float64, one query and one synthetic negative at a time."""
    rows = []
    for b in range(q.shape[0]):
        qb = q[b] / q[b].norm()
        kb = k[b] / k[b].norm()
        negs = [n[j] / n[j].norm() for j in range(n.shape[0])]
        sims = [float(qb @ x) for x in negs]
        order = sorted(range(len(negs)), key=lambda j: -sims[j])[: draw.num_hardest]
        row = [float(qb @ kb)] + sims
        for s in range(draw.pairs.shape[1]):
            a = float(draw.alpha[b, s])
            h = a * negs[order[draw.pairs[b, s, 0]]] + (1 - a) * negs[order[draw.pairs[b, s, 1]]]
            row.append(float(qb @ (h / h.norm())))
        for s in range(draw.partners.shape[1]):
            beta = float(draw.beta[b, s])
            h = beta * qb + (1 - beta) * negs[order[draw.partners[b, s]]]
            row.append(float(qb @ (h / h.norm())))
        rows.append([x / t for x in row])
    return torch.tensor(rows, dtype=torch.float64)


def test_logits_and_loss_equal_a_float64_computation_of_the_paper() -> None:
    g = torch.Generator().manual_seed(8)
    q, k, n = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((B, D), (B, D), (K, D)))
    draw = _draw(2)
    expected = _reference_logits(q, k, n, 0.07, draw)
    got = mochi_logits(q, k, n, 0.07, draw)
    assert got.shape == (B, 1 + K + S + S_Q)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    # The loss: -log softmax at the positive, with the same draws from the same generator.
    loss = mochi_info_nce(q, k, n, 0.07, N, S, S_Q, generator=torch.Generator().manual_seed(2))
    manual = sum(-row[0] + math.log(sum(math.exp(x) for x in row)) for row in expected.tolist()) / B
    assert float(loss) == pytest.approx(manual, rel=1e-12)
    # Synthetic negatives only add to the denominator: the loss exceeds plain InfoNCE.
    assert float(loss) > float(info_nce(q, k, n, 0.07))


def test_logits_and_query_gradient_equal_those_of_the_explicit_synthetic_points() -> None:
    """``mochi_logits`` computes q.h in closed form; with the points of ``mix_hard_negatives``
    as constant negatives the logits and the query's gradient are the same (MoCo's case: a
    queue that needs no gradient)."""
    q, k, n = _unit(B, D, seed=15), _unit(B, D, seed=16), _unit(K, D, seed=17)
    draw = _draw(4)
    q1 = q.clone().requires_grad_(True)
    got = mochi_logits(q1, k, n, 0.1, draw)
    q2 = q.clone().requires_grad_(True)
    u = F.normalize(q2, dim=1)  # as mochi_logits normalises its inputs
    points = mix_hard_negatives(u, n, hardest_indices(u @ n.T, N), draw)
    explicit = torch.cat([(u * k).sum(1, keepdim=True), u @ n.T, torch.einsum("bd,bsd->bs", u, points)], 1) / 0.1
    torch.testing.assert_close(got, explicit)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (got * weights).sum().backward()
    (explicit * weights).sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad)


def test_without_synthetic_negatives_it_is_infonce() -> None:
    q, k, n = _unit(B, D, seed=9), _unit(B, D, seed=10), _unit(K, D, seed=11)
    loss = mochi_info_nce(q, k, n, 0.2, num_hardest=N, num_mixed=0, num_query_mixed=0)
    torch.testing.assert_close(loss, info_nce(q, k, n, 0.2))


def test_float32_under_autocast_matches_float64() -> None:
    q, k, n = _unit(B, D, seed=12), _unit(B, D, seed=13), _unit(K, D, seed=14)
    draw = _draw(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mochi_logits(q.float(), k.float(), n.float(), 0.07, draw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), mochi_logits(q, k, n, 0.07, draw), rtol=1e-5, atol=1e-4)


def test_bad_sizes_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        draw_mixing(2, 1, 4, 0)
    with pytest.raises(ValueError, match=">= 0"):
        draw_mixing(2, 4, -1, 0)
    draw_mixing(2, 1, 0, 3)  # query mixing alone needs one hard negative
