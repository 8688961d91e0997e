"""Convert images to sequences of flattened patches and back.

The layout matches the MAE reference code, so reconstruction targets computed here line up
with what a ViT patch embedding sees: patches are taken row-major over the grid, and each
patch is flattened in ``(p, p, C)`` order (row within the patch, column, then channel).

References: He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners",
arXiv:2111.06377.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["masked_reconstruction", "patchify", "unpatchify"]


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Split images `(B, C, H, W)` into flattened patches `(B, L, P)`.

    ``L = (H / p) * (W / p)`` patches are ordered row-major over the patch grid and each
    patch is flattened in ``(p, p, C)`` order, so ``P = p * p * C``.

    Args:
        images: `(B, C, H, W)` batch; H and W must be divisible by ``patch_size``.
        patch_size: side ``p`` of the square patches.

    Returns:
        `(B, L, P)` patches (a copy; the input is not aliased).

    Raises:
        ValueError: if the input is not 4-D or H or W is not divisible by ``patch_size``.

    References: He et al. 2021, MAE, arXiv:2111.06377.
    """
    if images.dim() != 4:
        raise ValueError(f"patchify expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"image size {h}x{w} is not divisible by patch size {patch_size}; "
            "crop or resize the images to a multiple of the patch size"
        )
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(
    patches: Tensor,
    patch_size: int,
    channels: int,
    height: int | None = None,
    width: int | None = None,
) -> Tensor:
    """Reassemble flattened patches `(B, L, P)` into images `(B, C, H, W)`.

    Exact inverse of :func:`patchify`. When neither ``height`` nor ``width`` is given the
    grid is assumed square; when one is given the other is derived from ``L``.

    Args:
        patches: `(B, L, P)` with ``P = patch_size ** 2 * channels``.
        patch_size: side ``p`` of the square patches.
        channels: number of image channels ``C``.
        height: image height ``H`` in pixels (a multiple of ``patch_size``), optional.
        width: image width ``W`` in pixels (a multiple of ``patch_size``), optional.

    Returns:
        `(B, C, H, W)` images.

    Raises:
        ValueError: if the shapes are inconsistent with the requested image size.

    References: He et al. 2021, MAE, arXiv:2111.06377.
    """
    if patches.dim() != 3:
        raise ValueError(f"unpatchify expects (B, L, P) patches, got shape {tuple(patches.shape)}")
    b, num_patches, dim = patches.shape
    if dim != patch_size * patch_size * channels:
        raise ValueError(
            f"patch dimension {dim} != patch_size**2 * channels = "
            f"{patch_size}**2 * {channels} = {patch_size * patch_size * channels}"
        )
    for name, size in (("height", height), ("width", width)):
        if size is not None and size % patch_size:
            raise ValueError(f"{name} {size} is not divisible by patch size {patch_size}")
    if height is None and width is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches do not form a square grid; pass height and width")
        gh = gw = side
    elif height is not None and width is not None:
        gh, gw = height // patch_size, width // patch_size
    elif height is not None:
        gh = height // patch_size
        gw = num_patches // gh if gh else 0
    else:
        assert width is not None
        gw = width // patch_size
        gh = num_patches // gw if gw else 0
    if gh * gw != num_patches or gh == 0:
        raise ValueError(
            f"{num_patches} patches do not fit a {gh}x{gw} grid "
            f"(height={height}, width={width}, patch_size={patch_size})"
        )
    x = patches.reshape(b, gh, gw, patch_size, patch_size, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return x.reshape(b, channels, gh * patch_size, gw * patch_size)


def masked_reconstruction(
    images: Tensor, pred: Tensor, mask: Tensor, patch_size: int, norm_pix: bool
) -> tuple[Tensor, Tensor]:
    """``(masked_input, reconstruction)``, both `(B, C, H, W)`: a masked-image model's figure.

    ``masked_input`` is ``images`` with the masked patches set to 0 (the normalised mean);
    ``reconstruction`` shows the prediction on masked patches and the input on visible ones,
    as in MAE's figures. With ``norm_pix`` the prediction lives in per-patch standardised
    units and is mapped back with the true patch's mean and variance, so the figure shows
    structure, not recovered brightness.

    Args:
        images: `(B, C, H, W)` input.
        pred: `(B, L, p*p*C)` pixel predictions of every patch (only the masked ones are shown).
        mask: `(B, L)` bool, True = masked.
        patch_size: side ``p`` of the square patches.
        norm_pix: ``pred`` regresses per-patch standardised pixels.

    References: He et al. 2021, MAE, arXiv:2111.06377, fig. 2 and sec. 4 ("normalized pixels").
    """
    b, c, h, w = images.shape
    target = patchify(images, patch_size)
    pred = pred.to(target.dtype)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        pred = pred * std + mean
    m = mask.unsqueeze(-1)
    masked_input = unpatchify(target.masked_fill(m, 0.0), patch_size, c, h, w)
    reconstruction = unpatchify(torch.where(m, pred, target), patch_size, c, h, w)
    return masked_input, reconstruction
