"""CAE: a latent regressor predicts the masked patches' representations from the visible ones.

References: Chen, Ding, Wang, Xin, Mo, Wang, Han, Luo, Zeng & Wang, "Context Autoencoder for
Self-Supervised Representation Learning" (CAE), IJCV 2023 (arXiv:2202.03026).

Pseudocode::

    mask = block_mask(B, grid, 0.5)                     # True = masked, ~50% (98 of 196)
    z_v = encoder(x, keep=visible(mask))[:, 1:]         # (B, N_v, D): visible patches only
    with no_grad: z_m = encoder(x, keep=masked(mask))[:, 1:]   # target latents (B, N_m, D)
    q = mask_token                                      # queries at the masked positions
    for block in regressor:                             # cross-attention, Section 3.1
        q = block(query=q + pos_m, keys=[z_v, q] + [pos_v, pos_m], values=[z_v, q])
    pred = decoder(q + pos_m)                           # (B, N_m, p*p*C) pixels
    loss = mse(pred, norm(patches_m)) + 2 * mse(q, sg(z_m))

Departures from the paper: the decoder predicts each masked patch's pixels (standardised per
patch, MAE's ``norm_pix_loss``) instead of the DALL-E tokenizer's 8192-way tokens, so no
pretrained tokenizer is needed; the target latents come from the encoder itself under
``no_grad`` (the reference keeps a copy of the encoder that it overwrites with the encoder's
weights every step, which is the same thing); the decoder's self-attention blocks carry no
layer scale (the regressor's cross-attention blocks do, initialised at 0.1 as in the paper).

Randomness: masks are drawn from the global CPU generator, which the engine seeds and saves in
every checkpoint (see ``methods/mae.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.losses import cae_loss
from selfsup.methods.base import Batch, Method, StepInfo, check_token_backbone
from selfsup.nn.backbones.protocol import as_token_backbone
from selfsup.nn.backbones.vit import Block, Mlp, sincos_pos_embed_2d
from selfsup.nn.masking import block_mask, mask_to_keep_indices
from selfsup.nn.patches import masked_reconstruction, patchify
from selfsup.registry import METHODS


class CrossAttention(nn.Module):
    """Multi-head attention of queries `(B, N_q, D)` over keys and values `(B, N_k, D)`.

    The key projection has no bias: a bias on the keys adds the same ``q . b`` to every
    logit of a query, which the softmax cancels (CAE's reference leaves it at zero too).

    References: Vaswani et al. 2017, arXiv:1706.03762; Chen et al. 2022, CAE, arXiv:2202.03026.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder_embed_dim {dim} is not divisible by decoder_num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Return `(B, N_q, D)`."""
        b, n, d = query.shape
        out = F.scaled_dot_product_attention(
            self._heads(self.q(query)), self._heads(self.k(key)), self._heads(self.v(value))
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class RegressorBlock(nn.Module):
    """One block of CAE's latent contextual regressor, queries `(B, N_m, D)`.

    ``q' = q + g1 * CA(LN_q(q + pos_q), LN_k(kv + pos_kv), LN_v(kv))``, then
    ``LN(q')`` and ``+ g2 * MLP``: the queries attend to the visible latents *and* to
    themselves (``kv = [z_visible, q]``), as in the paper's Figure 2; only the queries are
    updated, so the visible latents stay in the encoder's space. ``g1, g2`` are layer-scale
    vectors initialised at 0.1 (the paper's setting).

    References: Chen et al. 2022, CAE, arXiv:2202.03026 (Section 3.1, Figure 2).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layer_scale: float = 0.1) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(dim, eps=1e-6)
        self.norm_v = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, q: Tensor, pos_q: Tensor, context: Tensor, pos_context: Tensor) -> Tensor:
        """Update queries `(B, N_m, D)` from ``context`` `(B, N_v, D)` (visible latents)."""
        kv = torch.cat([context, q], dim=1)
        pos_kv = torch.cat([pos_context, pos_q], dim=1)
        x = q + self.gamma1 * self.attn(self.norm_q(q + pos_q), self.norm_k(kv + pos_kv), self.norm_v(kv))
        x = self.norm2(x)
        return x + self.gamma2 * self.mlp(x)


@METHODS.register("cae")
class CAE(Method):
    """Context autoencoder around a ViT backbone (the evaluated encoder).

    Args:
        backbone: a ViT with the token API (``forward_tokens(x, keep_indices=...)``).
        in_channels: image channels ``C`` (filled in by the engine).
        mask_ratio: fraction of patches masked blockwise (paper: 98 of 196 = 0.5).
        mask_min_block: smallest masking block in patches (BEiT/CAE: 16 on a 14x14 grid;
            smaller grids want a smaller block).
        decoder_embed_dim: width of regressor and decoder (paper: the encoder's, 768 for
            ViT-B); another width adds a linear map + LayerNorm from the encoder, as the
            reference code does.
        regressor_depth: cross-attention blocks of the latent regressor (paper: 4).
        decoder_depth: self-attention blocks of the decoder (paper: 4).
        decoder_num_heads: heads of regressor and decoder (paper: 12).
        align_weight: weight lambda of the alignment loss (paper: 2).
        layer_scale: initial layer scale of the regressor blocks (paper: 0.1).
        norm_pix_loss: regress per-patch standardised pixels (MAE's choice).
    """

    view_recipe = "single_view"
    requires_token_backbone = True
    lr_scaling = "linear"

    engine_facts = ("in_channels",)

    def __init__(
        self,
        backbone: nn.Module,
        in_channels: int = 3,
        mask_ratio: float = 0.5,
        mask_min_block: int = 16,
        decoder_embed_dim: int = 768,
        regressor_depth: int = 4,
        decoder_depth: int = 4,
        decoder_num_heads: int = 12,
        align_weight: float = 2.0,
        layer_scale: float = 0.1,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        check_token_backbone(backbone, "CAE")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if regressor_depth < 1:
            raise ValueError(f"regressor_depth must be >= 1, got {regressor_depth}")
        vit = as_token_backbone(backbone)
        self.backbone = backbone
        self.in_channels = in_channels
        self.mask_ratio = mask_ratio
        self.mask_min_block = mask_min_block
        self.align_weight = align_weight
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(vit.patch_size)
        self.grid_size = (int(vit.grid_size[0]), int(vit.grid_size[1]))
        embed_dim, dim = int(vit.embed_dim), decoder_embed_dim
        # The reference maps encoder latents to the regressor's width only when they differ.
        self.to_regressor: nn.Module = (
            nn.Identity() if dim == embed_dim else nn.Sequential(nn.Linear(embed_dim, dim), nn.LayerNorm(dim, eps=1e-6))
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.regressor = nn.ModuleList(
            RegressorBlock(dim, decoder_num_heads, layer_scale=layer_scale) for _ in range(regressor_depth)
        )
        self.regressor_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder = nn.ModuleList(Block(dim, decoder_num_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, self.patch_size**2 * in_channels)
        # Fixed 2-D sin-cos positions of regressor and decoder; not persistent (a function of the grid).
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, *self.grid_size).unsqueeze(0), persistent=False)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("backbone"):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    pos_embed: Tensor

    def sample_mask(self, batch_size: int, device: torch.device) -> Tensor:
        """`(B, L)` bool blockwise mask, True = masked, exactly ``round(mask_ratio * L)`` per row
        (BEiT's blocks topped up to the exact count so every row has as many visible patches)."""
        grid_h, grid_w = self.grid_size
        return block_mask(
            batch_size, grid_h, grid_w, self.mask_ratio, min_block=self.mask_min_block, exact=True, device=device
        )

    def _positions(self, indices: Tensor) -> Tensor:
        """Regressor/decoder position embeddings `(B, N, D_dec)` of patch ``indices`` `(B, N)`."""
        pos = self.pos_embed.expand(indices.shape[0], -1, -1)
        return pos.gather(1, indices.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))

    def forward_latents(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run CAE on `(B, C, H, W)` under ``mask`` `(B, L)` (True = masked).

        Returns ``(pred_patches, pred_latent, target_latent)``: `(B, M, p*p*C)` pixel
        predictions and `(B, M, D_dec)` predicted and target latents of the ``M`` masked
        patches, in ascending patch order; the target carries no gradient.
        """
        vit = as_token_backbone(self.backbone)
        visible_idx = mask_to_keep_indices(mask)  # (B, N_v)
        masked_idx = mask_to_keep_indices(~mask)  # (B, M)
        z_visible = self.to_regressor(vit.forward_tokens(images, keep_indices=visible_idx)[:, 1:])
        with torch.no_grad():
            # The paper's stop-gradient: the encoder sees the masked patches (with the class
            # token, as in the reference) and its latents become fixed regression targets.
            z_target = self.to_regressor(vit.forward_tokens(images, keep_indices=masked_idx)[:, 1:])
        pos_v, pos_m = self._positions(visible_idx).to(z_visible.dtype), self._positions(masked_idx).to(z_visible.dtype)
        q = self.mask_token.to(z_visible.dtype).expand(mask.shape[0], masked_idx.shape[1], -1)
        for block in self.regressor:
            q = block(q, pos_m, z_visible, pos_v)
        pred_latent = self.regressor_norm(q)
        x = pred_latent + pos_m
        for blk in self.decoder:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x)), pred_latent, z_target.detach()

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        images = batch.views[0]
        mask = self.sample_mask(images.shape[0], images.device)
        pred, pred_latent, target_latent = self.forward_latents(images, mask)
        patches = patchify(images, self.patch_size)
        masked_idx = mask_to_keep_indices(~mask)
        target = patches.gather(1, masked_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        total, recon, align = cae_loss(
            pred, target, pred_latent, target_latent, align_weight=self.align_weight, norm_pix=self.norm_pix_loss
        )
        return {"loss": total, "recon_loss": recon.detach(), "align_loss": align.detach()}

    @torch.no_grad()
    def reconstruct(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(masked_input, reconstruction)``, both `(B, C, H, W)`, for visualisation
        (:func:`~selfsup.nn.patches.masked_reconstruction`, as ``MAE.reconstruct``: masked
        patches blanked / predicted, the prediction mapped back with the true patch's mean and
        variance when ``norm_pix_loss``)."""
        if mask is None:
            mask = self.sample_mask(images.shape[0], images.device)
        target = patchify(images, self.patch_size)
        pred = self.forward_latents(images, mask)[0].to(target.dtype)  # masked patches only
        masked_idx = mask_to_keep_indices(~mask).unsqueeze(-1).expand(-1, -1, target.shape[-1])
        pred = target.scatter(1, masked_idx, pred)  # every patch, as masked_reconstruction wants
        return masked_reconstruction(images, pred, mask, self.patch_size, self.norm_pix_loss)
