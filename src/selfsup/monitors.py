"""Cheap per-batch monitors of representation collapse."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["effective_rank", "feature_std", "feature_std_tensor"]


def _check_batch(z: Tensor) -> None:
    """Raise ValueError unless ``z`` is ``(B, D)`` with ``B >= 2``."""
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"z must be (B, D) with B >= 2, got {tuple(z.shape)}")


@torch.no_grad()
def feature_std(z: Tensor) -> float:
    """Return the per-dimension std over the batch of L2-normalised features, averaged.

    About ``1 / sqrt(D)`` for features spread over the sphere; 0 when every sample maps to
    the same direction (complete collapse).

    Args:
        z: ``(B, D)`` features, ``B >= 2``.

    References: Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021
    (arXiv:2011.10566), Section 4.1 / Figure 2.
    """
    return float(feature_std_tensor(z))


@torch.no_grad()
def feature_std_tensor(z: Tensor) -> Tensor:
    """:func:`feature_std` as a detached 0-dim float32 tensor on ``z``'s device.

    For a method's step outputs (monitors are scalar tensors there): no host sync in the
    forward, and ``float()`` of it is exactly ``feature_std(z)``.
    """
    _check_batch(z)
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def effective_rank(z: Tensor, eps: float = 1e-7) -> float:
    """Return RankMe, ``exp`` of the entropy of the L1-normalised singular values of ``z``.

    ``p_k = sigma_k / sum(sigma) + eps``; ``exp(-sum p_k log p_k)`` lies in ``[1, min(B, D)]``:
    close to ``D`` for isotropic features (with ``B >> D``), 1 for rank-1 (collapsed)
    features. Computed in float64; ``z`` is used as is (not centred), as in the paper.

    Args:
        z: ``(B, D)`` features, ``B >= 2``.
        eps: the paper's smoothing constant.

    References: Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the Downstream
    Performance of Pretrained Self-Supervised Representations by Their Rank", ICML 2023
    (arXiv:2210.02885), Eq. 1.
    """
    _check_batch(z)
    sigma = torch.linalg.svdvals(z.detach().to(torch.float64))
    total = sigma.sum()
    if total <= 0:
        # All-zero features: no direction at all; report the minimum rank rather than NaN.
        return 1.0
    p = sigma / total + eps
    return float(torch.exp(-(p * p.log()).sum()))
