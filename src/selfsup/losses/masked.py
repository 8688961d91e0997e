"""Masked-image-modelling reconstruction losses (MAE, SimMIM) on patchified tensors."""

from __future__ import annotations

from torch import Tensor

from selfsup.losses._utils import full_precision


def _check(pred: Tensor, target: Tensor, mask: Tensor) -> None:
    if pred.shape != target.shape or pred.ndim != 3 or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"expected pred, target (B, L, P) and mask (B, L); got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}, {tuple(mask.shape)}"
        )


@full_precision
def masked_mse(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = False, eps: float = 1e-6) -> Tensor:
    """Compute MAE's reconstruction MSE over masked patches of ``(B, L, P)`` patch tensors.

    ``mask (B, L)`` is boolean with ``True = masked``; only masked patches count, so the
    prediction on visible patches has no effect. With ``norm_pix`` every target patch is
    standardised by its own mean and variance, ``(t - mean) / sqrt(var + eps)``, with the
    unbiased variance (``Tensor.var``'s default) as the MAE reference implementation does.
    Per-patch MSE (mean over ``P``), then the mean over masked patches; 0 when no patch is
    masked.

    References: He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners" (MAE),
    arXiv:2111.06377.
    """
    _check(pred, target, mask)
    target = target.detach()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


@full_precision
def masked_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Compute SimMIM's mean absolute error over the pixels of masked patches, ``(B, L, P)``.

    ``mask (B, L)`` is boolean with ``True = masked``; the sum of ``|pred - target|`` over
    masked patches is divided by the number of masked pixel values (masked patches times
    ``P``, which includes channels, as SimMIM divides by ``in_chans``). 0 when no patch is
    masked.

    References: Xie et al. 2021, "SimMIM: A Simple Framework for Masked Image Modeling",
    arXiv:2111.09886.
    """
    _check(pred, target, mask)
    per_patch = (pred - target.detach()).abs().sum(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / (m.sum() * pred.shape[-1]).clamp_min(1.0)
