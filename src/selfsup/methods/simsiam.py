"""SimSiam: a Siamese network whose predictor regresses the other view's stop-gradient projection.

References: Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021
(arXiv:2011.10566).

Pseudocode (Algorithm 1 of the paper)::

    for x in loader:
        x1, x2 = aug(x), aug(x)               # two random views
        z1, z2 = f(x1), f(x2)                 # backbone + projection MLP
        p1, p2 = h(z1), h(z2)                 # prediction MLP
        L = D(p1, z2) / 2 + D(p2, z1) / 2     # D(p, z) = -cos(p, z.detach())
        L.backward(); update(f, h)            # no momentum encoder, no negatives
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from selfsup.losses import negative_cosine
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.heads import mlp_head
from selfsup.registry import METHODS


@METHODS.register("simsiam")
class SimSiam(Method):
    """SimSiam with the paper's heads.

    "The projection MLP (in f) has BN applied to each fully-connected (fc) layer, including
    its output fc. Its output fc has no ReLU. The hidden fc is 2048-d. This MLP has 3
    layers." "The prediction MLP (h) has BN applied to its hidden fc layers. Its output fc
    does not have BN or ReLU. This MLP has 2 layers. The dimension of h's input and output
    (z and p) is d = 2048, and h's hidden layer's dimension is 512, making h a bottleneck
    structure." The output BN carries no affine parameters, as in the authors' code.

    The paper also keeps the predictor's lr constant at the peak value (sec. 4.4, "Predictor":
    no decay works better, the predictor should adapt to the latest representations);
    ``fix_predictor_lr`` does that, ``False`` lets it follow the engine's schedule.

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        proj_hidden_dim: hidden width of the 3-layer projection MLP (paper: 2048).
        proj_dim: output size ``d`` of the projection and the predictor (paper: 2048).
        pred_hidden_dim: bottleneck width of the 2-layer predictor (paper: 512).
        proj_layers: depth of the projection MLP (paper: 3 on ImageNet, 2 for CIFAR-10,
            Appendix D).
        fix_predictor_lr: keep the predictor's lr at the peak (no warm-up, no decay).
        stop_gradient: the paper's stop-gradient on the target branch. ``False`` is the
            ablation of Figure 2 ("w/o stop-grad"), which collapses to a constant output:
            it is there to reproduce that experiment, not to train with.

    Monitors: ``z_std`` and ``p_std``, the Figure 2 statistic of the projections ``z`` and
    the predictions ``p``. A collapse shows fully in ``p_std`` (-> 0). ``z_std`` falls too
    but cannot reach 0 in training mode: the projection's output BN keeps every dimension's
    batch mean at 0, so the normalised ``z`` cannot all point the same way.
    """

    view_recipe = "two_views"
    lr_scaling = "linear"

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 2048,
        pred_hidden_dim: int = 512,
        proj_layers: int = 3,
        fix_predictor_lr: bool = True,
        stop_gradient: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(
            feature_dim(backbone), proj_hidden_dim, proj_dim, proj_layers, output_norm="bn_noaffine"
        )
        self.predictor = mlp_head(proj_dim, pred_hidden_dim, proj_dim, 2)
        self.fix_predictor_lr = fix_predictor_lr
        self.stop_gradient = stop_gradient

    def param_groups(self) -> list[dict[str, Any]]:
        """The default decay / no-decay groups, each split into the predictor's parameters
        (constant lr with ``fix_predictor_lr``) and the rest."""
        predictor = {id(p) for p in self.predictor.parameters()}
        groups = []
        for group in super().param_groups():
            rest = [p for p in group["params"] if id(p) not in predictor]
            mine = [p for p in group["params"] if id(p) in predictor]
            groups.append({**group, "params": rest})
            groups.append(
                {**group, "params": mine, "name": f"predictor_{group['name']}", "fixed_lr": self.fix_predictor_lr}
            )
        return groups

    def _distance(self, p: Tensor, z: Tensor) -> Tensor:
        """``D(p, z)`` of the paper, without the stop-gradient when ablating it."""
        if self.stop_gradient:
            return negative_cosine(p, z)
        return -F.cosine_similarity(p.float(), z.float(), dim=1).mean()

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x1, x2 = batch.views[0], batch.views[1]
        # One pass per view, as in the authors' code: each view's BN statistics are its own.
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (self._distance(p1, z2) + self._distance(p2, z1))
        return {"loss": loss, "z_std": feature_std_tensor(z1), "p_std": feature_std_tensor(p1)}
