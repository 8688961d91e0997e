"""Barlow Twins: make the cross-correlation of two views' embeddings close to the identity.

References: Zbontar, Jing, Misra, LeCun & Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021 (arXiv:2103.03230).

Pseudocode (Algorithm 1 of the paper)::

    for x in loader:
        y_a, y_b = augment(x), augment(x)          # two distorted views
        z_a, z_b = f(y_a), f(y_b)                  # backbone + projector, N x D
        z_a_norm = (z_a - z_a.mean(0)) / z_a.std(0)
        z_b_norm = (z_b - z_b.mean(0)) / z_b.std(0)
        c = mm(z_a_norm.T, z_b_norm) / N           # D x D cross-correlation
        c_diff = (c - eye(D)).pow(2)
        off_diagonal(c_diff).mul_(lambda)
        loss = c_diff.sum()
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from selfsup.losses import barlow_twins_loss
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.heads import mlp_head
from selfsup.registry import METHODS


@METHODS.register("barlow_twins")
class BarlowTwins(Method):
    """Barlow Twins with the paper's projector and loss weight.

    "The projector network has three linear layers, each with 8192 output units. The first
    two layers of the projector are followed by a batch normalization layer and rectified
    linear units." The per-dimension standardisation over the batch happens inside
    ``barlow_twins_loss``. The paper trains with LARS, "a learning rate of 0.2 for the
    weights and 0.0048 for the biases and batch normalization parameters" (a ratio of
    0.024, ``bias_lr_scale``), both multiplied by ``batch_size / 256``.

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        proj_hidden_dim: width of the projector's two hidden layers (paper: 8192).
        proj_dim: output size ``D`` of the projector (paper: 8192).
        lambda_offdiag: weight of the redundancy-reduction term (paper: 5e-3).
        bias_lr_scale: lr multiplier of biases and norm parameters (paper: 0.0048 / 0.2).
        gather: correlate over the global batch when training on several processes.
    """

    # The paper's augmentations are BYOL's (asymmetric blur and solarisation).
    view_recipe = "asymmetric"
    lr_scaling = "linear"

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 8192,
        proj_dim: int = 8192,
        lambda_offdiag: float = 5e-3,
        bias_lr_scale: float = 0.024,
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(feature_dim(backbone), proj_hidden_dim, proj_dim, 3)
        self.lambda_offdiag = lambda_offdiag
        self.bias_lr_scale = bias_lr_scale
        self.gather = gather

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        for group in groups:
            if group["name"] == "no_decay":
                group["lr_scale"] = self.bias_lr_scale
        return groups

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        y_a, y_b = batch.views[0], batch.views[1]
        # One pass per view, as in the authors' code: each view's BN statistics are its own.
        z_a, z_b = self.projector(self.backbone(y_a)), self.projector(self.backbone(y_b))
        loss = barlow_twins_loss(z_a, z_b, lambda_offdiag=self.lambda_offdiag, gather=self.gather)
        return {"loss": loss, "z_std": feature_std_tensor(z_a)}
