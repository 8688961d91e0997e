"""End-to-end fine-tuning of an in-memory encoder through the training loop.

``selfsup eval finetune`` calls :func:`finetune`: it wraps a copy of the encoder in the
``finetune`` method (:class:`selfsup.methods.finetune.FineTune`) and trains it with
:class:`~selfsup.engine.loop.TrainingLoop`, the loop every pretraining run uses, then
measures top-1 on the test split under the deterministic evaluation view. ``--from-scratch``
runs the same recipe on a freshly initialised encoder of the same architecture, the
baseline that shows what pretraining is worth. (A config with ``method: {name: finetune,
init: {run: runs/<name>}}`` runs the same method as a full run, with a run folder,
checkpoints and resume.)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import nn

from selfsup.config import OptimConfig
from selfsup.data.base import ImageDataset
from selfsup.data.loader import EpochBatchSampler, iterate_batches, iterate_eval
from selfsup.engine.loop import DataBatch, LoopSchedule, TrainingLoop
from selfsup.engine.optim import build_optimizer
from selfsup.methods.finetune import FineTune
from selfsup.transforms import to_float

if TYPE_CHECKING:
    from selfsup.config import Config
    from selfsup.data.base import DataSplits
    from selfsup.methods.base import Method

__all__ = [
    "FinetuneRecipe",
    "adamw_epoch_loop",
    "finetune",
    "finetune_encoder",
    "finetune_model",
    "finetune_recipe",
    "top1",
]


class FinetuneRecipe(TypedDict):
    """The ``eval.finetune_*`` recipe of a config, as keyword arguments of :func:`finetune`
    and :func:`finetune_model` (see :func:`finetune_recipe`)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    layer_decay: float
    label_smoothing: float
    warmup_epochs: float
    seed: int
    precision: str


def finetune_recipe(cfg: Config, precision: str) -> FinetuneRecipe:
    """The ``eval.finetune_*`` recipe of ``cfg`` (seeded by ``train.seed``), to pass on as
    ``**finetune_recipe(cfg, parts.precision)``; ``precision`` is ``train.precision`` already
    resolved for the device (``Components.precision``), so ``"auto"`` is decided once per
    command, as for pretraining."""
    e = cfg.eval
    return FinetuneRecipe(
        epochs=e.finetune_epochs,
        batch_size=e.finetune_batch_size,
        lr=e.finetune_lr,
        weight_decay=e.finetune_weight_decay,
        layer_decay=e.finetune_layer_decay,
        label_smoothing=e.finetune_label_smoothing,
        warmup_epochs=e.finetune_warmup_epochs,
        seed=cfg.train.seed,
        precision=precision,
    )


def adamw_epoch_loop(
    method: Method,
    num_samples: int,
    train_views: nn.Module,
    device: torch.device,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_epochs: float,
    seed: int,
    precision: str,
    clip_grad: float = 0.0,
) -> tuple[TrainingLoop, EpochBatchSampler]:
    """The shared loop for ``epochs`` over ``num_samples`` samples: AdamW at a constant
    ``weight_decay``, linear warm-up then cosine decay from ``lr`` (used as given), and the
    seeded batch sampler the caller iterates; ``(loop, sampler)``."""
    optimizer = build_optimizer(method.param_groups(), OptimConfig(name="adamw", weight_decay=weight_decay), lr)
    sampler = EpochBatchSampler(num_samples, min(batch_size, num_samples), seed=seed)
    steps_per_epoch = len(sampler)
    schedule = LoopSchedule(
        total_steps=epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        peak_lr=lr,
        warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
        weight_decay=(weight_decay, weight_decay),
    )
    loop = TrainingLoop(
        method,
        optimizer,
        schedule,
        train_views,
        device,
        precision=precision,
        clip_grad=clip_grad,
        num_samples=num_samples,
    )
    return loop, sampler


