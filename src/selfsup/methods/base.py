"""The contract every self-supervised method implements, and the data it is handed.

A method owns its heads, its loss and its per-step state updates; it owns no loop, optimiser,
logger or EMA timing. The engine (``selfsup.engine.trainer``) calls, per optimisation step:

    forward under autocast -> ``training_step`` -> backward -> ``on_after_backward``
    -> clip, optimiser step -> EMA of each pair in ``ema_pairs()`` -> ``on_step_end``.

All scheduled values (lr, weight decay, EMA momentum, teacher temperature, ...) arrive in
``StepInfo``: a method never counts steps itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Batch:
    """One training batch.

    Attributes:
        views: augmented views, each ``(B, C, H, W)`` float; multi-crop recipes may give
            several resolutions (all global crops first, then local crops).
        index: ``(B,)`` int64 dataset indices of the samples (memory banks use them).
        label: ``(B,)`` int64 labels or ``None``; never used by self-supervised losses.
        images: ``(B, C, H, W)`` the un-augmented images scaled to [0, 1] (for methods that
            make their own targets, e.g. pretext tasks), or ``None``.
        text: optional paired text (image-text methods).
    """

    views: list[Tensor]
    index: Tensor
    label: Tensor | None = None
    images: Tensor | None = None
    text: Any = None


@dataclass(frozen=True)
class StepInfo:
    """Where training stands, and every scheduled value for this step.

    Attributes:
        step: global optimisation step, 0-based.
        total_steps: number of optimisation steps in the whole run.
        epoch: float epoch (``step / steps_per_epoch``).
        lr: learning rate of the base parameter group at this step.
        weight_decay: weight decay at this step.
        ema_momentum: momentum for teacher EMA updates at this step (``teacher = m * teacher
            + (1 - m) * student``).
        extra: further per-step scheduled values a method asked for (name -> value).
    """

    step: int
    total_steps: int
    epoch: float
    lr: float = 0.0
    weight_decay: float = 0.0
    ema_momentum: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return self.step / max(1, self.total_steps)


class Method(nn.Module):
    """Base class of a self-supervised method.

    Subclasses set ``self.backbone`` (the encoder that is evaluated) and implement
    ``training_step``. Everything else has a sensible default.

    Class attributes:
        view_recipe: name of the default view recipe in ``selfsup.transforms`` (e.g.
            ``"two_views"``, ``"asymmetric"``, ``"multi_crop"``).
        uses_ema: whether ``ema_pairs`` is non-empty, so the engine schedules a momentum.
        default_ema_momentum: ``(start, end)`` of the cosine momentum schedule.
        lr_scaling: default rule relating lr to batch size: ``"linear"`` (lr * B / 256),
            ``"sqrt"`` or ``"none"``.
        find_unused_parameters: set ``True`` when some trainable parameters may get no
            gradient in a step (e.g. a head used only on some steps): DistributedDataParallel
            must then search the graph for them each step, which costs time, so it is off
            by default.
        requires_token_backbone: the method needs a ViT-like backbone with the token API
            (``forward_tokens``, ``patch_size``, ``num_patches``, ``grid_size``,
            ``embed_dim``): masked image modelling (MAE, SimMIM) drops or replaces patch
            tokens, which a ConvNet cannot do. Tests and tools read it instead of names.
    """

    view_recipe: str = "two_views"
    uses_ema: bool = False
    default_ema_momentum: tuple[float, float] = (0.996, 1.0)
    lr_scaling: str = "linear"
    find_unused_parameters: bool = False
    requires_token_backbone: bool = False

    backbone: nn.Module

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        """Returns ``{"loss": total, "<part>_loss": ..., other monitored scalars}``; ``loss`` is
        a scalar tensor, monitors may be tensors or floats."""
        raise NotImplementedError

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:  # type: ignore[override]
        """Calls ``training_step``: DistributedDataParallel hooks into ``forward``, so the
        engine calls the (possibly wrapped) module rather than ``training_step`` directly."""
        return self.training_step(batch, step)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(student, teacher)`` pairs that the engine updates by EMA after each step."""
        return []

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimiser: no weight decay (nor LARS adaptation) on
        norms and biases, per the common practice of SimCLR/BYOL/MoCo v3."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [
            {"params": decay, "name": "decay"},
            {"params": no_decay, "name": "no_decay", "weight_decay": 0.0, "lars_exclude": True},
        ]

    def on_after_backward(self, step: StepInfo) -> None:
        """Hook after ``backward`` and before the optimiser step (e.g. freeze a layer)."""

    def on_step_end(self, step: StepInfo) -> None:
        """Hook after the optimiser step and EMA (e.g. enqueue keys, update a bank)."""

    @property
    def eval_backbone(self) -> nn.Module:
        """The encoder that evaluation, fine-tuning and the exported weights use: the trained
        ``backbone`` unless a method's paper evaluates another one (DINO: the teacher)."""
        return self.backbone

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, num_features)`` features used for evaluation."""
        return self.eval_backbone(images)

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)


def check_token_backbone(backbone: nn.Module, method: str) -> None:
    """Raise ``TypeError`` unless ``backbone`` implements the ViT token API that masked image
    modelling needs (``forward_tokens`` and the patch-grid attributes)."""
    needed = ("forward_tokens", "patch_size", "num_patches", "grid_size", "embed_dim")
    missing = [name for name in needed if not hasattr(backbone, name)]
    if missing:
        raise TypeError(
            f"{method} needs a Vision Transformer backbone with the token API (vit_tiny, vit_small, "
            f"vit_base); {type(backbone).__name__} lacks {', '.join(missing)}"
        )
