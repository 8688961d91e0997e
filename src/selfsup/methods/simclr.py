"""SimCLR: contrast two augmented views of each image against all other views in the batch.

References: Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning
of Visual Representations", ICML 2020 (arXiv:2002.05709); SimCLR v2: Chen et al. 2020
(arXiv:2006.10029) for the deeper projection head.

Pseudocode (Algorithm 1 of the paper)::

    for x in batch:
        x1, x2 = t(x), t'(x)                  # two views from the same augmentation family
        z1, z2 = g(f(x1)), g(f(x2))           # backbone f, projection MLP g
        loss = NT-Xent(z1, z2, tau)           # 2N-2 in-batch negatives per anchor
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.losses import nt_xent
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.heads import mlp_head
from selfsup.registry import METHODS


@METHODS.register("simclr")
class SimCLR(Method):
    """SimCLR with a BN projection head; ``proj_layers=3`` gives SimCLR v2's head.

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        proj_hidden_dim: width of the projection MLP's hidden layers (paper: 2048).
        proj_dim: output size of the projection (paper: 128).
        proj_layers: number of linear layers in the projection head (v1: 2, v2: 3).
        temperature: NT-Xent temperature tau (paper: 0.5 in the ablations, 0.1 at 4096 batch).
        gather: use the negatives of every process when training distributed.
    """

    view_recipe = "two_views"
    lr_scaling = "sqrt"

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        proj_layers: int = 2,
        temperature: float = 0.5,
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(feature_dim(backbone), proj_hidden_dim, proj_dim, proj_layers)
        self.temperature = temperature
        self.gather = gather

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x1, x2 = batch.views[0], batch.views[1]
        # One pass over both views: BN statistics cover the 2N images the loss compares.
        z = self.projector(self.backbone(torch.cat([x1, x2])))
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, temperature=self.temperature, gather=self.gather)
        return {"loss": loss, "z_std": feature_std_tensor(z1)}
