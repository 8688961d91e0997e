"""Supervised fine-tuning: an encoder and a linear classifier trained end to end on labels.

The evaluation protocol of MAE and MoCo v3 (and, on 1% / 10% of the labels, SimCLR's
semi-supervised protocol), as a method of the shared loop, so that fine-tuning gets the
engine's accumulation, autocast, clipping, DDP, NaN guard and exact resume:

    logits = head(encoder(augment(x)))             # head starts near zero (std 2e-5)
    loss = CE(logits, y, label_smoothing)          # MAE: 0.1
    optimiser: AdamW, layer-wise lr decay over the encoder's blocks (BEiT / MAE)

References: He et al. 2021, MAE, arXiv:2111.06377 (Appendix A.2, end-to-end fine-tuning);
Chen, Xie & He 2021, MoCo v3, arXiv:2104.02057; Chen et al. 2020, SimCLR, arXiv:2002.05709
(sec. 4.2, semi-supervised); Bao et al. 2021, BEiT, arXiv:2106.08254 (layer-wise lr decay);
Szegedy et al. 2016, arXiv:1512.00567 (label smoothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.param_groups import layer_decay_param_groups
from selfsup.registry import METHODS


@METHODS.register("finetune")
class FineTune(Method):
    """An encoder ``(B, C, H, W) -> (B, D)`` and a linear head ``(B, D) -> (B, K)`` trained on labels.

    Every encoder parameter is trained (MoCo v3 freezes its patch projection only for
    pretraining). Use ``optim.name: adamw`` (MAE: lr 1e-3 x B / 256, weight decay 0.05).

    Args:
        backbone: the encoder; with ``init`` it is loaded with that run's weights.
        num_classes: ``K`` (set by the engine).
        label_smoothing: of the cross-entropy (MAE: 0.1).
        layer_decay: layer-wise lr decay for encoders with ``blocks`` (MAE ViT-B: 0.65-0.75;
            1 = none; encoders without blocks get 1 everywhere).
        init: the pretrained encoder to start from: ``{run: runs/<name>}`` in a config (the
            engine loads that run's backbone); ``None`` = train from the backbone's random init.
    """

    view_recipe = "single_view"
    batch_fields = frozenset({"label"})
    engine_facts = ("num_classes",)
    frozen_models = ("init",)
    lr_scaling = "none"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        label_smoothing: float = 0.1,
        layer_decay: float = 0.75,
        init: nn.Module | Mapping[str, Any] | str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        if num_classes < 2:
            raise ValueError(f"fine-tuning needs at least 2 classes, got {num_classes}")
        if init is not None:
            if not isinstance(init, nn.Module):
                raise TypeError("init must be a loaded encoder here (a config's {run: ...} is loaded by the engine)")
            try:
                backbone.load_state_dict(init.state_dict(), strict=True)
            except RuntimeError as err:
                raise ValueError(
                    f"init's weights do not fit the configured backbone: {str(err).splitlines()[0]}; "
                    "set backbone to the pretrained run's architecture"
                ) from None
        self.backbone = backbone.requires_grad_(True)
        self.head = nn.Linear(feature_dim(backbone), num_classes)
        # Near-zero start, so the first updates send no large random gradients into the encoder.
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        self.label_smoothing = label_smoothing
        self.layer_decay = layer_decay

    def param_groups(self) -> list[dict[str, Any]]:
        return layer_decay_param_groups(self.backbone, self.head, self.layer_decay, "backbone.", "head.")

    def classify(self, images: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, K)`` logits."""
        logits: Tensor = self.head(self.backbone(images))
        return logits

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        assert batch.label is not None  # declared in batch_fields: the loop hands labels
        logits = self.classify(batch.views[0])
        loss = F.cross_entropy(logits, batch.label, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            top1 = (logits.argmax(dim=1) == batch.label).float().mean()
        return {"loss": loss, "train_top1": top1}
