"""CAE's two losses: reconstruction of the masked patches and latent alignment.

References: Chen, Ding, Wang, Xin, Mo, Wang, Han, Luo, Zeng & Wang, "Context Autoencoder for
Self-Supervised Representation Learning" (CAE), IJCV 2023 (arXiv:2202.03026).
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfsup.losses._utils import full_precision
from selfsup.losses.masked import masked_mse

__all__ = ["cae_alignment_loss", "cae_loss"]


@full_precision
def cae_alignment_loss(pred_latent: Tensor, target_latent: Tensor) -> Tensor:
    """MSE between predicted and target latents of the masked patches, `(B, M, D)` each.

    ``mean((pred - sg(target))^2)`` over every element: the target is the encoder's own
    representation of the masked patches and is detached here (stop-gradient), so only the
    regressor (and, through its inputs, the encoder on the visible patches) is pulled toward
    it -- the encoder is never pushed toward the prediction.

    References: Chen et al. 2022, CAE, arXiv:2202.03026 (Eq. 2, alignment loss).
    """
    if pred_latent.shape != target_latent.shape:
        raise ValueError(
            f"pred_latent and target_latent must have the same shape (B, M, D); got "
            f"{tuple(pred_latent.shape)} and {tuple(target_latent.shape)}"
        )
    return (pred_latent - target_latent.detach()).pow(2).mean()


@full_precision
def cae_loss(
    pred_patches: Tensor,
    target_patches: Tensor,
    pred_latent: Tensor,
    target_latent: Tensor,
    align_weight: float = 2.0,
    norm_pix: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """CAE's objective ``recon + align_weight * align`` on the masked patches only.

    ``recon`` is MAE's per-patch MSE of the decoder's predictions `(B, M, P)` against the
    masked patches' pixels `(B, M, P)` (with ``norm_pix`` each target patch standardised by
    its own mean and unbiased variance, as MAE's ``norm_pix_loss``); the paper predicts
    DALL-E tokens with a cross-entropy instead -- pixels need no pretrained tokenizer.
    ``align`` is :func:`cae_alignment_loss` on the latents `(B, M, D)`.

    Args:
        pred_patches: `(B, M, P)` decoder outputs for the ``M`` masked patches.
        target_patches: `(B, M, P)` the masked patches' pixels, in the same order.
        pred_latent: `(B, M, D)` the regressor's predicted latents.
        target_latent: `(B, M, D)` the encoder's latents of the masked patches (detached here).
        align_weight: weight of the alignment loss (paper: lambda = 2).
        norm_pix: standardise each target patch (MAE's norm_pix_loss).

    Returns:
        ``(total, recon, align)`` scalars.

    References: Chen et al. 2022, CAE, arXiv:2202.03026 (Eq. 3); He et al. 2021, MAE,
    arXiv:2111.06377 (norm_pix_loss).
    """
    every = torch.ones(pred_patches.shape[:2], dtype=torch.bool, device=pred_patches.device)
    recon = masked_mse(pred_patches, target_patches, every, norm_pix=norm_pix)
    align = cae_alignment_loss(pred_latent, target_latent)
    return recon + align_weight * align, recon, align
