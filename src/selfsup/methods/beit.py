"""BEiT (and BEiT v2) stage 2: masked image modelling that predicts a frozen tokenizer's codes.

References: Bao, Dong, Piao & Wei, "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022
(arXiv:2106.08254), Section 2; Peng, Dong, Bao, Ye & Wei, "BEiT v2: Masked Image Modeling with
Vector-Quantized Visual Tokenizers", arXiv:2208.06366 (the same objective on VQ-KD codes).

Pseudocode::

    ids = tokenizer.tokenize(x)                  # (B, L) code ids, frozen tokenizer, no grad
    mask = block_mask(B, grid, ratio 0.4)        # blockwise masking: 75 of 196 patches in BEiT
    h = vit(x, mask)[:, 1:]                      # masked patches replaced by the mask token
    logits = head(h[mask])                       # (M, K): a linear softmax classifier
    loss = cross_entropy(logits, ids[mask])      # masked positions only

The tokenizer is an earlier run (``method.tokenizer: runs/<vq_tokenizer or vqkd_tokenizer
run>``), loaded frozen by the engine from its ``backbone.safetensors``: a ``vq_tokenizer`` run
gives BEiT (pixel VQ-VAE tokens), a ``vqkd_tokenizer`` run BEiT v2 (teacher-distilled tokens;
BEiT v2's extra class-token "patch aggregation" head is not part of this method). Its patch
grid must be the ViT's: the same patch size on the same images.

Randomness: masks come from the global CPU generator, which the engine seeds and checkpoints
(exact resume). Every image gets exactly ``round(mask_ratio * L)`` masked patches: the blocks
of BEiT's algorithm, topped up with single random patches when they fall short (on small grids
the last block often cannot fit), so the loss' denominator is the same for every batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.methods.base import Batch, Method, StepInfo, check_token_backbone
from selfsup.nn.backbones.protocol import as_token_backbone
from selfsup.nn.masking import block_mask
from selfsup.nn.patches import patchify, unpatchify
from selfsup.registry import METHODS

#: BEiT's blockwise masking on its 14 x 14 grid: blocks of at least 16 patches, aspect 0.3-1/0.3.
BEIT_MIN_BLOCK, BEIT_GRID_PATCHES = 16, 196


def masked_token_loss(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """BEiT's objective: mean cross-entropy of the masked positions' code predictions.

    Args:
        logits: `(B, L, K)` or `(M, K)` scores over the codebook (all patches or the masked ones).
        ids: `(B, L)` the tokenizer's code ids.
        mask: `(B, L)` bool, True = masked.
    """
    target = ids[mask]
    if logits.dim() == 3:
        logits = logits[mask]
    return F.cross_entropy(logits.float(), target)


@METHODS.register("beit")
class BEiT(Method):
    """BEiT around a ViT backbone (the evaluated encoder).

    Args:
        backbone: a ViT with the token API; its mask token is created here.
        tokenizer: the frozen tokenizer of an earlier ``vq_tokenizer`` / ``vqkd_tokenizer``
            run (the config gives ``{run: runs/<name>}``).
        codebook_size: the codebook size the head predicts; ``None`` takes the tokenizer's
            (set it to have a run fail early on a tokenizer of another size).
        mask_ratio: fraction of masked patches (paper: 75 of 196, about 0.4).
        min_block: smallest masked block in patches (paper: 16 on 14 x 14; default scales it to
            the grid, at least 1).
        min_aspect: smallest block aspect ratio (paper: 0.3; the largest is its inverse).
    """

    view_recipe = "single_view"
    requires_token_backbone = True
    frozen_models = ("tokenizer",)
    reconstruction_titles = ("masked", "decoded prediction")

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: nn.Module | dict[str, str] | str | None = None,
        codebook_size: int | None = None,
        mask_ratio: float = 0.4,
        min_block: int | None = None,
        min_aspect: float = 0.3,
    ) -> None:
        super().__init__()
        check_token_backbone(backbone, "BEiT")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if not isinstance(tokenizer, nn.Module):  # the engine turns a run folder into the module
            raise ValueError(
                f"beit needs method.tokenizer (got {tokenizer!r}): the folder of a finished vq_tokenizer or "
                "vqkd_tokenizer run (e.g. method.tokenizer=runs/vq_tokenizer-fashion-mnist-...)"
            )
        vit = as_token_backbone(backbone)
        where = f"the tokenizer run at {getattr(tokenizer, 'loaded_from', None) or '<given module>'}"
        if not callable(getattr(tokenizer, "tokenize", None)) or not hasattr(tokenizer, "codebook_size"):
            raise ValueError(
                f"{where} holds a {type(tokenizer).__name__}, not a tokenizer; give method.tokenizer the folder "
                "of a vq_tokenizer or vqkd_tokenizer run"
            )
        tok: Any = tokenizer
        if int(tok.patch_size) != int(vit.patch_size) or tuple(tok.grid_size) != tuple(vit.grid_size):
            raise ValueError(
                f"{where} tokenizes {tok.patch_size} px patches on a "
                f"{tok.grid_size[0]}x{tok.grid_size[1]} grid, the ViT has {vit.patch_size} px patches on "
                f"{vit.grid_size[0]}x{vit.grid_size[1]}; train the tokenizer with the ViT's patch size and images"
            )
        if codebook_size is not None and codebook_size != int(tok.codebook_size):
            raise ValueError(
                f"method.codebook_size={codebook_size} but {where} has {tok.codebook_size} codes; "
                "drop method.codebook_size or give a tokenizer with that many codes"
            )
        self.backbone = backbone
        vit.enable_mask_token()
        self.tokenizer = tokenizer.requires_grad_(False).eval()
        self.mask_ratio = mask_ratio
        num_patches = int(vit.num_patches)
        self.min_block = min_block or max(1, round(BEIT_MIN_BLOCK * num_patches / BEIT_GRID_PATCHES))
        self.min_aspect = min_aspect
        self.codebook_size = int(tok.codebook_size)
        # "A softmax classifier" over the codebook on each masked position's final hidden vector.
        self.head = nn.Linear(int(vit.embed_dim), self.codebook_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def sample_mask(self, batch_size: int, device: torch.device) -> Tensor:
        """`(B, L)` bool blockwise mask, True = masked, ``round(mask_ratio * L)`` per row."""
        grid_h, grid_w = as_token_backbone(self.backbone).grid_size
        return block_mask(
            batch_size,
            grid_h,
            grid_w,
            self.mask_ratio,
            min_block=self.min_block,
            min_aspect=self.min_aspect,
            exact=True,
            device=device,
        )

    @torch.no_grad()
    def targets(self, images: Tensor) -> Tensor:
        """The frozen tokenizer's code ids `(B, L)` of `(B, C, H, W)` images."""
        ids: Tensor = self.tokenizer.tokenize(images)  # type: ignore[operator]
        return ids

    def logits(self, images: Tensor, mask: Tensor) -> Tensor:
        """Codebook scores `(B, L, K)` of every patch of `(B, C, H, W)` images under ``mask``."""
        tokens = as_token_backbone(self.backbone).forward_tokens(images, mask=mask)[:, 1:]
        return self.head(tokens)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        images = batch.views[0]
        mask = self.sample_mask(images.shape[0], images.device)
        ids = self.targets(images)
        tokens = as_token_backbone(self.backbone).forward_tokens(images, mask=mask)[:, 1:]
        logits = self.head(tokens[mask])  # only masked positions are scored
        loss = masked_token_loss(logits, ids, mask)
        accuracy = (logits.detach().argmax(-1) == ids[mask]).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    @torch.no_grad()
    def reconstruct(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(masked_input, decoded)`` `(B, C, H, W)`: the input with masked patches at 0, and
        the tokenizer's decoder on the predicted codes at masked patches and the image's own
        codes elsewhere. Needs a pixel tokenizer (``vq_tokenizer``)."""
        decode_ids = getattr(self.tokenizer, "decode_ids", None)
        if not callable(decode_ids):
            raise TypeError(
                f"this run's tokenizer ({type(self.tokenizer).__name__}) has no pixel decoder; "
                "reconstructions need a vq_tokenizer"
            )
        b, c, h, w = images.shape
        if mask is None:
            mask = self.sample_mask(b, images.device)
        ids = torch.where(mask, self.logits(images, mask).argmax(-1), self.targets(images))
        p = int(as_token_backbone(self.backbone).patch_size)
        masked_input = unpatchify(patchify(images, p).masked_fill(mask.unsqueeze(-1), 0.0), p, c, h, w)
        decoded: Tensor = decode_ids(ids)
        return masked_input, decoded
