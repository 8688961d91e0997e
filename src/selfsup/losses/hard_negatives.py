"""MoCHi: hard negative mixing, synthetic negatives appended to a queue-based InfoNCE.

For each query ``q`` the queue's negatives are sorted by similarity ``q . n`` and the ``N``
hardest kept; from them MoCHi synthesises ``s`` negatives mixing random pairs of hard
negatives and ``s'`` more mixing the query itself with a hard negative, all re-normalised and
detached (no gradient reaches the queue, nor the query through a synthetic point; the query
still gets the gradient of its own dot products with them, as with any negative)::

    h_k  = normalize(a_k n_i + (1 - a_k) n_j),      n_i, n_j in the N hardest, a_k ~ U(0, 1)
    h'_k = normalize(b_k q + (1 - b_k) n_j),        n_j in the N hardest,      b_k ~ U(0, 0.5)
    logits = [q.k+, q.n_1 .. q.n_K, q.h_1 .. q.h_s, q.h'_1 .. q.h'_s'] / tau,   label 0

``b < 0.5`` keeps the query's share below the negative's, so ``h'`` stays a negative. The two
negatives of a pair are distinct positions among the ``N`` hardest (a pair of one negative
with itself would synthesise nothing new).

The random choices are drawn by ``draw_mixing`` (with an optional ``torch.Generator``) and
passed in, so every mixing is reproducible and testable with explicit random tensors.

References: Kalantidis, Sariyildiz, Pion, Weinzaepfel & Larlus, "Hard Negative Mixing for
Contrastive Learning", NeurIPS 2020 (arXiv:2010.01028), Section 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses._utils import full_precision


@dataclass(frozen=True)
class MixingDraw:
    """The random choices of one hard negative mixing for a batch of ``B`` queries.

    Attributes:
        num_hardest: ``N``, how many of the hardest negatives the positions index.
        pairs: ``(B, s, 2)`` int64 positions (0 = hardest) of the two hard negatives of each
            of the ``s`` mixed negatives; the two positions of a pair differ.
        alpha: ``(B, s)`` weight of the first negative of each pair, in ``[0, 1)``.
        partners: ``(B, s')`` int64 position of the hard negative mixed with the query.
        beta: ``(B, s')`` weight of the query, in ``[0, 0.5)``.
    """

    num_hardest: int
    pairs: Tensor
    alpha: Tensor
    partners: Tensor
    beta: Tensor

    @property
    def num_synthetic(self) -> int:
        """``s + s'``: synthetic negatives per query."""
        return int(self.pairs.shape[1] + self.partners.shape[1])


def draw_mixing(
    batch_size: int,
    num_hardest: int,
    num_mixed: int,
    num_query_mixed: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> MixingDraw:
    """Draws MoCHi's random pairs and coefficients for ``batch_size`` queries.

    ``num_hardest`` is ``N``, ``num_mixed`` is ``s`` (pairs of hard negatives, ``a ~ U(0, 1)``),
    ``num_query_mixed`` is ``s'`` (query with a hard negative, ``b ~ U(0, 0.5)``). Positions
    are uniform among the ``N`` hardest; the second of a pair is uniform among the other
    ``N - 1``. The generator, if given, must live on ``device``.

    References: Kalantidis et al. 2020, MoCHi, arXiv:2010.01028, Section 4.1.
    """
    if num_mixed < 0 or num_query_mixed < 0:
        raise ValueError(f"numbers of synthetic negatives must be >= 0, got s={num_mixed}, s'={num_query_mixed}")
    if num_hardest < (2 if num_mixed else 1):
        raise ValueError(f"mixing pairs of hard negatives needs N >= 2 hardest negatives, got N={num_hardest}")
    b = batch_size
    first = torch.randint(num_hardest, (b, num_mixed), generator=generator, device=device)
    # An offset in [1, N) makes the second position differ from the first, uniformly.
    offset = torch.randint(1, max(2, num_hardest), (b, num_mixed), generator=generator, device=device)
    pairs = torch.stack([first, (first + offset) % num_hardest], dim=-1)
    alpha = torch.rand(b, num_mixed, generator=generator, device=device)
    partners = torch.randint(num_hardest, (b, num_query_mixed), generator=generator, device=device)
    beta = 0.5 * torch.rand(b, num_query_mixed, generator=generator, device=device)
    return MixingDraw(num_hardest, pairs, alpha, partners, beta)


@torch.no_grad()
def hardest_indices(similarity: Tensor, num_hardest: int) -> Tensor:
    """Rows of the ``N`` most similar negatives per query, hardest first: ``(B, K) -> (B, N)``.

    References: Kalantidis et al. 2020, MoCHi, arXiv:2010.01028, Section 4.1.
    """
    if not 0 < num_hardest <= similarity.shape[1]:
        raise ValueError(f"N={num_hardest} hardest negatives must be in [1, {similarity.shape[1]}] (the queue size)")
    return similarity.detach().topk(num_hardest, dim=1).indices


def _rows(negatives: Tensor, index: Tensor) -> Tensor:
    """``negatives (K, D)`` at ``index (B, m)`` -> ``(B, m, D)`` (index_select: a plain copy)."""
    return negatives.index_select(0, index.reshape(-1)).view(*index.shape, negatives.shape[1])


@torch.no_grad()
def mix_hard_negatives(query: Tensor, negatives: Tensor, hardest: Tensor, draw: MixingDraw) -> Tensor:
    """Synthesises MoCHi's ``s + s'`` negatives per query, unit-norm and detached.

    Shapes:
        ``query (B, D)`` and ``negatives (K, D)`` unit vectors, ``hardest (B, N)`` queue rows
        (``hardest_indices``) -> ``(B, s + s', D)``: the ``s`` mixed pairs, then the ``s'``
        query mixes.

    Only the chosen rows are gathered (``(B, s + s', D)``, never ``(B, N, D)``), so the cost
    is independent of ``N``.

    The points themselves, as the paper defines them; ``mochi_logits`` computes their logits
    in closed form without building them (the tests check that both agree).

    References: Kalantidis et al. 2020, MoCHi, arXiv:2010.01028, Section 4.1.
    """
    q = query.detach()
    n = negatives.detach()

    def rows(positions: Tensor) -> Tensor:  # (B, m) positions among the hardest -> (B, m, D)
        return _rows(n, hardest.gather(1, positions))

    a = draw.alpha.to(q.dtype).unsqueeze(-1)
    mixed = F.normalize(torch.lerp(rows(draw.pairs[..., 1]), rows(draw.pairs[..., 0]), a), dim=-1)
    b = draw.beta.to(q.dtype).unsqueeze(-1)
    query_mixed = F.normalize(torch.lerp(rows(draw.partners), q.unsqueeze(1), b), dim=-1)
    return torch.cat([mixed, query_mixed], dim=1)


@full_precision
def mochi_logits(query: Tensor, key: Tensor, negatives: Tensor, temperature: float, draw: MixingDraw) -> Tensor:
    """InfoNCE logits with MoCHi's synthetic negatives appended: ``(B, 1 + K + s + s')``.

    ``query (B, D)``, ``key (B, D)`` (positives, logit 0) and ``negatives (K, D)`` (the queue)
    are L2-normalised here; ``draw.num_hardest`` negatives are selected per query. Gradients
    flow into ``query`` (and ``key`` if it requires grad) through the dot products only: the
    synthetic points are constants, as if built by ``mix_hard_negatives``.

    The synthetic logits are computed without building the ``(B, s + s', D)`` points: with
    unit vectors, ``q.h = (a q.n_i + (1-a) q.n_j) / |a n_i + (1-a) n_j|`` where the norm is
    ``sqrt(a^2 + (1-a)^2 + 2a(1-a) n_i.n_j)``, and ``q.h' = (b q.q + (1-b) q.n_j) /
    sqrt(b^2 + (1-b)^2 + 2b(1-b) q.n_j)``; the dot products with the queue are the queue's
    logits already computed, and only ``n_i.n_j`` needs the pairs' rows.

    References: Kalantidis et al. 2020, MoCHi, arXiv:2010.01028, Section 4.
    """
    q = F.normalize(query, dim=1)
    k = F.normalize(key, dim=1)
    n = F.normalize(negatives, dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ n.T
    # The queue's logits with gradient into the query only (a synthetic point is a constant).
    sim = neg if not neg.requires_grad or not n.requires_grad else q @ n.detach().T
    hardest = hardest_indices(neg, draw.num_hardest)
    rows_i, rows_j = hardest.gather(1, draw.pairs[..., 0]), hardest.gather(1, draw.pairs[..., 1])
    rows_p = hardest.gather(1, draw.partners)
    a, b = draw.alpha.to(q.dtype), draw.beta.to(q.dtype)
    with torch.no_grad():
        nd = n.detach()
        dot_ij = (_rows(nd, rows_i) * _rows(nd, rows_j)).sum(-1)  # (B, s)
        norm_pair = (a * a + (1 - a) ** 2 + 2 * a * (1 - a) * dot_ij).clamp_min(1e-12).sqrt()
        qn_p = sim.detach().gather(1, rows_p)  # (B, s')
        norm_query = (b * b + (1 - b) ** 2 + 2 * b * (1 - b) * qn_p).clamp_min(1e-12).sqrt()
    mixed = (a * sim.gather(1, rows_i) + (1 - a) * sim.gather(1, rows_j)) / norm_pair
    qq = (q * q.detach()).sum(dim=1, keepdim=True)  # = 1, with the gradient of q . (constant q)
    query_mixed = (b * qq + (1 - b) * sim.gather(1, rows_p)) / norm_query
    return torch.cat([pos, neg, mixed, query_mixed], dim=1) / temperature


def mochi_info_nce(
    query: Tensor,
    key: Tensor,
    negatives: Tensor,
    temperature: float,
    num_hardest: int = 1024,
    num_mixed: int = 1024,
    num_query_mixed: int = 256,
    generator: torch.Generator | None = None,
) -> Tensor:
    """MoCo's InfoNCE (``selfsup.losses.info_nce`` with a queue) plus MoCHi's hard negatives.

    ``query (B, D)``, ``key (B, D)``, ``negatives (K, D)``; returns the mean over the ``B``
    queries of the cross-entropy of ``mochi_logits`` with label 0. Defaults
    ``(N, s, s') = (1024, 1024, 256)`` are of the order of the paper's ImageNet settings at
    ``K = 65536`` (its tables ablate several triples); scale them with the queue.

    References: Kalantidis et al. 2020, MoCHi, arXiv:2010.01028, Section 4.
    """
    draw = draw_mixing(query.shape[0], num_hardest, num_mixed, num_query_mixed, query.device, generator)
    logits = mochi_logits(query, key, negatives, temperature, draw)
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long, device=query.device))
