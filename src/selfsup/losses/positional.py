"""DropPos's position-reconstruction loss: classify where each position-dropped patch belongs.

Three pieces, each a plain function over tensors:

* :func:`position_smoothing_targets` -- the `(L, L)` soft labels ("position smoothing"): row
  ``i`` is a Gaussian over the 2-D grid distance to patch ``i``, normalised to sum to 1.
* :func:`patch_similarity_weights` -- the per-patch weights of "attentive reconstruction":
  the softmax over patches of the cosine similarity between the class token and each patch
  token, gathered at the visible patches and renormalised.
* :func:`droppos_loss` -- soft cross-entropy over all ``L`` positions, averaged over the
  position-dropped patches (optionally weighted), and the top-1 position accuracy.

References: Wang, Fan, Wang, Song, Wang & Zhang, "DropPos: Pre-Training Vision Transformers
by Reconstructing Dropped Positions", NeurIPS 2023 (arXiv:2309.03576).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses._utils import full_precision

__all__ = ["droppos_loss", "patch_similarity_weights", "position_smoothing_targets"]


def position_smoothing_targets(
    grid_h: int,
    grid_w: int,
    sigma: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Return DropPos's smoothed position labels `(L, L)`, ``L = grid_h * grid_w``.

    Row ``i`` (the true position, row-major) holds ``exp(-d(i, j)^2 / sigma^2)`` over every
    position ``j``, where ``d`` is the Euclidean distance between the two cells of the patch
    grid, divided by the row's sum: each row sums to 1 and peaks at ``i``. ``sigma = 0`` gives
    the one-hot labels (the identity). The paper's form has ``sigma^2``, not ``2 sigma^2``, in
    the denominator; its reference code divides column-wise, which on a finite grid leaves
    the rows summing to slightly more or less than 1 at the borders -- here rows sum to 1.

    Args:
        grid_h: patch-grid height.
        grid_w: patch-grid width.
        sigma: width of the Gaussian in grid cells (paper: 1, decayed linearly to 0).
        device: device of the result.
        dtype: dtype of the result.

    References: Wang et al. 2023, DropPos, arXiv:2309.03576 (Section 3, position smoothing).
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    num = grid_h * grid_w
    if sigma == 0:
        return torch.eye(num, device=device, dtype=dtype)
    # float64 so that far cells underflow cleanly rather than losing the near ones.
    rows = torch.arange(num, device=device, dtype=torch.float64)
    y, x = torch.div(rows, grid_w, rounding_mode="floor"), rows % grid_w
    dist2 = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2
    weight = torch.exp(-dist2 / sigma**2)
    return (weight / weight.sum(dim=1, keepdim=True)).to(dtype)


@full_precision
def patch_similarity_weights(tokens: Tensor, keep_indices: Tensor, temperature: float = 0.1) -> Tensor:
    """Return attentive-reconstruction weights `(B, K)` of the visible patches.

    ``tokens`` `(B, 1 + L, D)` are the encoder's normed tokens of the *full* image (class
    token first); the weight of patch ``j`` is ``softmax_j(cos(cls, patch_j) / temperature)``
    over all ``L`` patches, gathered at ``keep_indices`` `(B, K)` and renormalised over the
    visible patches so each row sums to 1. Patches that look like the object (close to the
    class token) count more than ambiguous background patches, whose exact position cannot
    be told from their appearance. No gradient flows through the weights.

    References: Wang et al. 2023, DropPos, arXiv:2309.03576 (Section 3, attentive
    reconstruction; temperature 0.1 in the reference code).
    """
    if tokens.ndim != 3 or keep_indices.ndim != 2 or keep_indices.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"expected tokens (B, 1 + L, D) and keep_indices (B, K); got {tuple(tokens.shape)}, "
            f"{tuple(keep_indices.shape)}"
        )
    tokens = tokens.detach()
    sim = F.cosine_similarity(tokens[:, :1], tokens[:, 1:], dim=-1)  # (B, L)
    attn = (sim / temperature).softmax(dim=-1).gather(1, keep_indices.long())
    return attn / attn.sum(dim=-1, keepdim=True)


@full_precision
def droppos_loss(
    logits: Tensor,
    positions: Tensor,
    dropped: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """DropPos's position classification loss and the position accuracy.

    For every visible patch ``k`` of sample ``b`` the head gives ``logits[b, k]`` over all
    ``L`` absolute positions; ``positions[b, k]`` is the patch's true index on the grid. Only
    patches whose position embedding was dropped (``dropped[b, k]``) count. The loss is the
    soft cross-entropy ``-sum_j targets[positions[b, k], j] * log_softmax(logits[b, k])_j``,
    averaged over the dropped patches with weights ``dropped * weights`` (attentive
    reconstruction; ``weights=None`` weighs them equally)::

        loss = sum_{b,k} w[b,k] * CE[b,k] / sum_{b,k} w[b,k],   w = dropped * weights

    The accuracy is the plain (unweighted) fraction of dropped patches whose arg-max logit is
    the true position (chance: ``1 / L``).

    Args:
        logits: `(B, K, L)` position logits of the ``K`` visible patches.
        positions: `(B, K)` long, the true grid indices of those patches.
        dropped: `(B, K)` bool, True where the position embedding was dropped.
        targets: `(L, L)` soft labels, row = true position (:func:`position_smoothing_targets`;
            the identity for hard labels).
        weights: optional `(B, K)` non-negative weights (:func:`patch_similarity_weights`).

    Returns:
        ``(loss, accuracy)``, both scalars; the accuracy carries no gradient.

    References: Wang et al. 2023, DropPos, arXiv:2309.03576 (Eq. 2 and Section 3).
    """
    b, k, num = logits.shape
    if positions.shape != (b, k) or dropped.shape != (b, k) or targets.shape != (num, num):
        raise ValueError(
            f"expected logits (B, K, L), positions and dropped (B, K), targets (L, L); got "
            f"{tuple(logits.shape)}, {tuple(positions.shape)}, {tuple(dropped.shape)}, {tuple(targets.shape)}"
        )
    positions = positions.long()
    soft = targets.detach().to(logits.dtype)[positions]  # (B, K, L)
    ce = -(soft * logits.log_softmax(dim=-1)).sum(dim=-1)  # (B, K)
    w = dropped.to(ce.dtype)
    if weights is not None:
        w = w * weights.detach().to(ce.dtype)
    loss = (ce * w).sum() / w.sum().clamp_min(torch.finfo(ce.dtype).tiny)
    with torch.no_grad():
        hits = (logits.argmax(dim=-1) == positions) & dropped
        accuracy = hits.sum().to(ce.dtype) / dropped.sum().clamp_min(1).to(ce.dtype)
    return loss, accuracy
