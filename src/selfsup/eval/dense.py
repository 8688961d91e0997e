"""Dense linear probe: per-pixel classification (semantic segmentation) from frozen spatial
features, scored by mean IoU and pixel accuracy.

A 1x1 convolution (a linear map of each feature vector) turns features ``(N, D, h, w)`` into
class logits ``(N, K, h, w)``; the logits are upsampled bilinearly to the masks' size
``(H, W)`` and trained with per-pixel cross-entropy (Adam, mini-batches). Only the 1x1 conv is
trained: the probe measures how linearly the frozen features separate the classes at every
location, the dense counterpart of the linear classification probe. Features are first
standardised per channel with the training set's statistics, so one learning rate fits any
encoder's scale (raw pixels included).

Scores come from a ``(K, K)`` confusion matrix accumulated over the test pixels: the IoU of
class ``k`` is ``TP / (TP + FP + FN)``; mIoU averages it over the classes present (those with
a non-empty union of prediction and ground truth), pixel accuracy is ``trace / total``.

Everything here works on tensors; it imports no data set, method or engine code.

References: the linear segmentation probe of frozen features as in Caron et al., "Emerging
Properties in Self-Supervised Vision Transformers" (DINO), ICCV 2021, and Oquab et al.,
"DINOv2", 2023 (linear head on patch tokens, logits upsampled to the mask size); mIoU as in
Everingham et al., "The PASCAL Visual Object Classes Challenge", IJCV 2010.
"""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SegmentationScores",
    "confusion_matrix",
    "dense_linear_probe",
    "mean_iou",
    "predict_masks",
    "segmentation_scores",
    "train_dense_probe",
]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = -100) -> Tensor:
    """``(K, K)`` int64 counts, rows = ground truth, columns = prediction, over the pixels
    whose target is not ``ignore_index`` (one ``bincount``, any shapes that match)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    pred, target = pred.reshape(-1).to(torch.int64), target.reshape(-1).to(torch.int64)
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target classes must lie in 0..{num_classes - 1} (or be ignore_index={ignore_index})")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"predicted classes must lie in 0..{num_classes - 1}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


class SegmentationScores(TypedDict):
    """Scores of a segmentation: fractions; ``iou`` per class, NaN for an absent class."""

    miou: float
    pixel_accuracy: float
    iou: list[float]


def segmentation_scores(confusion: Tensor) -> SegmentationScores:
    """``miou`` (mean IoU over the classes with a non-empty union), ``pixel_accuracy`` and
    ``iou`` (per class; NaN for an absent class) from a confusion matrix ``(K, K)``."""
    c = confusion.to(torch.float64)
    tp = c.diagonal()
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    total = float(c.sum())
    return {
        "miou": float(iou[present].mean()) if bool(present.any()) else float("nan"),
        "pixel_accuracy": float(tp.sum()) / total if total else float("nan"),
        "iou": iou.tolist(),
    }


def mean_iou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = -100) -> float:
    """Mean IoU of integer label maps ``pred`` and ``target`` (same shape, e.g. ``(N, H, W)``)
    over the classes present in either; pixels whose target is ``ignore_index`` are skipped."""
    return segmentation_scores(confusion_matrix(pred, target, num_classes, ignore_index))["miou"]


def _standardiser(features: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std ``(D,)`` over images and locations (float64 accumulation)."""
    d = features.shape[1]
    total = torch.zeros(d, dtype=torch.float64)
    sq = torch.zeros(d, dtype=torch.float64)
    for start in range(0, features.shape[0], batch):
        x = features[start : start + batch].to(torch.float64)
        total += x.sum((0, 2, 3))
        sq += x.square().sum((0, 2, 3))
    count = max(1, features.shape[0] * features.shape[2] * features.shape[3])
    mean = total / count
    std = (sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


class DenseProbe(nn.Module):
    """Standardisation (fixed buffers) and a 1x1 conv: ``(B, D, h, w) -> (B, K, h, w)``.

    The 1x1 conv is a :class:`~torch.nn.Linear` over the channel axis (channels-last
    matmul): the same map, several times faster on CPU than a 1x1 convolution kernel.
    """

    def __init__(self, mean: Tensor, std: Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.view(1, 1, 1, -1))
        self.register_buffer("std", std.view(1, 1, 1, -1))
        self.head = nn.Linear(mean.numel(), num_classes)

    def forward(self, features: Tensor) -> Tensor:
        mean: Tensor = self.mean  # type: ignore[assignment]
        std: Tensor = self.std  # type: ignore[assignment]
        x = (features.permute(0, 2, 3, 1) - mean) / std
        return self.head(x).permute(0, 3, 1, 2)


def _logits(probe: nn.Module, features: Tensor, size: tuple[int, int]) -> Tensor:
    """Probe logits upsampled (bilinear) to the mask size: ``(B, K, H, W)``."""
    logits = probe(features)
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


def train_dense_probe(
    features: Tensor,
    masks: Tensor,
    num_classes: int,
    *,
    epochs: int = 10,
    min_steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    ignore_index: int = -100,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> DenseProbe:
    """Train a :class:`DenseProbe` on frozen features.

    Args:
        features: ``(N, D, h, w)`` float features (on any device; batches are moved).
        masks: ``(N, H, W)`` integer class maps in ``0..num_classes - 1`` (or ``ignore_index``).
        num_classes: ``K``.
        epochs, batch_size, lr, weight_decay: Adam on the mean per-pixel cross-entropy.
        min_steps: run more epochs than ``epochs`` if needed to take at least this many
            optimiser steps (a small training set would otherwise stop far from the optimum).
        seed: seed of the initialisation and of the batch order.

    Returns:
        The trained probe (on ``device``, eval mode).
    """
    if features.ndim != 4 or masks.ndim != 3 or features.shape[0] != masks.shape[0]:
        raise ValueError(
            f"features must be (N, D, h, w) and masks (N, H, W) with the same N, "
            f"got {tuple(features.shape)} and {tuple(masks.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError("the dense probe needs at least one training image")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    mean, std = _standardiser(features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = DenseProbe(mean, std, num_classes).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    size = (int(masks.shape[1]), int(masks.shape[2]))
    n = features.shape[0]
    steps_per_epoch = -(-n // batch_size)
    probe.train()
    for _ in range(max(epochs, -(-min_steps // steps_per_epoch))):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = features[idx].to(device, torch.float32)
            y = masks[idx].to(device, torch.int64)
            loss = F.cross_entropy(_logits(probe, x, size), y, ignore_index=ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return probe.eval()


@torch.no_grad()
def predict_masks(probe: nn.Module, features: Tensor, size: tuple[int, int], batch_size: int = 256) -> Tensor:
    """``(N, H, W)`` int64 argmax class maps of the probe on features ``(N, D, h, w)`` (CPU)."""
    device = next(probe.parameters()).device
    parts = [
        _logits(probe, features[start : start + batch_size].to(device, torch.float32), size).argmax(1).cpu()
        for start in range(0, features.shape[0], batch_size)
    ]
    return torch.cat(parts) if parts else torch.empty((0, *size), dtype=torch.int64)


def dense_linear_probe(
    train_features: Tensor,
    train_masks: Tensor,
    test_features: Tensor,
    test_masks: Tensor,
    num_classes: int,
    *,
    epochs: int = 10,
    min_steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    ignore_index: int = -100,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> SegmentationScores:
    """Train the probe on the training features/masks, score it on the test ones.

    Returns:
        ``{"miou", "pixel_accuracy", "iou"}`` (fractions; ``iou`` per class, NaN if absent).
    """
    probe = train_dense_probe(
        train_features,
        train_masks,
        num_classes,
        epochs=epochs,
        min_steps=min_steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        ignore_index=ignore_index,
        seed=seed,
        device=device,
    )
    size = (int(test_masks.shape[1]), int(test_masks.shape[2]))
    pred = predict_masks(probe, test_features, size)
    return segmentation_scores(confusion_matrix(pred, test_masks, num_classes, ignore_index))
