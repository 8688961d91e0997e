"""data2vec (vision): a student ViT sees a blockwise-masked image and regresses, at the masked
positions, the average of an EMA teacher's top-K block outputs on the full image.

References: Baevski, Hsu, Xu, Babu, Gu & Auli, "data2vec: A General Framework for
Self-supervised Learning in Speech, Vision and Language", ICML 2022 (arXiv:2202.03555).

Pseudocode::

    mask = block_mask over the patch grid, ratio 0.6          # BEiT's blockwise masking
    with no_grad:                                             # teacher: EMA of the blocks
        a_1..a_N = teacher_blocks(embed(x))                   # full image, per-block outputs
        y = mean over the top K of instance_norm(a_l)         # (B, L, D), K = 6 of 12
    z = student(x, mask)                                      # mask token at masked patches
    loss = smooth_l1_beta(linear_head(z[:, 1:]), y) at masked positions, / sqrt(D)
    teacher = tau * teacher + (1 - tau) * student             # tau: 0.999 -> 0.9999 (engine)

Details and where they come from:

* Teacher and student share the patch embedding, class token and position embeddings; only
  the transformer blocks are averaged ("we found it more efficient and slightly more accurate
  to share the parameters of the feature encoder and the positional encoder between the
  teacher and student networks", Section 3.2). The teacher runs in eval mode (no drop path).
* Target layer (Section 3.3): "the output of the feed-forward network (FFN) prior to the last
  residual connection in each block" (``target_layer="ffn"``, the default); ``"block"`` takes
  each block's full output (the residual stream) instead, the reference code's
  ``end_of_block_targets``.
* Each block output is instance-normalised over the patch tokens (parameter-less, per sample
  and channel) before averaging; the class token is not a target and is left out of the
  statistics. The released ViT-B configuration also layer-normalises the average
  (``layer_norm_targets``, off by default as in the paper's text).
* Loss: smooth L1 with beta = 2 (the released vision configuration), summed over channels and
  scaled by ``1 / sqrt(D)``, averaged over masked patches (``selfsup.losses.data2vec_loss``).
* Momentum: the paper anneals tau linearly from 0.999 to 0.9999 (0.9998 in the released ViT-B
  configuration); here the engine's cosine schedule between the same ends
  (``default_ema_momentum``; ``train.ema_momentum`` overrides it for short runs).

Randomness: masks come from the global CPU generator, which the engine seeds and checkpoints
(exact resume), then move to the input's device.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from selfsup.losses import data2vec_loss, data2vec_targets
from selfsup.methods.base import Batch, Method, StepInfo, check_token_backbone
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.vit import Block, VisionTransformer
from selfsup.nn.masking import block_mask
from selfsup.registry import METHODS

__all__ = ["Data2Vec"]

_TARGET_LAYERS = ("ffn", "block")


@METHODS.register("data2vec")
class Data2Vec(Method):
    """data2vec around a ViT backbone (the student, the evaluated encoder).

    Args:
        backbone: a ``VisionTransformer`` (token API plus ``blocks``, ``patch_embed``,
            ``cls_token``, ``interpolate_pos_encoding``); its mask token is created here.
        mask_ratio: target fraction of blockwise-masked patches (paper: 0.6).
        min_mask_block: smallest masked block in patches (paper: 16 of a 14x14 grid, ~8%;
            4 suits a 7x7 grid).
        top_k_blocks: number ``K`` of the teacher's last blocks averaged into the targets
            (paper: 6 of 12 for ViT-B); ``None`` = half the depth (at least 1).
        target_layer: ``"ffn"`` (paper: FFN output before the last residual connection) or
            ``"block"`` (each block's output).
        layer_norm_targets: parameter-less layer norm of the averaged targets (released
            configuration), off in the paper's description.
        loss_beta: smooth L1 beta (released vision configuration: 2; 0 = squared error).
        loss_scale: multiplier of the per-token loss; ``None`` = ``1 / sqrt(D)``.
    """

    view_recipe = "single_view"
    requires_token_backbone = True
    lr_scaling = "linear"
    default_ema_momentum = (0.999, 0.9999)

    def __init__(
        self,
        backbone: nn.Module,
        mask_ratio: float = 0.6,
        min_mask_block: int = 4,
        top_k_blocks: int | None = None,
        target_layer: str = "ffn",
        layer_norm_targets: bool = False,
        loss_beta: float = 2.0,
        loss_scale: float | None = None,
    ) -> None:
        super().__init__()
        check_token_backbone(backbone, "data2vec")
        if not isinstance(backbone, VisionTransformer) or len(backbone.blocks) == 0:
            raise TypeError(
                "data2vec needs a VisionTransformer backbone (vit_tiny, vit_small, vit_base) with at least one "
                f"block, got {type(backbone).__name__}"
            )
        blocks = backbone.blocks
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        depth = len(blocks)
        k = max(1, depth // 2) if top_k_blocks is None else top_k_blocks
        if not 1 <= k <= depth:
            raise ValueError(f"top_k_blocks must be in [1, {depth}] (the ViT's depth), got {top_k_blocks}")
        if target_layer not in _TARGET_LAYERS:
            raise ValueError(f"target_layer must be one of {_TARGET_LAYERS}, got {target_layer!r}")
        if loss_beta < 0:
            raise ValueError(f"loss_beta must be >= 0, got {loss_beta}")
        self.backbone = backbone
        backbone.enable_mask_token()
        self.mask_ratio = mask_ratio
        self.min_mask_block = min_mask_block
        self.top_k_blocks = k
        self.target_layer = target_layer
        self.layer_norm_targets = layer_norm_targets
        self.loss_beta = loss_beta
        self.loss_scale = loss_scale
        # Only the blocks are averaged; the embedding is shared with the student (module doc).
        self.teacher_blocks = copy.deepcopy(blocks).requires_grad_(False).eval()
        # The linear regression head from the student's final tokens to the target width.
        self.head = nn.Linear(backbone.embed_dim, backbone.embed_dim)

    @property
    def vit(self) -> VisionTransformer:
        """The backbone, typed (checked in the constructor)."""
        assert isinstance(self.backbone, VisionTransformer)
        return self.backbone

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.vit.blocks, self.teacher_blocks)]

    def train(self, mode: bool = True) -> Data2Vec:
        super().train(mode)
        self.teacher_blocks.eval()  # the teacher never drops paths (reference: ema.model.eval())
        return self

    def sample_mask(self, batch_size: int, device: torch.device) -> Tensor:
        """`(B, L)` bool blockwise mask, True = masked, about ``mask_ratio`` of the patches."""
        grid_h, grid_w = self.vit.grid_size
        return block_mask(batch_size, grid_h, grid_w, self.mask_ratio, min_block=self.min_mask_block, device=device)

    def embed_tokens(self, images: Tensor) -> Tensor:
        """The first block's input `(B, 1 + L, D)` of the full image, from the shared embedding:
        patch embeddings plus positions, the class token (plus its position) first."""
        vit = self.vit
        patch = vit.patch_size
        tokens = vit.patch_embed(images)
        pos = vit.interpolate_pos_encoding(images.shape[-2] // patch, images.shape[-1] // patch)
        cls = (vit.cls_token + pos[:, :1]).to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens + pos[:, 1:]], dim=1)

    @torch.no_grad()
    def teacher_layer_outputs(self, images: Tensor) -> list[Tensor]:
        """Every teacher block's target-layer output on the full image, `depth x (B, L, D)`
        (patch tokens only): the FFN output before its residual (``"ffn"``) or the block output."""
        x = self.embed_tokens(images)
        outputs = []
        for block in self.teacher_blocks:
            assert isinstance(block, Block)
            if self.target_layer == "block":
                x = block(x)
                outputs.append(x[:, 1:])
            else:  # Block.forward written out, to read the FFN branch before the residual add
                x = x + block.drop_path(block.attn(block.norm1(x)))
                ffn = block.mlp(block.norm2(x))
                x = x + block.drop_path(ffn)
                outputs.append(ffn[:, 1:])
        return outputs

    def targets(self, images: Tensor) -> Tensor:
        """Regression targets `(B, L, D)`: the normalised average of the top-K teacher layers."""
        layers = self.teacher_layer_outputs(images)[-self.top_k_blocks :]
        return data2vec_targets(layers, layer_norm_targets=self.layer_norm_targets)

    def predict(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Student predictions `(B, L, D)` and class tokens `(B, D)` under ``mask`` `(B, L)`."""
        tokens = self.vit.forward_tokens(images, mask=mask)
        return self.head(tokens[:, 1:]), tokens[:, 0]

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        images = batch.views[0]
        mask = self.sample_mask(images.shape[0], images.device)
        target = self.targets(images)
        pred, cls = self.predict(images, mask)
        loss = data2vec_loss(pred, target, mask, beta=self.loss_beta, scale=self.loss_scale)
        # Collapse monitors: the spread of the student's class token over the batch, and of the
        # targets over the masked positions (the reference code logs target_var / pred_var).
        return {
            "loss": loss,
            "z_std": feature_std_tensor(cls),
            "target_std": target[mask].float().std(dim=0, correction=0).mean(),
        }
