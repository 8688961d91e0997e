"""MoCo v3: in-batch contrast between a query encoder with a predictor and a momentum key
encoder, with a frozen random patch projection for Vision Transformers.

References: Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision
Transformers", ICCV 2021 (arXiv:2104.02057).

Pseudocode (Algorithm 1 of the paper)::

    f_q: backbone + projector + predictor;  f_k: backbone + projector (momentum)
    q1, q2 = f_q(x1), f_q(x2)               # queries (B, C)
    k1, k2 = f_k(x1), f_k(x2)               # keys, no gradient
    loss = ctr(q1, k2) + ctr(q2, k1)        # symmetrised, keys of the whole batch
    ctr(q, k) = CE(q k^T / tau, arange(B)) * 2 tau
    f_k = m * f_k + (1 - m) * f_q           # m: cosine 0.99 -> 1 (engine, ema_pairs)

"Random patch projection": for a ViT the patch embedding is randomly initialised and frozen,
which the paper found removes the loss spikes ("dips") that otherwise limit stability.
"""

from __future__ import annotations

from torch import Tensor, nn

from selfsup.losses import moco_v3_loss
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.online_target import OnlineTargetMethod
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.heads import mlp_head
from selfsup.registry import METHODS


@METHODS.register("moco_v3")
class MoCoV3(OnlineTargetMethod):
    """MoCo v3 with the paper's heads and temperature.

    "The projection head is a 3-layer MLP, and the prediction head is a 2-layer MLP. The
    hidden layers of both MLPs are 4096-d and are with ReLU; the output layers of both MLPs
    are 256-d, without ReLU. [...] all layers in both MLPs have BN" (Appendix A; the
    reference code's projector ends in a BN without affine, the predictor in no BN).

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``; any backbone works. When it
            has a ``patch_embed`` (a ViT) and ``freeze_patch_embed`` is set, that projection
            keeps its random initialisation.
        proj_hidden_dim: hidden width of projector and predictor (paper: 4096).
        proj_dim: output width of projector and predictor (paper: 256).
        pred_hidden_dim: hidden width of the predictor (paper: 4096).
        temperature: softmax temperature tau (paper: 0.2 for ViT, 1.0 for ResNet).
        freeze_patch_embed: freeze the ViT patch projection (paper's stability trick).
        gather: contrast against the keys of every process (the paper's global batch).
    """

    view_recipe = "two_views"
    default_ema_momentum = (0.99, 1.0)
    lr_scaling = "linear"

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
        temperature: float = 0.2,
        freeze_patch_embed: bool = True,
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.temperature = temperature
        self.gather = gather
        patch_embed = getattr(backbone, "patch_embed", None)
        if freeze_patch_embed and isinstance(patch_embed, nn.Module):
            # Before the teacher is copied and the optimiser built: the projection stays at its
            # random initialisation in both encoders, so EMA leaves it equal too.
            patch_embed.requires_grad_(False)
        self.projector = mlp_head(
            feature_dim(backbone), proj_hidden_dim, proj_dim, 3, hidden_norm="bn", output_norm="bn_noaffine"
        )
        self.predictor = mlp_head(proj_dim, pred_hidden_dim, proj_dim, 2, hidden_norm="bn")
        self.make_target()

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        (q1, q2), (k1, k2) = self.predictions_and_targets(batch.views[0], batch.views[1])
        loss = moco_v3_loss(q1, q2, k1, k2, temperature=self.temperature, gather=self.gather)
        return {"loss": loss, "z_std": feature_std_tensor(q1)}
