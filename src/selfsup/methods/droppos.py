"""DropPos: drop the position embeddings of visible patches and classify where they belong.

References: Wang, Fan, Wang, Song, Wang & Zhang, "DropPos: Pre-Training Vision Transformers
by Reconstructing Dropped Positions", NeurIPS 2023 (arXiv:2309.03576).

Pseudocode::

    mask = random_mask(B, L, 0.75)               # True = masked: 25% of the patches stay
    keep = visible(mask)                         # (B, K) true grid indices of the visible patches
    dropped = random_mask(B, K, 0.75)            # their position embeddings are dropped ...
    pos = where(dropped, mask_pos_token, pos_embed[keep])   # ... replaced by a learned token
    z = encoder([cls + pos_cls, patch_embed(x)[keep] + pos])    # (B, 1 + K, D)
    logits = decoder(z)[:, 1:]                   # (B, K, L): no position embedding in the decoder
    targets = gaussian(grid distance, sigma)     # (L, L) rows sum to 1; sigma: 1 -> 0 linearly
    w = softmax(cos(cls, patch) / 0.1)[keep]     # attentive reconstruction (full image, no grad)
    loss = sum(dropped * w * CE(logits, targets[keep])) / sum(dropped * w)

The class token keeps its (zero) position embedding. Departures from the paper: ``sigma``
decays linearly with the step, where the reference steps it once per epoch; the logged
``position_acc`` is the plain top-1 accuracy over the position-dropped patches (the reference
weights it like the loss).

Randomness: both masks are drawn from the global CPU generator, which the engine seeds and
saves in every checkpoint (see ``methods/mae.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from selfsup.losses import droppos_loss, patch_similarity_weights, position_smoothing_targets
from selfsup.methods.base import Batch, Method, StepInfo, check_token_backbone
from selfsup.nn.backbones.protocol import as_token_backbone
from selfsup.nn.backbones.vit import Block, VisionTransformer
from selfsup.nn.masking import mask_to_keep_indices, random_mask
from selfsup.registry import METHODS

# The ViT parts DropPos builds its own forward from (the token API adds positions itself).
_VIT_PARTS = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")


@dataclass(frozen=True)
class LinearDecay:
    """``start * (1 - step / total_steps)``: DropPos's smoothing sigma, from ``start`` to 0."""

    start: float

    def __call__(self, step: int, total_steps: int, epoch: float) -> float:
        return self.start * max(0.0, 1.0 - step / max(1, total_steps))


