"""Predictive-coding losses: CPC's InfoNCE over a grid of patch latents."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses._utils import full_precision
from selfsup.nn.distributed import gather_with_grad, rank

__all__ = ["cpc_loss"]


@full_precision
def cpc_loss(predictions: Sequence[Tensor], latents: Tensor, gather: bool = False) -> Tensor:
    """Compute CPC's InfoNCE: each predicted latent against every patch latent of the batch.

    ``latents`` ``(B, G, G', D)`` are the patch latents ``z`` of a ``G x G'`` grid (row-major,
    rows top to bottom); ``predictions[k - 1]`` ``(B, G - k, G', D)`` predicts, from the
    context of row ``i``, the latent ``k`` rows below: ``p_k[b, i, j] ~ z[b, i + k, j]``. Each
    prediction is scored by a dot product (the paper's log-bilinear ``z^T W_k c``, ``W_k``
    applied by the caller) against the latents of every patch of every image of the batch
    (of every process when ``gather`` is set, with gradient), its own target the positive and
    all others the negatives; cross-entropy, averaged over the positions of each offset ``k``
    and then over the ``K = len(predictions)`` offsets.

    References: van den Oord, Li & Vinyals, "Representation Learning with Contrastive
    Predictive Coding", 2018, arXiv:1807.03748 (eq. 4); Hénaff et al., "Data-Efficient Image
    Recognition with Contrastive Predictive Coding", ICML 2020, arXiv:1905.09272 (Section 2:
    negatives from other patches of the same and of other images).
    """
    if latents.ndim != 4 or not predictions:
        raise ValueError(f"need latents (B, G, G', D) and >= 1 prediction, got {tuple(latents.shape)}")
    b, rows, cols, d = latents.shape
    local = latents.reshape(b * rows * cols, d)
    candidates = gather_with_grad(local) if gather else local
    offset = rank() * local.shape[0] if gather else 0
    # Index of the latent at (image n, row r, column j) in the flattened local batch.
    grid = torch.arange(b * rows * cols, device=latents.device).view(b, rows, cols)
    total = latents.new_zeros(())
    for k, p in enumerate(predictions, start=1):
        if p.shape != (b, rows - k, cols, d):
            raise ValueError(f"predictions[{k - 1}] must be {(b, rows - k, cols, d)} (k={k}), got {tuple(p.shape)}")
        logits = p.reshape(-1, d) @ candidates.T  # (B (G - k) G', W B G G')
        targets = grid[:, k:, :].reshape(-1) + offset
        total = total + F.cross_entropy(logits, targets)
    return total / len(predictions)
