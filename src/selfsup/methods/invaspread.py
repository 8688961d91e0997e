"""InvaSpread: one encoder, in-batch instance softmax embedding (invariant and spreading).

References: Ye, Zhang, Yuen & Chang, "Unsupervised Embedding Learning via Invariant and
Spreading Instance Feature", CVPR 2019 (arXiv:1904.03436).

Per batch of ``B`` images (the paper's Siamese training, section 3.2)::

    f, f^ = normalize(W g(x)), normalize(W g(x^))   # one encoder g, linear 128-d embedding
    P(i | x^_i) = exp(f_i . f^_i / T) / sum_k exp(f_k . f^_i / T)         # eq. 2
    P(i | x_j)  = exp(f_i . f_j / T)  / sum_k exp(f_k . f_j / T), j != i  # eq. 3
    J = - sum_i log P(i | x^_i) - sum_i sum_{j != i} log(1 - P(i | x_j))   # eq. 5

See ``selfsup.losses.invaspread_loss`` for the exact denominators (every other embedding of
the batch, both views, as the authors' implementation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.losses import invaspread_loss
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.registry import METHODS


@METHODS.register("invaspread")
class InvaSpread(Method):
    """InvaSpread with the paper's defaults.

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        feat_dim: width of the linear, L2-normalised embedding (paper: 128).
        temperature: softmax temperature ``T`` (paper: 0.1).
        gather: use the embeddings of every process as negatives when distributed.

    Forward: two views ``(B, C, H, W)``, both through the same encoder in one pass (BatchNorm
    statistics over the ``2B`` images the loss compares); embeddings ``(B, feat_dim)`` each.
    """

    view_recipe = "two_views"
    lr_scaling = "linear"

    def __init__(self, backbone: nn.Module, feat_dim: int = 128, temperature: float = 0.1, gather: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim(backbone), feat_dim)
        self.temperature = temperature
        self.gather = gather

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x, x_hat = batch.views[0], batch.views[1]
        z = F.normalize(self.head(self.backbone(torch.cat([x, x_hat]))), dim=1)
        f, f_hat = z.chunk(2)
        loss = invaspread_loss(f, f_hat, temperature=self.temperature, gather=self.gather)
        return {"loss": loss, "z_std": feature_std_tensor(f)}
