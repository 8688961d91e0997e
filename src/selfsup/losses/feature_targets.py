"""Masked prediction of feature targets: MaskFeat's HOG regression and data2vec's layer-averaged
teacher targets with their smooth L1 regression.

The targets themselves come from elsewhere (MaskFeat's HOG from ``selfsup.eval.hog``, data2vec's
block outputs from the EMA teacher run by the method); these functions only normalise, average
and compare tensors, so they are checked against plain float64 formulas in the tests.

References: Wei, Fan, Xie, Wu, Yuille & Feichtenhofer, "Masked Feature Prediction for
Self-Supervised Visual Pre-Training", CVPR 2022 (arXiv:2112.09133); Baevski, Hsu, Xu, Babu, Gu
& Auli, "data2vec: A General Framework for Self-supervised Learning in Speech, Vision and
Language", ICML 2022 (arXiv:2202.03555).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses._utils import full_precision

__all__ = ["data2vec_loss", "data2vec_targets", "maskfeat_loss"]


def _check(pred: Tensor, target: Tensor, mask: Tensor) -> None:
    if pred.shape != target.shape or pred.ndim != 3 or mask.shape != pred.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"expected pred, target (B, L, D) and a bool mask (B, L); got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}, {mask.dtype} {tuple(mask.shape)}"
        )


@full_precision
def maskfeat_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MaskFeat's objective: mean squared error between predicted and target features of the
    masked patches only.

    ``pred`` and ``target`` are `(B, L, D)` per-patch features (MaskFeat: the HOG histograms of
    each patch), ``mask`` `(B, L)` bool with True = masked. The squared error is averaged over
    ``D`` per patch, then over the masked patches of the whole batch (masks with different
    counts per sample, as block masking gives, weigh every masked patch equally); 0 when nothing
    is masked. The target is detached: it is a fixed, hand-made feature.

    References: Wei et al. 2021, MaskFeat, arXiv:2112.09133 (Section 3: the loss is computed on
    masked patches only).
    """
    _check(pred, target, mask)
    per_patch = (pred - target.detach()).pow(2).mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


@full_precision
def data2vec_targets(block_outputs: Sequence[Tensor], layer_norm_targets: bool = False, eps: float = 1e-5) -> Tensor:
    """data2vec's regression targets: the average of the teacher's top-K block outputs, each
    instance-normalised over the tokens first.

    ``y = 1/K sum_l IN(a_l)`` with ``IN(a)[b, t, d] = (a[b, t, d] - mu[b, d]) / sqrt(var[b, d]
    + eps)``, the mean ``mu`` and biased variance ``var`` taken over the ``L`` tokens of each
    sample and channel (``F.instance_norm`` on `(B, D, L)`, no learned parameters): normalised
    targets keep the teacher from collapsing to a constant representation across positions
    (Section 3.3), and no single block dominates the average. With ``layer_norm_targets`` the
    average is further normalised over ``D`` per token without parameters, as the released
    ViT-B configuration does.

    Args:
        block_outputs: ``K`` tensors `(B, L, D)`, the outputs of the teacher's last ``K``
            blocks (any order: the average is symmetric).
        layer_norm_targets: parameter-less layer norm of the averaged targets.
        eps: added to the variances, as ``F.instance_norm`` / ``F.layer_norm`` (1e-5).

    Returns:
        `(B, L, D)` detached targets, float32 (float64 for float64 input).

    References: Baevski et al. 2022, data2vec, arXiv:2202.03555 (Section 3.3, "Training
    targets").
    """
    if len(block_outputs) == 0:
        raise ValueError("data2vec_targets needs at least one block output (top_k_blocks >= 1)")
    shape = block_outputs[0].shape
    if len(shape) != 3 or any(y.shape != shape for y in block_outputs):
        raise ValueError(f"block outputs must all be (B, L, D); got {[tuple(y.shape) for y in block_outputs]}")
    total = torch.zeros_like(block_outputs[0])
    for y in block_outputs:
        # (B, L, D) -> (B, D, L): instance norm normalises each channel over the tokens.
        total = total + F.instance_norm(y.detach().transpose(1, 2), eps=eps).transpose(1, 2)
    target = total / len(block_outputs)
    if layer_norm_targets:
        target = F.layer_norm(target, target.shape[-1:], eps=eps)
    return target


@full_precision
def data2vec_loss(pred: Tensor, target: Tensor, mask: Tensor, beta: float = 2.0, scale: float | None = None) -> Tensor:
    """data2vec's regression loss: smooth L1 between student predictions and teacher targets at
    the masked positions.

    Per masked token ``t``: ``scale * sum_d s(pred[t, d] - target[t, d])`` with the smooth L1
    ``s(x) = x^2 / (2 beta)`` if ``|x| < beta`` else ``|x| - beta / 2``, then the mean over the
    masked tokens of the batch (0 when nothing is masked). ``beta = 0`` is the plain squared
    error ``x^2`` summed over ``D`` (the reference code's ``beta == 0`` branch).

    Args:
        pred: `(B, L, D)` student regression-head outputs.
        target: `(B, L, D)` teacher targets (:func:`data2vec_targets`), detached here.
        mask: `(B, L)` bool, True = masked (only those positions count).
        beta: smooth L1 transition point (the released ViT-B vision configuration: 2).
        scale: multiplier of the per-token sum; ``None`` is ``1 / sqrt(D)`` as in the
            reference implementation, which keeps the loss scale independent of the width.

    References: Baevski et al. 2022, data2vec, arXiv:2202.03555 (Section 3.3, "Objective").
    """
    _check(pred, target, mask)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta == 0:
        per_value = (pred - target.detach()).pow(2)
    else:
        per_value = F.smooth_l1_loss(pred, target.detach(), reduction="none", beta=beta)
    factor = 1.0 / math.sqrt(pred.shape[-1]) if scale is None else scale
    per_token = per_value.sum(dim=-1) * factor
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)
