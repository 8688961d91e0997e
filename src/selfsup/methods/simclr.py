"""SimCLR: contrast two augmented views of each image against all other views in the batch.

References: Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning
of Visual Representations", ICML 2020 (arXiv:2002.05709); SimCLR v2: Chen et al. 2020
(arXiv:2006.10029) for the deeper projection head.

Pseudocode (Algorithm 1 of the paper)::

    for x in batch:
        x1, x2 = t(x), t'(x)                  # two views from the same augmentation family
        z1, z2 = g(f(x1)), g(f(x2))           # backbone f, projection MLP g
        loss = NT-Xent(z1, z2, tau)           # 2N-2 in-batch negatives per anchor

SimCLR v2 (``proj_layers: 3, eval_features: head_middle``): a deeper projection head, and the
encoder that is evaluated and fine-tuned keeps part of the head: the paper fine-tunes from a
middle layer of the projection head instead of its input (sec. 2; with the 3-layer head, from
the first hidden layer, after BN and ReLU), which helps most with few labels. Self-distillation of the fine-tuned
model: ``selfsup distill`` (``selfsup.engine.distill``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.errors import ConfigError
from selfsup.losses import nt_xent
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.heads import mlp_head
from selfsup.registry import METHODS


class HeadMiddle(nn.Module):
    """The backbone followed by the first hidden layer of the projection head (SimCLR v2's
    fine-tuned encoder): ``(B, C, H, W) -> (B, proj_hidden_dim)``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, num_features: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.backbone(x))
        return out


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
        eval_features: ``"backbone"`` (SimCLR v1: the head is thrown away) or
            ``"head_middle"`` (SimCLR v2: the backbone plus the head's first hidden layer,
            Linear-BN-ReLU, is what kNN, probes and fine-tuning use; needs ``proj_layers >= 2``).
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
        eval_features: str = "backbone",
    ) -> None:
        super().__init__()
        if eval_features not in ("backbone", "head_middle"):
            raise ConfigError(f"method.eval_features must be 'backbone' or 'head_middle', got {eval_features!r}")
        if eval_features == "head_middle" and proj_layers < 2:
            raise ConfigError("method.eval_features=head_middle needs a hidden layer: set method.proj_layers >= 2")
        self.backbone = backbone
        self.projector = mlp_head(feature_dim(backbone), proj_hidden_dim, proj_dim, proj_layers)
        self.temperature = temperature
        self.gather = gather
        self.eval_features = eval_features
        self.proj_hidden_dim = proj_hidden_dim

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x1, x2 = batch.views[0], batch.views[1]
        # One pass over both views: BN statistics cover the 2N images the loss compares.
        z = self.projector(self.backbone(torch.cat([x1, x2])))
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, temperature=self.temperature, gather=self.gather)
        return {"loss": loss, "z_std": feature_std_tensor(z1)}

    def embedder(self) -> tuple[nn.Module, dict[str, Any] | None]:
        """``embed`` as a module: the backbone, or (v2) the backbone and the head's first layer."""
        if self.eval_features == "backbone":
            return self.eval_backbone, None
        # Slicing shares the projector's modules: the embedder is the trained layer itself.
        spec = {"proj_hidden_dim": self.proj_hidden_dim}
        return HeadMiddle(self.eval_backbone, self.projector[:3], self.proj_hidden_dim), spec

    @classmethod
    def build_embedder(cls, spec: Mapping[str, Any], backbone: Callable[[], nn.Module]) -> nn.Module:
        encoder = backbone()
        hidden = int(spec["proj_hidden_dim"])
        return HeadMiddle(encoder, mlp_head(feature_dim(encoder), hidden, 1, 2)[:3], hidden)

    @property
    def num_features(self) -> int:
        return self.proj_hidden_dim if self.eval_features == "head_middle" else feature_dim(self.backbone)
