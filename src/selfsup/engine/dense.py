"""``selfsup eval dense``: a linear segmentation probe on a run's frozen spatial features.

The run's encoder (``method.eval_backbone``) gives feature maps ``(N, D, h, w)``
(:func:`selfsup.nn.backbones.protocol.feature_map`) of the un-augmented eval view of the
training and test images; a 1x1-conv probe is trained on the training split's semantic masks
and scored on the test split (mIoU, pixel accuracy; :mod:`selfsup.eval.dense`). With
``baselines`` the same probe runs on a random-init encoder of the same architecture (seeded by
``train.seed``) and on the raw (normalised) pixels, where the probe is a per-pixel colour
classifier: what a linear read-out gets without any learned context.

It needs a data set with masks, i.e. one whose splits have ``get_masks(indices)`` and
``num_mask_classes`` (the synthetic ``scenes`` set; ``image-folder`` with ``masks``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from selfsup.config import ConfigError
from selfsup.data.base import ImageDataset
from selfsup.data.loader import iterate_eval
from selfsup.engine.build import random_init_encoder
from selfsup.engine.evaluation import eval_mode
from selfsup.engine.protocols import encoder_row_names
from selfsup.eval.dense import dense_linear_probe
from selfsup.nn.backbones.protocol import feature_map
from selfsup.transforms import to_float

if TYPE_CHECKING:
    from selfsup.config import Config
    from selfsup.data.base import DataSplits
    from selfsup.methods.base import Method

__all__ = ["DENSE_COLUMNS", "check_masks", "dense_features", "dense_rows"]

#: The metrics of a dense row (fractions, shown in percent).
DENSE_COLUMNS = ("dense_miou", "dense_pixel_acc")


def check_masks(splits: DataSplits) -> int:
    """The number of mask classes of ``splits``, or a one-line :class:`ConfigError` when its
    data set has no segmentation masks."""
    for split in (splits.train, splits.test):
        if not callable(getattr(split, "get_masks", None)) or not hasattr(split, "num_mask_classes"):
            raise ConfigError(
                f"dense needs a data set with masks (scenes); data.name={splits.name!r} has none "
                "(run it on data.name=scenes, or image-folder with data.masks=<mask folder>)"
            )
    return int(splits.train.num_mask_classes)  # type: ignore[attr-defined]


@torch.no_grad()
def dense_features(
    spatial: Callable[[Tensor], Tensor],
    dataset: ImageDataset,
    eval_views: nn.Module,
    device: torch.device,
    batch_size: int = 256,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """Spatial features ``(N, D, h, w)`` float32 (CPU) and int64 masks ``(N, H, W)`` of a split.

    ``spatial`` maps the eval view's images ``(B, C, H, W)`` to ``(B, D, h, w)``.
    """
    get_masks: Callable[[Tensor], Tensor] = getattr(dataset, "get_masks")  # noqa: B009 (checked by check_masks)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    features, masks = [], []
    for images, _, indices in iterate_eval(dataset, batch_size):
        x = eval_views(to_float(images.to(device, non_blocking=True)))[0]
        with autocast:
            features.append(spatial(x).float().cpu())
        masks.append(get_masks(indices))
    if not features:
        raise ConfigError("dense: the split has no images")
    return torch.cat(features), torch.cat(masks)


def dense_rows(
    method: Method,
    cfg: Config,
    splits: DataSplits,
    eval_views: nn.Module,
    device: torch.device,
    baselines: bool = False,
    max_train: int | None = 10_000,
    lr: float = 1e-2,
    *,
    precision: str,
) -> dict[str, dict[str, float]]:
    """``{row: {"dense_miou", "dense_pixel_acc"}}`` for the run's encoder and, with
    ``baselines``, a random-init encoder of the same architecture and raw pixels.

    Args:
        precision: ``train.precision`` resolved for the device (``Components.precision``).
        max_train: images of the training split the probe is trained on (the first ones;
            bounds the memory of the stored feature maps); ``None`` for all.
        lr: the probe's Adam learning rate; its length is ``eval.dense_epochs`` and
            ``eval.dense_min_steps`` (:func:`selfsup.eval.dense.dense_linear_probe`).
    """
    num_classes = check_masks(splits)
    train_set = splits.train
    if max_train is not None and len(train_set) > max_train:
        train_set = train_set.subset(range(max_train))
    run_row, random_row = encoder_row_names(cfg, method)
    # The module that computes embed: colorization's lightness encoder, not its bare backbone.
    backbone, _ = method.embedder()
    if not (hasattr(backbone, "forward_tokens") or hasattr(backbone, "forward_features")):
        raise ConfigError(
            f"dense needs spatial features, and the encoder of method {cfg.method['name']!r} "
            f"({type(backbone).__name__}) gives none (only pooled features)"
        )
    encoders: list[tuple[str, Callable[[Tensor], Tensor], nn.Module]] = [
        (run_row, lambda x: feature_map(backbone, x), method)
    ]
    if baselines:
        random_init = random_init_encoder(cfg, splits, method).to(device)
        encoders.append((random_row, lambda x: feature_map(random_init, x), random_init))
        identity = nn.Identity()
        encoders.append(("raw pixels", identity, identity))
    e = cfg.eval
    rows: dict[str, dict[str, float]] = {}
    for name, spatial, module in encoders:
        with eval_mode(module):
            train = dense_features(spatial, train_set, eval_views, device, e.batch_size, precision)
            test = dense_features(spatial, splits.test, eval_views, device, e.batch_size, precision)
        scores = dense_linear_probe(
            *train,
            *test,
            num_classes,
            epochs=e.dense_epochs,
            min_steps=e.dense_min_steps,
            lr=lr,
            seed=cfg.train.seed,
            device=device,
        )
        rows[name] = {"dense_miou": scores["miou"], "dense_pixel_acc": scores["pixel_accuracy"]}
    return rows
