"""The class-rebalanced multinomial cross-entropy of Colorful Image Colorization.

References:
    Zhang, Isola & Efros, "Colorful Image Colorization", ECCV 2016 (arXiv:1603.08511), Eq. 2
    and Section 2.2.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rebalanced_soft_cross_entropy"]


def rebalanced_soft_cross_entropy(
    logits: Tensor, target_index: Tensor, target_weight: Tensor, weights: Tensor
) -> Tensor:
    """``L = -mean_{b,h,w} v(Z_bhw) sum_q Z_bhwq log softmax(logits)_bhwq`` with ``v(Z) =
    weights[argmax_q Z]``: each position's soft cross-entropy, scaled by the rebalancing weight
    of its target's most likely bin (the paper sums over positions; the mean keeps the lr
    independent of the output resolution).

    The soft targets ``Z`` come as their non-zero entries (``soft_encode_ab_sparse``), so the
    ``(B, Q, H, W)`` target is never materialised.

    Args:
        logits: ``(B, Q, H, W)`` predicted bin scores.
        target_index: ``(B, H, W, K)`` int64 bins holding the target mass, the most likely first.
        target_weight: ``(B, H, W, K)`` their probabilities (summing to 1 over ``K``).
        weights: ``(Q,)`` class-rebalancing weights ``w`` (``rebalancing_weights``).

    Returns:
        scalar loss, computed in float32 (also under autocast).
    """
    if logits.ndim != 4 or target_index.shape != target_weight.shape or weights.shape != (logits.shape[1],):
        raise ValueError(
            f"rebalanced_soft_cross_entropy expects logits (B, Q, H, W), target index and weight (B, H, W, K) "
            f"and weights (Q,), got {tuple(logits.shape)}, {tuple(target_index.shape)}, "
            f"{tuple(target_weight.shape)}, {tuple(weights.shape)}"
        )
    with torch.autocast(logits.device.type, enabled=False):
        log_p = torch.log_softmax(logits.float().permute(0, 2, 3, 1), dim=-1)
        per_position = -(target_weight.float() * log_p.gather(-1, target_index)).sum(dim=-1)
        return (weights.float()[target_index[..., 0]] * per_position).mean()
