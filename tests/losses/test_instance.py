"""InvaSpread's softmax embedding loss against the paper's formulas written out in float64."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selfsup.losses import invaspread_loss


def ref_invaspread(f: torch.Tensor, f_hat: torch.Tensor, t: float) -> float:
    """Eq. 2, 3 and 5 of Ye et al. 2019 with both views as queries (the authors' code): for each
    of the 2B embeddings ``a``, ``D_a = sum_{k != a} exp(z_a.z_k/T)``, the positive probability
    ``exp(z_a.z_p/T)/D_a`` and, for every other image's embedding ``k``, ``1 - exp(z_a.z_k/T)/D_a``."""
    z = torch.cat([F.normalize(f.double(), dim=1), F.normalize(f_hat.double(), dim=1)]).tolist()
    b = f.shape[0]
    total = 0.0
    for a in range(2 * b):
        p = (a + b) % (2 * b)
        sims = [math.exp(sum(x * y for x, y in zip(z[a], z[k])) / t) for k in range(2 * b)]
        d = sum(s for k, s in enumerate(sims) if k != a)
        total += math.log(sims[p] / d)
        total += sum(math.log(1 - sims[k] / d) for k in range(2 * b) if k not in (a, p))
    return -total / (2 * b)


def test_invaspread_loss_matches_the_papers_formula() -> None:
    g = torch.Generator().manual_seed(0)
    f, f_hat = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (0.1, 0.5):
        got = invaspread_loss(f.double(), f_hat.double(), temperature=t)
        assert math.isclose(float(got), ref_invaspread(f, f_hat, t), rel_tol=1e-9)
    # float32 and unnormalised inputs: the loss normalises them itself
    assert math.isclose(float(invaspread_loss(3 * f, f_hat)), ref_invaspread(f, f_hat, 0.1), rel_tol=1e-5)


def test_invaspread_loss_gradients_are_exact_and_aligned_views_score_lower() -> None:
    g = torch.Generator().manual_seed(1)
    f = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    f_hat = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: invaspread_loss(a, b, temperature=0.5), (f, f_hat))
    spread = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    noisy = spread + 0.5 * torch.randn(8, 16, generator=g)
    assert invaspread_loss(spread, spread) < invaspread_loss(spread, noisy) < invaspread_loss(spread, noisy.roll(1, 0))
