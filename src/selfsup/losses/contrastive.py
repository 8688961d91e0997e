"""Contrastive losses: InfoNCE (CPC, MoCo), MoCo v3's symmetrised form, NT-Xent (SimCLR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses._utils import full_precision
from selfsup.nn.distributed import gather_with_grad, rank


@full_precision
def info_nce(
    query: Tensor,
    key: Tensor,
    negatives: Tensor | None = None,
    temperature: float = 0.07,
    gather: bool = False,
) -> Tensor:
    """Compute the InfoNCE loss of queries ``(B, D)`` against their positive keys ``(B, D)``.

    All vectors are L2-normalised. With ``negatives (M, D)`` (MoCo's queue) each query is
    scored against its own key (the positive, logit index 0) and the ``M`` negatives:
    ``logits = [q.k+, q.n_1, ..., q.n_M] / temperature``, cross-entropy with label 0.
    Without negatives (in-batch, MoCo v3) the logits are ``q @ k_all.T / temperature``
    where ``k_all`` holds the keys of every process when ``gather`` is set (with gradient,
    see ``selfsup.nn.distributed``), and query ``i`` of rank ``r`` has label ``r * B + i``;
    ``gather`` is ignored when ``negatives`` are given (a queue is already global).
    Gradients flow into ``key`` if it requires grad; MoCo's keys come from the momentum
    encoder and carry none. Returns the mean over the ``B`` local queries. The default
    temperature 0.07 is MoCo's.

    References: van den Oord et al. 2018, "Representation Learning with Contrastive
    Predictive Coding", arXiv:1807.03748; He et al. 2020, "Momentum Contrast",
    arXiv:1911.05722.
    """
    q = F.normalize(query, dim=1)
    k = F.normalize(key, dim=1)
    if negatives is not None:
        n = F.normalize(negatives, dim=1)
        pos = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([pos, q @ n.T], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)
    k_all = gather_with_grad(k) if gather else k
    offset = rank() * q.shape[0] if gather else 0
    logits = q @ k_all.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels)


def moco_v3_loss(
    q1: Tensor,
    q2: Tensor,
    k1: Tensor,
    k2: Tensor,
    temperature: float = 0.2,
    gather: bool = False,
) -> Tensor:
    """Compute MoCo v3's symmetrised in-batch loss ``ctr(q1, k2) + ctr(q2, k1)`` on ``(B, D)``.

    ``ctr`` is ``info_nce`` without a queue (keys of every process when ``gather``),
    multiplied by ``2 * temperature`` as in the paper's pseudocode, which makes the
    gradient scale insensitive to the temperature. Queries ``q*`` come from the
    predictor, keys ``k*`` from the momentum encoder. Default temperature 0.2 is the
    paper's ViT setting.

    References: Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
    Transformers" (MoCo v3), arXiv:2104.02057.
    """
    scale = 2.0 * temperature
    return scale * (
        info_nce(q1, k2, temperature=temperature, gather=gather)
        + info_nce(q2, k1, temperature=temperature, gather=gather)
    )


@full_precision
def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5, gather: bool = False) -> Tensor:
    """Compute SimCLR's NT-Xent loss for two views ``(B, D)`` of the same ``B`` samples.

    Each of the ``2B`` local anchors (rows of ``z1`` then ``z2``) is contrasted, by
    temperature-scaled cosine similarity, with its other view (the positive) against every
    other embedding of both views except itself: ``2B - 2`` negatives locally, ``2N - 2``
    with ``gather`` over a global batch of ``N = W * B``. Returns the mean over the ``2B``
    local anchors (so the mean over ranks is the global mean over ``2N`` anchors). The
    default temperature 0.5 is the paper's CIFAR-10 setting.

    References: Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations" (SimCLR), arXiv:2002.05709.
    """
    b = z1.shape[0]
    a1 = F.normalize(z1, dim=1)
    a2 = F.normalize(z2, dim=1)
    c1 = gather_with_grad(a1) if gather else a1
    c2 = gather_with_grad(a2) if gather else a2
    n = c1.shape[0]
    offset = rank() * b if gather else 0

    anchors = torch.cat([a1, a2], dim=0)
    candidates = torch.cat([c1, c2], dim=0)
    logits = anchors @ candidates.T / temperature

    local = torch.arange(b, device=z1.device) + offset
    self_idx = torch.cat([local, local + n])
    pos_idx = torch.cat([local + n, local])
    rows = torch.arange(2 * b, device=z1.device)
    # An anchor's similarity with itself is always the largest and carries no signal.
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, self_idx] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    return F.cross_entropy(logits, pos_idx)