@torch.no_grad()
def top1(
    method: FineTune, dataset: ImageDataset, eval_views: nn.Module, device: torch.device, batch_size: int
) -> float:
    """Top-1 accuracy of ``method.classify`` on ``dataset`` (eval mode, deterministic view)."""
    method.eval()
    hits, total = 0, 0
    for images, labels, _ in iterate_eval(dataset, batch_size):
        x = eval_views(to_float(images.to(device)))[0]
        hits += int((method.classify(x).argmax(dim=1) == labels.to(device)).sum())
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
    precision: str = "fp32",
    clip_grad: float = 0.0,
) -> dict[str, float]:
    """Fine-tune a copy of ``encoder`` with a linear head on the training loop; return test top-1.

    The encoder itself is not modified (a deep copy is trained, every parameter trainable).

    Args:
        encoder: ``(B, C, H, W) -> (B, num_features)`` pretrained (or fresh) encoder.
        num_features: ``D``, the encoder's output width (checked against the encoder's).
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
        precision: ``"fp32"`` or ``"bf16"`` autocast.
        clip_grad: max gradient norm (0 = none).

    Returns:
        ``{"finetune_top1": test accuracy in [0, 1], "finetune_train_loss": mean loss of the
        last epoch}``.
    """
    method, train_loss = finetune_model(
        encoder,
        num_features,
        train_dataset,
        num_classes,
        train_views=train_views,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        label_smoothing=label_smoothing,
        warmup_epochs=warmup_epochs,
        device=device,
        seed=seed,
        precision=precision,
        clip_grad=clip_grad,
    )
    return {
        "finetune_top1": top1(method, test_dataset, eval_views, torch.device(device), batch_size),
        "finetune_train_loss": train_loss,
    }


def finetune_model(
    encoder: nn.Module,
    num_features: int,
    train_dataset: ImageDataset,
    num_classes: int,
    *,
    train_views: nn.Module,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
    label_smoothing: float = 0.1,
    warmup_epochs: float = 1.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    precision: str = "fp32",
    clip_grad: float = 0.0,
) -> tuple[FineTune, float]:
    """:func:`finetune`'s training alone: ``(the trained FineTune method, mean loss of the last
    epoch)``, for callers that keep the classifier (SimCLR v2's distillation teacher)."""
    device = torch.device(device)
    if int(getattr(encoder, "num_features", num_features)) != num_features:
        raise ValueError(f"num_features={num_features} but the encoder gives {encoder.num_features}")
    torch.manual_seed(seed)
    method = FineTune(copy.deepcopy(encoder), num_classes, label_smoothing, layer_decay).to(device)
    loop, sampler = adamw_epoch_loop(
        method,
        len(train_dataset),
        train_views,
        device,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        seed=seed,
        precision=precision,
        clip_grad=clip_grad,
    )
    steps_per_epoch = len(sampler)

    def batches() -> Iterator[DataBatch]:
        for epoch in range(epochs):
            for triple in iterate_batches(train_dataset, sampler, epoch):
                yield DataBatch.from_triple(triple)

    losses: list[float] = []

    def record(info: object, parts: Mapping[str, float], seen: int) -> None:
        if info.step % steps_per_epoch == 0:  # type: ignore[attr-defined]
            losses.clear()  # keep the last epoch's
        if parts:
            losses.append(parts["loss"])

    method.train()
    loop.run(batches(), on_step=record)
    return method, sum(losses) / len(losses) if losses else math.nan


def finetune_encoder(method: Method, cfg: Config, splits: DataSplits, from_scratch: bool = False) -> nn.Module:
    """The encoder to fine-tune: the pretrained ``method.embedder()`` (what ``embed`` and
    ``method.num_features`` describe: ``eval_backbone``, or a method's own encoder such as
    SimCLR v2's backbone plus the head's first layer), or with ``from_scratch`` the same
    encoder built untrained, initialised from ``cfg.train.seed`` (the random-init baseline).
    Either way on the device of the method's parameters."""
    if not from_scratch:
        return method.embedder()[0]
    from selfsup.engine.build import random_init_encoder

    device = next(method.parameters()).device
    return random_init_encoder(cfg, splits, method).to(device)