@METHODS.register("droppos")
class DropPos(Method):
    """Position reconstruction around a ViT backbone (the evaluated encoder).

    Args:
        backbone: a ViT exposing ``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks`` and
            ``norm`` (``VisionTransformer``).
        mask_ratio: fraction of patches hidden from the encoder (paper: 0.75).
        position_mask_ratio: fraction of the visible patches whose position embedding is
            dropped (paper: gamma_pos = 0.75).
        decoder_embed_dim: decoder width (paper: 512).
        decoder_depth: decoder blocks (paper: 2).
        decoder_num_heads: decoder heads (paper: 16).
        smoothing_sigma: initial sigma of position smoothing in grid cells (paper: 1).
        sigma_decay: decay sigma linearly to 0 over training (paper: yes); else keep it.
        attentive: weigh the loss by patch similarity to the class token (paper: yes).
        attentive_temperature: softmax temperature of those weights (reference: 0.1).
    """

    view_recipe = "single_view"
    requires_token_backbone = True
    lr_scaling = "linear"

    def __init__(
        self,
        backbone: nn.Module,
        mask_ratio: float = 0.75,
        position_mask_ratio: float = 0.75,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 2,
        decoder_num_heads: int = 16,
        smoothing_sigma: float = 1.0,
        sigma_decay: bool = True,
        attentive: bool = True,
        attentive_temperature: float = 0.1,
    ) -> None:
        super().__init__()
        check_token_backbone(backbone, "DropPos")
        missing = [name for name in _VIT_PARTS if not hasattr(backbone, name)]
        if missing:
            raise TypeError(f"DropPos needs the selfsup VisionTransformer (vit_tiny, ...); backbone lacks {missing}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if not 0.0 < position_mask_ratio <= 1.0:
            raise ValueError(f"position_mask_ratio must be in (0, 1], got {position_mask_ratio}")
        if smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be >= 0, got {smoothing_sigma}")
        vit = as_token_backbone(backbone)
        self.backbone = backbone
        self.mask_ratio = mask_ratio
        self.position_mask_ratio = position_mask_ratio
        self.smoothing_sigma = smoothing_sigma
        self.sigma_decay = sigma_decay
        self.attentive = attentive
        self.attentive_temperature = attentive_temperature
        self.grid_size = (int(vit.grid_size[0]), int(vit.grid_size[1]))
        self.num_patches = int(vit.num_patches)
        embed_dim = int(vit.embed_dim)
        num_visible = self.num_patches - round(mask_ratio * self.num_patches)
        if num_visible < 1 or round(position_mask_ratio * num_visible) < 1:
            raise ValueError(
                f"mask_ratio {mask_ratio} and position_mask_ratio {position_mask_ratio} drop no position "
                f"among {self.num_patches} patches; lower mask_ratio or raise position_mask_ratio"
            )
        # The learned token that stands in for a dropped position embedding.
        self.mask_pos_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        # One logit per absolute position of the training grid.
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.num_patches)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("backbone"):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_pos_token, std=0.02)

    def schedules(self) -> dict[str, LinearDecay]:
        return {"position_sigma": LinearDecay(self.smoothing_sigma)} if self.sigma_decay else {}

    def sigma_at(self, step: StepInfo) -> float:
        """The smoothing sigma of this step (constant when ``sigma_decay`` is off)."""
        return step["position_sigma"] if self.sigma_decay else self.smoothing_sigma

    def sample_masks(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Return ``(keep, dropped)``: `(B, K)` long grid indices of the visible patches
        (ascending) and `(B, K)` bool, True where that patch's position embedding is dropped
        (exactly ``round(position_mask_ratio * K)`` per row)."""
        mask = random_mask(batch_size, self.num_patches, self.mask_ratio, device=device)
        keep = mask_to_keep_indices(mask)
        dropped = random_mask(batch_size, keep.shape[1], self.position_mask_ratio, device=device)
        return keep, dropped

    def encode(self, images: Tensor, keep: Tensor, dropped: Tensor) -> Tensor:
        """Encoder tokens `(B, 1 + K, D)` of the visible patches ``keep`` `(B, K)` of `(B, C, H, W)`
        images, the ``dropped`` ones carrying ``mask_pos_token`` instead of their position."""
        vit = cast(VisionTransformer, self.backbone)
        tokens = vit.patch_embed(images)  # (B, L, D)
        b, num, dim = tokens.shape
        if num != self.num_patches:
            raise ValueError(
                f"DropPos classifies positions on the training grid of {self.num_patches} patches; "
                f"these images give {num} (resize them to the backbone's image_size)"
            )
        pos_embed = vit.pos_embed.to(tokens.dtype)  # (1, 1 + L, D)
        index = keep.unsqueeze(-1).expand(-1, -1, dim)
        tokens = tokens.gather(1, index)
        pos = pos_embed[:, 1:].expand(b, -1, -1).gather(1, index)
        pos = torch.where(dropped.unsqueeze(-1), self.mask_pos_token.to(pos.dtype), pos)
        cls = (vit.cls_token + pos_embed[:, :1]).to(tokens.dtype).expand(b, -1, -1)
        x = torch.cat([cls, tokens + pos], dim=1)
        for block in vit.blocks:
            x = block(x)
        return vit.norm(x)

    def predict(self, images: Tensor, keep: Tensor, dropped: Tensor) -> Tensor:
        """Position logits `(B, K, L)` of every visible patch (the loss reads the dropped ones)."""
        x = self.decoder_embed(self.encode(images, keep, dropped))
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        images = batch.views[0]
        keep, dropped = self.sample_masks(images.shape[0], images.device)
        logits = self.predict(images, keep, dropped)
        targets = position_smoothing_targets(*self.grid_size, self.sigma_at(step), device=images.device)
        weights = None
        if self.attentive:
            with torch.no_grad():
                full = as_token_backbone(self.backbone).forward_tokens(images)
            weights = patch_similarity_weights(full, keep, self.attentive_temperature)
        # The labels are the visible patches' true grid indices: ``keep`` itself.
        loss, accuracy = droppos_loss(logits, keep, dropped, targets, weights)
        return {"loss": loss, "position_acc": accuracy}
