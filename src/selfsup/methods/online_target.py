"""The online/target pair that BYOL and MoCo v3 share.

An online encoder ``backbone -> projector -> predictor`` is trained; a target encoder, EMA
copies of ``backbone`` and ``projector`` (no predictor), gives the regression or contrast
targets. The methods differ in their heads and their loss, not in this structure.

References: Grill et al. 2020, BYOL, arXiv:2006.07733 (Figure 2); Chen, Xie & He 2021,
MoCo v3, arXiv:2104.02057 (Algorithm 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.methods.base import Method
from selfsup.nn.backbones.vit import without_drop_path
from selfsup.nn.heads import frozen_copy

__all__ = ["OnlineTargetMethod"]


class OnlineTargetMethod(Method):
    """A method with ``backbone``, ``projector`` and ``predictor`` and their EMA targets.

    Subclasses build ``backbone``, ``projector`` and ``predictor`` and then call
    :meth:`make_target`; the engine updates the target from :meth:`ema_pairs`.
    """

    backbone: nn.Module
    projector: nn.Module
    predictor: nn.Module

    def make_target(self) -> None:
        """Copy ``backbone`` and ``projector`` into the frozen target encoder."""
        # The teacher's targets come from the whole network: no stochastic depth (iBOT/DINOv2).
        self.teacher_backbone = without_drop_path(frozen_copy(self.backbone))
        self.teacher_projector = frozen_copy(self.projector)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.projector, self.teacher_projector)]

    def predictions_and_targets(
        self, view1: Tensor, view2: Tensor
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``((p1, p2), (z1, z2))``: online predictions and target projections, ``(B, D)``
        each, of two ``(B, C, H, W)`` views; the targets carry no gradient.

        Both views go through each encoder in one call, so BN statistics cover the 2B samples
        (as the reference codes' per-view calls do on one process, up to the batch split).
        """
        views = torch.cat([view1, view2])
        p1, p2 = self.predictor(self.projector(self.backbone(views))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.teacher_projector(self.teacher_backbone(views)).chunk(2)
        return (p1, p2), (z1, z2)
