"""SimMIM: replace random patches by a mask token inside the encoder and regress their raw
pixels with a linear head and an L1 loss.

References: Xie, Zhang, Cao, Lin, Bao, Yao, Dai & Hu, "SimMIM: A Simple Framework for Masked
Image Modeling", CVPR 2022 (arXiv:2111.09886).

Pseudocode::

    mask = random_mask over (H / m) x (W / m) mask patches, ratio 0.6, upsampled to the ViT grid
    z = encoder(x, mask)                 # (B, 1 + L, D): every patch, masked ones = mask token
    pred = linear_head(z[:, 1:])         # (B, L, p*p*C) raw pixels of each patch
    loss = L1(pred, patchify(x)) over masked pixels only

Randomness: masks come from the global CPU generator, which the engine seeds and checkpoints
(exact resume), then move to the input's device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.losses import masked_l1
from selfsup.methods.base import Batch, Method, StepInfo, check_token_backbone
from selfsup.nn.backbones.protocol import as_token_backbone
from selfsup.nn.masking import random_mask
from selfsup.nn.patches import patchify
from selfsup.registry import METHODS


@METHODS.register("simmim")
class SimMIM(Method):
    """SimMIM around a ViT backbone (the evaluated encoder).

    Args:
        backbone: a ViT with the token API (``forward_tokens(x, mask=...)``); its mask token
            is created here, before the engine builds the optimiser.
        in_channels: image channels ``C`` (filled in by the engine).
        mask_ratio: fraction of mask patches replaced by the mask token (paper: 0.6).
        mask_patch_size: side in pixels of the square masked units (paper: 32 for 192 px
            images); a multiple of the ViT patch size. ``None`` masks single ViT patches.
    """

    view_recipe = "single_view"
    requires_token_backbone = True
    lr_scaling = "linear"

    engine_facts = ("in_channels",)

    def __init__(
        self, backbone: nn.Module, in_channels: int = 3, mask_ratio: float = 0.6, mask_patch_size: int | None = None
    ) -> None:
        super().__init__()
        check_token_backbone(backbone, "SimMIM")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        vit = as_token_backbone(backbone)
        patch = int(vit.patch_size)
        grid_h, grid_w = vit.grid_size
        scale = 1 if mask_patch_size is None else mask_patch_size // patch
        if mask_patch_size is not None and (mask_patch_size % patch or grid_h % scale or grid_w % scale):
            raise ValueError(
                f"mask_patch_size {mask_patch_size} must be a multiple of the patch size {patch} "
                f"that tiles the {grid_h}x{grid_w} patch grid"
            )
        self.backbone = backbone
        vit.enable_mask_token()
        self.mask_ratio = mask_ratio
        self.patch_size = patch
        self.mask_scale = scale
        # "A linear layer" predicting the p*p*C raw pixels of each patch from its token (the
        # paper's 1x1 convolution over the feature map is the same map).
        self.head = nn.Linear(int(vit.embed_dim), patch * patch * in_channels)

    def sample_mask(self, batch_size: int, device: torch.device) -> Tensor:
        """`(B, L)` bool mask on the ViT patch grid, True = masked: ``mask_ratio`` of the
        ``mask_patch_size`` units, each covering ``scale x scale`` ViT patches."""
        grid_h, grid_w = as_token_backbone(self.backbone).grid_size
        s = self.mask_scale
        coarse = random_mask(batch_size, (grid_h // s) * (grid_w // s), self.mask_ratio, device=device)
        coarse = coarse.reshape(batch_size, grid_h // s, grid_w // s)
        fine = coarse.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
        return fine.reshape(batch_size, grid_h * grid_w)

    def predict(self, images: Tensor, mask: Tensor) -> Tensor:
        """Pixel predictions `(B, L, p*p*C)` for `(B, C, H, W)` images under ``mask`` `(B, L)`."""
        tokens = as_token_backbone(self.backbone).forward_tokens(images, mask=mask)
        return self.head(tokens[:, 1:])

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        images = batch.views[0]
        mask = self.sample_mask(images.shape[0], images.device)
        loss = masked_l1(self.predict(images, mask), patchify(images, self.patch_size), mask)
        return {"loss": loss}
