"""Raw-pixel baseline features and a one-call evaluation of any feature set."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from selfsup.eval.clustering import clustering_metrics
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_classify
from selfsup.eval.linear import DEFAULT_WEIGHT_DECAYS, linear_probe
from selfsup.monitors import effective_rank, feature_std

__all__ = ["evaluate_features", "raw_pixel_features"]


def _to_unit_float(images: Tensor) -> Tensor:
    """Return float32 images; uint8 ones are scaled from [0, 255] to [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def _flatten(images: Tensor) -> Tensor:
    """Return ``(B, C*H*W)`` from ``(B, C, H, W)`` (the identity 'encoder' of the baseline)."""
    return images.reshape(images.shape[0], -1)


def raw_pixel_features(
    batches: Iterable[Sequence[Any]],
    preprocess: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Return flattened pixels as features: the baseline every learned encoder must beat.

    Args:
        batches: iterable of ``(images (B, C, H, W), labels (B,), ...)``.
        preprocess: applied to each image batch; by default uint8 images are scaled to
            [0, 1] and float images are kept as they are. Pass the same normalisation the
            encoders see for a like-for-like comparison.

    Returns:
        ``features`` ``(N, C*H*W)`` float32 and ``labels`` ``(N,)`` int64, on CPU.
    """
    return extract_features(_flatten, batches, preprocess=preprocess if preprocess is not None else _to_unit_float)


def evaluate_features(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int | None = None,
    knn_k: int | Sequence[int] = (20, 200),
    knn_temperature: float = 0.07,
    linear: bool = True,
    linear_epochs: int = 100,
    linear_weight_decay: float | Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    clustering: bool = False,
    collapse_monitors: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Run weighted kNN, the linear probe and optionally k-means on one feature set.

    Values of ``knn_k`` larger than the training set are dropped with a warning, so the
    defaults also work on tiny sets.

    Args:
        train_features: ``(N, D)``; train_labels: ``(N,)``.
        test_features: ``(M, D)``; test_labels: ``(M,)``.
        num_classes: defaults to ``max(train, test labels) + 1``.
        knn_k, knn_temperature: see :func:`~selfsup.eval.knn.knn_classify`.
        linear: run :func:`~selfsup.eval.linear.linear_probe`.
        linear_epochs, linear_weight_decay: its ``epochs`` and ``weight_decay``.
        clustering: run :func:`~selfsup.eval.clustering.clustering_metrics` on the test
            features with ``num_classes`` clusters.
        collapse_monitors: add ``feature_std`` and ``effective_rank`` of the test features
            (:mod:`selfsup.monitors`: ~1/sqrt(D) and up to D when spread, 0 and 1 when
            collapsed).
        seed: seeds the linear probe's validation split and k-means.

    Returns:
        One flat dict: ``knn_top1@<k>``, ``knn_top5@<k>``, ``linear_top1``, ``linear_top5``,
        ``linear_weight_decay``, ``linear_val_top1``, ``cluster_acc``, ``nmi``, ``ari``,
        ``feature_std``, ``effective_rank`` (those that apply). Accuracies are fractions in ``[0, 1]``.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    ks = [knn_k] if isinstance(knn_k, int) else list(knn_k)
    usable = [k for k in ks if k <= train_features.shape[0]]
    if len(usable) < len(ks):
        warnings.warn(
            f"dropping kNN k > {train_features.shape[0]} training samples: {sorted(set(ks) - set(usable))}",
            stacklevel=2,
        )
    metrics: dict[str, float] = {}
    if usable:
        metrics.update(
            knn_classify(
                train_features,
                train_labels,
                test_features,
                test_labels,
                k=usable,
                temperature=knn_temperature,
                num_classes=num_classes,
            )
        )
    if linear:
        result = linear_probe(
            train_features,
            train_labels,
            test_features,
            test_labels,
            num_classes=num_classes,
            epochs=linear_epochs,
            weight_decay=linear_weight_decay,
            seed=seed,
        )
        assert isinstance(result, dict)
        metrics.update(result)
    if clustering:
        metrics.update(clustering_metrics(test_features, test_labels, num_classes, seed=seed))
    if collapse_monitors:
        metrics["feature_std"] = feature_std(test_features)
        metrics["effective_rank"] = effective_rank(test_features)
    return metrics
