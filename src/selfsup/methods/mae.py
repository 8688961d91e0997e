"""MAE: a ViT encodes a random 25% of the patches; a light decoder reconstructs the rest.

References: He, Chen, Xie, Li, Dollár & Girshick, "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022 (arXiv:2111.06377).

Pseudocode::

    mask = random_mask(B, L, 0.75)                  # True = masked, exactly 75% per image
    latent = encoder(x, keep=visible(mask))         # (B, 1 + L/4, D): visible patches only
    tokens = fill(decoder_embed(latent), mask_token) + decoder_pos   # (B, 1 + L, D_dec)
    pred = decoder_pred(decoder_blocks(tokens))[:, 1:]               # (B, L, p*p*C)
    loss = mean over masked patches of ||pred - norm(patchify(x))||^2 / P   # norm_pix

Randomness: masks are drawn from the global CPU generator (``torch.rand`` on the CPU, then
moved to the input's device). The engine seeds that generator and stores its state in every
checkpoint, so a resumed run draws the same masks as an uninterrupted one, and the masks do
not depend on the accelerator.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.losses import masked_mse
from selfsup.methods.base import Batch, Method, StepInfo, check_token_backbone
from selfsup.nn.backbones.protocol import as_token_backbone
from selfsup.nn.backbones.vit import Block, sincos_pos_embed_2d
from selfsup.nn.masking import fill_masked_tokens, mask_to_keep_indices, random_mask
from selfsup.nn.patches import masked_reconstruction, patchify
from selfsup.registry import METHODS


class MAEDecoder(nn.Module):
    """MAE's decoder: visible tokens `(B, 1 + L_keep, D)` to per-patch pixels `(B, L, P)`.

    "The MAE decoder is only used during pre-training" and is "lightweight": a linear map to
    its own width, the shared learned mask token at masked positions, fixed 2-D sin-cos
    position embeddings, pre-norm transformer blocks, and a linear layer "whose number of
    output channels equals the number of pixel values in a patch".

    Args:
        embed_dim: encoder width ``D``.
        grid_size: ``(grid_h, grid_w)`` patch grid of the encoder.
        patch_dim: ``P = p * p * C`` pixel values per patch.
        decoder_embed_dim: decoder width (paper: 512).
        depth: decoder blocks (paper: 8).
        num_heads: decoder attention heads (paper: 16).
        mlp_ratio: MLP width over the decoder width.

    References: He et al. 2021, MAE, arXiv:2111.06377 (Section 3, Table 1).
    """

    def __init__(
        self,
        embed_dim: int,
        grid_size: tuple[int, int],
        patch_dim: int,
        decoder_embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        pos = sincos_pos_embed_2d(decoder_embed_dim, *grid_size)
        # Class-token slot zero, as in the encoder; not persistent: a pure function of the grid.
        self.register_buffer(
            "pos_embed", torch.cat([torch.zeros(1, decoder_embed_dim), pos]).unsqueeze(0), persistent=False
        )
        self.blocks = nn.ModuleList(Block(decoder_embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.pred = nn.Linear(decoder_embed_dim, patch_dim)
        # The reference initialisation: xavier-uniform linears with zero bias, N(0, 0.02) token.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    pos_embed: Tensor

    def forward(self, latent: Tensor, mask: Tensor) -> Tensor:
        """Decode encoder tokens `(B, 1 + L_keep, D)` (class token first, visible patches in
        ascending patch order) under ``mask`` `(B, L)` (True = masked) to `(B, L, P)`."""
        x = self.embed(latent)
        patches = fill_masked_tokens(x[:, 1:], mask, self.mask_token)
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


@METHODS.register("mae")
class MAE(Method):
    """Masked autoencoder around a ViT backbone (the evaluated encoder).

    Args:
        backbone: a ViT with the token API (``forward_tokens(x, keep_indices=...)``).
        in_channels: image channels ``C`` (filled in by the engine).
        mask_ratio: fraction of patches hidden from the encoder (paper: 0.75).
        decoder_embed_dim: decoder width (paper: 512).
        decoder_depth: decoder blocks (paper: 8).
        decoder_num_heads: decoder heads (paper: 16).
        norm_pix_loss: regress per-patch standardised pixels (paper: better features).
    """

    view_recipe = "single_view"
    requires_token_backbone = True
    lr_scaling = "linear"

    engine_facts = ("in_channels",)

    def __init__(
        self,
        backbone: nn.Module,
        in_channels: int = 3,
        mask_ratio: float = 0.75,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        check_token_backbone(backbone, "MAE")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        vit = as_token_backbone(backbone)
        self.backbone = backbone
        self.in_channels = in_channels
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(vit.patch_size)
        grid_h, grid_w = vit.grid_size
        self.decoder = MAEDecoder(
            int(vit.embed_dim),
            (grid_h, grid_w),
            self.patch_size**2 * in_channels,
            decoder_embed_dim,
            decoder_depth,
            decoder_num_heads,
        )

    def sample_mask(self, batch_size: int, device: torch.device) -> Tensor:
        """`(B, L)` bool random mask, True = masked, exactly ``round(mask_ratio * L)`` per row,
        drawn from the global CPU generator (see the module docstring)."""
        num_patches = int(as_token_backbone(self.backbone).num_patches)
        return random_mask(batch_size, num_patches, self.mask_ratio, device=device)

    def predict(self, images: Tensor, mask: Tensor) -> Tensor:
        """Encode the visible patches of `(B, C, H, W)` images under ``mask`` `(B, L)` and
        decode pixel predictions `(B, L, p*p*C)` for every patch."""
        latent = as_token_backbone(self.backbone).forward_tokens(images, keep_indices=mask_to_keep_indices(mask))
        return self.decoder(latent, mask)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        images = batch.views[0]
        mask = self.sample_mask(images.shape[0], images.device)
        pred = self.predict(images, mask)
        loss = masked_mse(pred, patchify(images, self.patch_size), mask, norm_pix=self.norm_pix_loss)
        return {"loss": loss}

    @torch.no_grad()
    def reconstruct(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(masked_input, reconstruction)``, both `(B, C, H, W)`, for visualisation
        (:func:`~selfsup.nn.patches.masked_reconstruction`: masked patches blanked / predicted,
        as in the paper's figures; with ``norm_pix_loss`` the prediction is mapped back with
        the true patch's mean and variance)."""
        if mask is None:
            mask = self.sample_mask(images.shape[0], images.device)
        return masked_reconstruction(images, self.predict(images, mask), mask, self.patch_size, self.norm_pix_loss)
