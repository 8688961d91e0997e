"""Instance-discrimination losses of the first contrastive generation: InvaSpread's softmax
embedding with its ``log(1 - P)`` negative terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses._utils import full_precision
from selfsup.nn.distributed import gather_with_grad, rank


@full_precision
def invaspread_loss(f: Tensor, f_hat: Tensor, temperature: float = 0.1, gather: bool = False) -> Tensor:
    """InvaSpread's instance softmax embedding loss on two views ``(B, D)`` of ``B`` images.

    The paper (section 3.1) scores instance ``i`` for a query ``x`` by a softmax over instance
    features used as weights, ``P(i | x) = exp(f_i . f_x / T) / sum_k exp(f_k . f_x / T)``, and
    maximises, for every image ``i``, that its augmented view is recognised as ``i`` while every
    other image ``j`` is not::

        P(i | x^_i) = exp(f_i . f^_i / T) / sum_k exp(f_k . f^_i / T)          (eq. 2)
        P(i | x_j)  = exp(f_i . f_j / T)  / sum_k exp(f_k . f_j / T),  j != i   (eq. 3)
        J = - sum_i log P(i | x^_i) - sum_i sum_{j != i} log(1 - P(i | x_j))     (eq. 5)

    As in the authors' implementation, both views play both roles: the ``2B`` normalised
    embeddings ``z = [f; f^]`` are each a query ``a`` whose denominator runs over the other
    ``2B - 1`` embeddings, ``D_a = sum_{k != a} exp(z_a . z_k / T)``; the positive is ``a``'s
    other view ``p(a)`` and the negatives are the other images' ``2B - 2`` embeddings (both
    views)::

        J = -1/(2B) sum_a [ log(e^{z_a.z_p(a)/T} / D_a)
                            + sum_{k not in {a, p(a)}} log(1 - e^{z_a.z_k/T} / D_a) ]

    With ``gather`` the candidates ``k`` are the ``2N`` embeddings of every process (with
    gradient); the mean is over the ``2B`` local queries. Default ``T = 0.1`` is the paper's.

    References: Ye, Zhang, Yuen & Chang 2019, "Unsupervised Embedding Learning via Invariant
    and Spreading Instance Feature", arXiv:1904.03436.
    """
    b = f.shape[0]
    a1, a2 = F.normalize(f, dim=1), F.normalize(f_hat, dim=1)
    c1 = gather_with_grad(a1) if gather else a1
    c2 = gather_with_grad(a2) if gather else a2
    n = c1.shape[0]
    offset = rank() * b if gather else 0
    queries = torch.cat([a1, a2])
    candidates = torch.cat([c1, c2])
    logits = queries @ candidates.T / temperature  # (2B, 2N)
    local = torch.arange(b, device=f.device) + offset
    self_idx = torch.cat([local, local + n])
    pos_idx = torch.cat([local + n, local])
    rows = torch.arange(2 * b, device=f.device)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, self_idx] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # log P(k | a), k != a
    pos = log_p[rows, pos_idx]
    is_neg = ~is_self
    is_neg[rows, pos_idx] = False
    # log(1 - P) = log(-expm1(log P)); P < 1 strictly unless a single candidate holds all
    # the mass, which the clamp keeps finite.
    log_not = torch.log(-torch.expm1(log_p.clamp(max=-1e-7)))
    neg = torch.where(is_neg, log_not, torch.zeros_like(log_not)).sum(dim=1)
    return -(pos + neg).mean()
