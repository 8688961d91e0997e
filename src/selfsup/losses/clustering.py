"""Clustering losses: SwAV's swapped prediction of Sinkhorn codes, DeepCluster v2's k-means targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from selfsup.losses._utils import full_precision


@full_precision
def swav_loss(scores: Sequence[Tensor], codes: Sequence[Tensor], temperature: float = 0.1) -> Tensor:
    """Compute SwAV's swapped-prediction loss from per-view scores and codes, each ``(B, K)``.

    ``scores[v]`` are view ``v``'s prototype similarities; ``codes[i]`` are the (Sinkhorn)
    codes of view ``i`` for the first ``len(codes)`` views (SwAV computes codes on the two
    global crops only). Every code view ``i`` predicts every other view ``v != i``:
    ``-sum_k codes_i[b, k] * log_softmax(scores_v[b] / temperature)_k``, averaged over the
    batch and then over the ``len(codes) * (len(scores) - 1)`` terms. Codes are targets
    and are detached. Default temperature 0.1 is the paper's.

    References: Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting
    Cluster Assignments" (SwAV), arXiv:2006.09882.
    """
    if not codes or len(codes) > len(scores) or len(scores) < 2:
        raise ValueError(
            f"need 1 <= len(codes) <= len(scores) and len(scores) >= 2, got {len(codes)} codes and {len(scores)} scores"
        )
    log_probs = [torch.log_softmax(s / temperature, dim=1) for s in scores]
    total = scores[0].new_zeros(())
    terms = 0
    for i, q in enumerate(codes):
        q = q.detach()
        for v, log_p in enumerate(log_probs):
            if v == i:
                continue
            total = total - (q * log_p).sum(dim=1).mean()
            terms += 1
    return total / terms


@full_precision
def deepcluster_loss(scores: Sequence[Tensor], assignments: Tensor, temperature: float = 0.1) -> Tensor:
    """Compute DeepCluster v2's loss: each view's prototype scores against its image's cluster.

    ``scores[h]`` are the scores ``(V, B, K_h)`` of the ``V`` views of ``B`` images against
    head ``h``'s ``K_h`` (unit-norm) prototypes; ``assignments`` ``(H, B)`` holds each image's
    cluster in each head (from the last k-means pass). The loss is the cross-entropy of
    ``softmax(scores[h] / temperature)`` with the cluster, averaged over views and images,
    then over the ``H`` heads. Default temperature 0.1 is the paper's.

    References: Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting
    Cluster Assignments" (SwAV; DeepCluster v2 in its Section 4 / Appendix), arXiv:2006.09882;
    Caron et al. 2018, "Deep Clustering for Unsupervised Learning of Visual Features",
    arXiv:1807.05520.
    """
    if len(scores) != assignments.shape[0] or not scores:
        raise ValueError(f"need one (V, B, K) score tensor per head: {len(scores)} for {assignments.shape[0]} heads")
    total = scores[0].new_zeros(())
    for head, s in enumerate(scores):
        v, b, k = s.shape
        targets = assignments[head].expand(v, b).reshape(-1)
        total = total + torch.nn.functional.cross_entropy(s.reshape(v * b, k) / temperature, targets)
    return total / len(scores)
