"""End-to-end fine-tuning: train a copy of an encoder with a linear head on labels.

The protocol of MAE and MoCo v3 for ViTs: AdamW, linear warm-up then cosine decay, layer-wise
lr decay, label smoothing, a random-resized-crop + flip training view, and top-1 on the test
split under the deterministic evaluation view. ``--from-scratch`` in ``selfsup eval
finetune`` runs the same recipe on a freshly initialised encoder of the same architecture,
the baseline that shows what pretraining is worth.

Why a short loop of its own rather than ``engine.trainer.Trainer``: the Trainer runs a
``Method`` from a ``Config`` inside a run folder, with checkpoints, EMA, distributed wrapping
and logging; fine-tuning here is an evaluation of an in-memory encoder that returns one
number. It reuses the engine's pieces (``EpochBatchSampler`` / ``iterate_batches`` for the
seeded, resumable batch order, ``build_optimizer`` / ``set_schedule`` for groups with
``lr_scale``, ``cosine_schedule`` for the lr), so only the ~15 lines of step logic are new.

References: He et al. 2021, MAE, arXiv:2111.06377 (Appendix A.2, end-to-end fine-tuning);
Chen, Xie & He 2021, MoCo v3, arXiv:2104.02057; Bao et al. 2021, BEiT, arXiv:2106.08254
(layer-wise lr decay); Szegedy et al. 2016, arXiv:1512.00567 (label smoothing).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.config import OptimConfig
from selfsup.data.base import ImageDataset
from selfsup.data.loader import EpochBatchSampler, iterate_batches, iterate_eval
from selfsup.engine.optim import build_optimizer, layer_decay_param_groups, set_schedule
from selfsup.engine.schedules import cosine_schedule
from selfsup.transforms import to_float

if TYPE_CHECKING:
    from selfsup.config import Config
    from selfsup.data.base import DataSplits
    from selfsup.methods.base import Method

__all__ = ["FineTuneClassifier", "finetune", "finetune_encoder"]


class FineTuneClassifier(nn.Module):
    """An encoder ``(B, C, H, W) -> (B, D)`` followed by a linear head ``(B, D) -> (B, K)``.

    The head starts near zero (std 2e-5 weights, as MAE's fine-tuning), so the first
    updates do not send large random gradients into the pretrained encoder.
    """

    def __init__(self, encoder: nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        """Return ``(B, K)`` logits."""
        return self.head(self.encoder(images))


@torch.no_grad()
def _top1(model: nn.Module, dataset: ImageDataset, eval_views: nn.Module, device: torch.device,
          batch_size: int) -> float:
    model.eval()
    hits, total = 0, 0
    for images, labels, _ in iterate_eval(dataset, batch_size):
        x = eval_views(to_float(images.to(device)))[0]
        hits += int((model(x).argmax(dim=1) == labels.to(device)).sum())
        total += labels.numel()
    return hits / max(total, 1)


def finetune(
    encoder: nn.Module,
    num_features: int,
    train_dataset: ImageDataset,
    test_dataset: ImageDataset,
    num_classes: int,
    *,
    train_views: nn.Module,
    eval_views: nn.Module,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
    label_smoothing: float = 0.1,
    warmup_epochs: float = 1.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Fine-tune a copy of ``encoder`` with a linear head; return test top-1.

    The encoder itself is not modified (a deep copy is trained, with every parameter made
    trainable: MoCo v3 freezes the patch projection for pretraining only).

    Args:
        encoder: ``(B, C, H, W) -> (B, num_features)`` pretrained (or fresh) encoder.
        num_features: ``D``, the encoder's output width.
        train_dataset, test_dataset: labelled uint8 image datasets.
        num_classes: ``K``.
        train_views: training augmentation (a ``single_view`` recipe), uint8->float input.
        eval_views: the deterministic ``eval`` recipe for the test split.
        epochs: training epochs (MAE ViT-B: 100).
        batch_size: batch size (the lr is used as given, not rescaled).
        lr: peak AdamW lr after warm-up; cosine decay to 0.
        weight_decay: AdamW weight decay (MAE: 0.05), none on norms, biases and tokens.
        layer_decay: layer-wise lr decay for encoders with ``blocks`` (MAE ViT-B: 0.65).
        label_smoothing: cross-entropy label smoothing (MAE: 0.1).
        warmup_epochs: linear lr warm-up length (MAE: 5).
        device: where to train.
        seed: seeds the batch order, the head and the augmentation draws.

    Returns:
        ``{"finetune_top1": test accuracy in [0, 1], "finetune_train_loss": mean loss of the
        last epoch}``.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    model = FineTuneClassifier(copy.deepcopy(encoder), num_features, num_classes).to(device)
    model.requires_grad_(True)
    groups = layer_decay_param_groups(model.encoder, model.head, layer_decay)
    optimizer = build_optimizer(groups, OptimConfig(name="adamw", weight_decay=weight_decay), lr)
    sampler = EpochBatchSampler(len(train_dataset), min(batch_size, len(train_dataset)), seed=seed)
    total = epochs * len(sampler)
    warmup = int(round(warmup_epochs * len(sampler)))
    step, last_losses = 0, []
    for epoch in range(epochs):
        model.train()
        last_losses = []
        for images, labels, _ in iterate_batches(train_dataset, sampler, epoch):
            set_schedule(optimizer, cosine_schedule(step, total, lr, 0.0, warmup), weight_decay)
            x = train_views(to_float(images.to(device)))[0]
            loss = F.cross_entropy(model(x), labels.to(device), label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_losses.append(float(loss.detach()))
            step += 1
    train_loss = sum(last_losses) / len(last_losses) if last_losses else math.nan
    return {"finetune_top1": _top1(model, test_dataset, eval_views, device, batch_size),
            "finetune_train_loss": train_loss}


def finetune_encoder(method: Method, cfg: Config, splits: DataSplits, from_scratch: bool = False) -> nn.Module:
    """The encoder to fine-tune: the pretrained ``method.eval_backbone``, or with ``from_scratch``
    a new backbone of the same configured architecture, initialised from ``cfg.train.seed``
    (the random-init baseline). Either way on the device of the method's parameters."""
    if not from_scratch:
        return method.eval_backbone
    from selfsup.engine.build import build_backbone  # the engine imports the eval package

    device = next(method.parameters()).device
    torch.manual_seed(cfg.train.seed)
    return build_backbone(cfg, splits).to(device)
