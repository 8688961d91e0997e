"""Non-contrastive losses: SimSiam's negative cosine, BYOL's regression, Barlow Twins."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses._utils import full_precision
from selfsup.nn.distributed import all_reduce_sum, world_size


@full_precision
def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """Compute ``-cos(p, stopgrad(z))`` averaged over the batch, for ``(B, D)`` inputs.

    The ``z.detach()`` inside is SimSiam's stop-gradient, the operation the paper shows is
    essential against collapse: gradients reach ``p`` (the predictor branch) only. The
    symmetric SimSiam loss is ``0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))``.

    References: Chen & He 2021, "Exploring Simple Siamese Representation Learning"
    (SimSiam), arXiv:2011.10566.
    """
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


@full_precision
def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """Compute BYOL's ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)`` averaged over ``(B, D)`` rows.

    ``z`` is the target network's projection, which carries no gradient already; it is
    detached here as well so that passing an online projection by mistake cannot leak a
    gradient into the target branch. Symmetrise by summing over the two view orders.

    References: Grill et al. 2020, "Bootstrap Your Own Latent" (BYOL), arXiv:2006.07733.
    """
    return (2.0 - 2.0 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def _batch_standardize(z: Tensor, n: int, gather: bool, eps: float) -> Tensor:
    # Biased moments as BatchNorm1d(affine=False) computes them in training mode.
    total = z.sum(dim=0)
    mean = (all_reduce_sum(total) if gather else total) / n
    centred = z - mean
    sq = (centred * centred).sum(dim=0)
    var = (all_reduce_sum(sq) if gather else sq) / n
    return centred / torch.sqrt(var + eps)


@full_precision
def barlow_twins_loss(
    z1: Tensor,
    z2: Tensor,
    lambda_offdiag: float = 5e-3,
    gather: bool = False,
    eps: float = 1e-5,
) -> Tensor:
    """Compute the Barlow Twins redundancy-reduction loss for two views ``(B, D)``.

    Each dimension is standardised over the batch (mean 0, biased variance 1, ``eps`` as
    in ``BatchNorm1d``), the cross-correlation ``C = z1n.T @ z2n / N`` is ``(D, D)``, and
    ``loss = sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2``. With ``gather``
    the batch moments and ``C`` are summed over processes (differentiably) so they are
    those of the global batch ``N = W * B``; every process then computes the same loss,
    and with DDP's gradient averaging the gradient equals the single-process one on ``N``
    samples (the convention of ``selfsup.nn.distributed``). Equal ``B`` on every process is
    assumed. The default lambda 5e-3 is the paper's.

    References: Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", arXiv:2103.03230.
    """
    n = z1.shape[0] * (world_size() if gather else 1)
    z1n = _batch_standardize(z1, n, gather, eps)
    z2n = _batch_standardize(z2, n, gather, eps)
    c = z1n.T @ z2n
    c = (all_reduce_sum(c) if gather else c) / n
    diag = torch.diagonal(c)
    on_diag = (1.0 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambda_offdiag * off_diag
