"""BYOL: an online network predicts a slowly moving target network's projection of another view.

References: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning", NeurIPS 2020 (arXiv:2006.07733).

Pseudocode::

    z1_t, z2_t = g_t(f_t(v1)), g_t(f_t(v2))         # target network, no gradient
    p1, p2 = q(g(f(v1))), q(g(f(v2)))               # online network + predictor
    loss = (2 - 2 cos(p1, z2_t)) + (2 - 2 cos(p2, z1_t))   # symmetrised
    target = tau * target + (1 - tau) * online      # tau: cosine 0.996 -> 1 (engine)
"""

from __future__ import annotations

from torch import Tensor, nn

from selfsup.losses import byol_loss
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.online_target import OnlineTargetMethod
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.heads import mlp_head
from selfsup.registry import METHODS


@METHODS.register("byol")
class BYOL(OnlineTargetMethod):
    """BYOL with the paper's heads: projector and predictor 4096 -> BN -> ReLU -> 256.

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        proj_hidden_dim: hidden width of projector and predictor (paper: 4096).
        proj_dim: projection size (paper: 256).
        pred_hidden_dim: hidden width of the predictor (paper: 4096).
    """

    view_recipe = "asymmetric"
    default_ema_momentum = (0.996, 1.0)
    lr_scaling = "linear"

    def __init__(
        self, backbone: nn.Module, proj_hidden_dim: int = 4096, proj_dim: int = 256, pred_hidden_dim: int = 4096
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(feature_dim(backbone), proj_hidden_dim, proj_dim, 2)
        self.predictor = mlp_head(proj_dim, pred_hidden_dim, proj_dim, 2)
        self.make_target()

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        (p1, p2), (z1_t, z2_t) = self.predictions_and_targets(batch.views[0], batch.views[1])
        loss = byol_loss(p1, z2_t) + byol_loss(p2, z1_t)
        return {"loss": loss, "z_std": feature_std_tensor(p1)}
