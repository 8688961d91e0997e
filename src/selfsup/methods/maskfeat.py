"""MaskFeat: replace blocks of patches by a mask token inside the encoder and regress the
Histograms of Oriented Gradients (HOG) of the masked patches with a linear head.

References: Wei, Fan, Xie, Wu, Yuille & Feichtenhofer, "Masked Feature Prediction for
Self-Supervised Visual Pre-Training", CVPR 2022 (arXiv:2112.09133).

Pseudocode::

    mask = block_mask over the ViT patch grid, ratio 0.4     # BEiT's blockwise masking
    z = encoder(x, mask)                 # (B, 1 + L, D): masked patches = mask token
    pred = linear_head(z[:, 1:])         # (B, L, C * (p / c)^2 * 9)
    target = hog_per_patch(x)            # 9-bin histograms of the (p / c)^2 c-px cells of
                                         # each p-px patch and channel, L2-normed per patch
    loss = MSE(pred, target) over masked patches only

HOG target (Sections 3-4 of the paper): gradients on the whole image, 9 unsigned orientation
bins, histograms over 8x8-pixel cells, L2-normalised within each 16x16 ViT patch (2x2 cells,
36 values), the RGB channels' histograms concatenated (108-d per patch). Here the HOG is the
library's scikit-image-equivalent ``selfsup.eval.hog`` (hard binning, no Gaussian spatial
window) with one L2-normalised, non-overlapping block per patch. Small images: a patch of
``p`` pixels holds cells of ``cell_size`` pixels (default ``p // 2``, keeping the paper's 2x2
cells per patch: 2 px cells in a 4 px Fashion-MNIST patch, 36 values per channel);
``cell_size = p`` gives one 9-bin histogram per patch.

Randomness: masks come from the global CPU generator, which the engine seeds and checkpoints
(exact resume), then move to the input's device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.eval.hog import hog
from selfsup.losses import maskfeat_loss
from selfsup.methods.base import Batch, Method, StepInfo, check_token_backbone
from selfsup.nn.backbones.protocol import as_token_backbone
from selfsup.nn.masking import block_mask
from selfsup.registry import METHODS

__all__ = ["MaskFeat", "hog_patch_targets"]


@torch.no_grad()
def hog_patch_targets(images: Tensor, patch_size: int, cell_size: int, orientations: int = 9) -> Tensor:
    """MaskFeat's HOG target of every patch: `(B, C, H, W)` -> `(B, L, C * (p / c)^2 * n)`.

    Per channel, :func:`selfsup.eval.hog.hog` with ``pixels_per_cell = cell_size`` and one
    block per patch (``cells_per_block = p / c``, L2 norm): its blocks slide by one cell, so
    the blocks aligned with the patch grid are every ``p / c``-th one in each direction. Values
    are ordered ``(channel, cell_row, cell_col, orientation)`` within a patch, patches
    row-major as ``patchify``. Gradients see the whole image (patch borders included), as the
    paper computes HOG on the image before splitting it.
    """
    b, c, h, w = images.shape
    if patch_size % cell_size or h % patch_size or w % patch_size:
        raise ValueError(
            f"HOG cells of {cell_size} px must tile the {patch_size} px patches of the {h}x{w} images; "
            f"set method.hog_cell_size to a divisor of {patch_size}"
        )
    per_patch = patch_size // cell_size
    grid_h, grid_w = h // patch_size, w // patch_size
    # Channels as separate images: the paper concatenates the RGB channels' histograms.
    feats = hog(
        images.reshape(b * c, 1, h, w),
        orientations=orientations,
        pixels_per_cell=cell_size,
        cells_per_block=per_patch,
        block_norm="L2",
    )
    blocks_h, blocks_w = h // cell_size - per_patch + 1, w // cell_size - per_patch + 1
    feats = feats.reshape(b, c, blocks_h, blocks_w, per_patch**2 * orientations)
    feats = feats[:, :, ::per_patch, ::per_patch]  # (B, C, grid_h, grid_w, per_patch^2 * n)
    return feats.permute(0, 2, 3, 1, 4).reshape(b, grid_h * grid_w, -1)


@METHODS.register("maskfeat")
class MaskFeat(Method):
    """MaskFeat around a ViT backbone (the evaluated encoder).

    Args:
        backbone: a ViT with the token API (``forward_tokens(x, mask=...)``); its mask token
            is created here, before the engine builds the optimiser.
        in_channels: image channels ``C`` (filled in by the engine).
        mask_ratio: target fraction of blockwise-masked patches (paper, ViT: 40%).
        min_mask_block: smallest masked block in patches (BEiT/MaskFeat: 16 of a 14x14 grid,
            ~8% of it; 4 suits a 7x7 grid).
        hog_cell_size: HOG cell side in pixels, a divisor of the patch size (paper: 8 px cells
            in 16 px patches; ``None`` = half the patch size, the paper's 2x2 cells per patch).
        orientations: HOG orientation bins over 0-180 degrees (paper: 9).
    """

    view_recipe = "single_view"
    requires_token_backbone = True
    lr_scaling = "linear"

    engine_facts = ("in_channels",)

    def __init__(
        self,
        backbone: nn.Module,
        in_channels: int = 3,
        mask_ratio: float = 0.4,
        min_mask_block: int = 4,
        hog_cell_size: int | None = None,
        orientations: int = 9,
    ) -> None:
        super().__init__()
        check_token_backbone(backbone, "MaskFeat")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        vit = as_token_backbone(backbone)
        patch = int(vit.patch_size)
        cell = max(1, patch // 2) if hog_cell_size is None else hog_cell_size
        if cell < 1 or patch % cell:
            raise ValueError(f"hog_cell_size must divide the patch size {patch}, got {hog_cell_size}")
        if orientations < 1:
            raise ValueError(f"orientations must be >= 1, got {orientations}")
        self.backbone = backbone
        vit.enable_mask_token()
        self.mask_ratio = mask_ratio
        self.min_mask_block = min_mask_block
        self.patch_size = patch
        self.hog_cell_size = cell
        self.orientations = orientations
        target_dim = in_channels * (patch // cell) ** 2 * orientations
        # The paper's linear prediction head, from each patch's output token to its HOG.
        self.head = nn.Linear(int(vit.embed_dim), target_dim)

    def sample_mask(self, batch_size: int, device: torch.device) -> Tensor:
        """`(B, L)` bool blockwise mask, True = masked, about ``mask_ratio`` of the patches."""
        grid_h, grid_w = as_token_backbone(self.backbone).grid_size
        return block_mask(batch_size, grid_h, grid_w, self.mask_ratio, min_block=self.min_mask_block, device=device)

    def targets(self, images: Tensor) -> Tensor:
        """HOG targets `(B, L, C * (p / c)^2 * orientations)` of `(B, C, H, W)` images."""
        return hog_patch_targets(images, self.patch_size, self.hog_cell_size, self.orientations)

    def predict(self, images: Tensor, mask: Tensor) -> Tensor:
        """HOG predictions `(B, L, target_dim)` for `(B, C, H, W)` images under ``mask`` `(B, L)`."""
        tokens = as_token_backbone(self.backbone).forward_tokens(images, mask=mask)
        return self.head(tokens[:, 1:])

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        images = batch.views[0]
        mask = self.sample_mask(images.shape[0], images.device)
        loss = maskfeat_loss(self.predict(images, mask), self.targets(images), mask)
        return {"loss": loss}
