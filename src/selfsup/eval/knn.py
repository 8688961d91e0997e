"""Weighted k-nearest-neighbour classification of frozen features (cosine similarity).

References: Wu, Xiong, Yu & Lin, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", CVPR 2018 (arXiv:1805.01978); the same protocol as Caron et al., "Emerging
Properties in Self-Supervised Vision Transformers" (DINO), ICCV 2021 (arXiv:2104.14294).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_classify", "knn_predict"]


def _as_ks(k: int | Sequence[int]) -> list[int]:
    """Return the neighbour counts as a sorted list of unique positive ints."""
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(not isinstance(v, int) or v < 1 for v in ks):
        raise ValueError(f"k must be a positive int or a non-empty sequence of them, got {k}")
    return sorted(set(ks))


def _check_inputs(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    ks: list[int],
    temperature: float,
    chunk_size: int,
) -> None:
    """Raise ValueError on shape mismatches or invalid hyper-parameters."""
    if train_features.dim() != 2 or test_features.dim() != 2:
        raise ValueError("train_features and test_features must be (N, D) and (M, D)")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature dims differ: {train_features.shape[1]} vs {test_features.shape[1]}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must be ({train_features.shape[0]},), got {tuple(train_labels.shape)}")
    if ks[-1] > train_features.shape[0]:
        raise ValueError(f"k={ks[-1]} exceeds the {train_features.shape[0]} training samples")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _knn_votes(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    ks: list[int],
    temperature: float,
    num_classes: int,
    chunk_size: int,
) -> Iterator[tuple[int, int, dict[int, Tensor]]]:
    """Yield ``(start, end, {k: votes (end - start, num_classes)})`` per chunk of test rows.

    ``votes[i, c] = sum over the k most cosine-similar training samples j with label c of
    exp(sim(i, j) / temperature)``. Only a ``(chunk_size, N)`` similarity block exists at a
    time, and ``topk`` runs once with the largest k: neighbours come sorted by similarity, so
    the first k columns are exactly the top-k for every smaller k.
    """
    device = train_features.device
    # float32 at least (half precision similarities tie far too often); float64 is kept.
    dtype = torch.promote_types(train_features.dtype, torch.float32)
    train = F.normalize(train_features.to(dtype), dim=1)
    labels = train_labels.to(device=device, dtype=torch.int64)
    k_max = ks[-1]
    for start in range(0, test_features.shape[0], chunk_size):
        end = min(start + chunk_size, test_features.shape[0])
        query = F.normalize(test_features[start:end].to(device=device, dtype=dtype), dim=1)
        sim, idx = (query @ train.T).topk(k_max, dim=1)  # (C, k_max), sorted descending
        neighbour_labels = labels[idx]
        weights = (sim / temperature).exp()
        votes: dict[int, Tensor] = {}
        for k in ks:
            v = torch.zeros(end - start, num_classes, dtype=dtype, device=device)
            votes[k] = v.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
        yield start, end, votes


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int | Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """Predict test labels by a similarity-weighted vote of the k nearest training features.

    Features are L2-normalised; neighbours are the k training rows of highest cosine
    similarity; each votes for its label with weight ``exp(sim / temperature)``; the class
    with the largest summed weight wins (lowest class index on exact ties). Computed in
    chunks of ``chunk_size`` test rows, so memory is ``O(chunk_size * N)``, never ``M * N``.
    Runs on the device of ``train_features``.

    Args:
        train_features: ``(N, D)`` features of the labelled set.
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(M, D)`` features to classify.
        k: neighbour count(s); every k must be ``<= N``. Defaults quote DINO (20) and
            Wu et al. (200).
        temperature: vote temperature, 0.07 as in Wu et al. and DINO.
        num_classes: number of classes; defaults to ``max(train_labels) + 1``.
        chunk_size: test rows per similarity block.

    Returns:
        ``{k: predictions (M,) int64 on CPU}`` for each requested k.

    References: Wu et al. 2018 (arXiv:1805.01978); Caron et al. 2021 (arXiv:2104.14294).
    """
    ks = _as_ks(k)
    _check_inputs(train_features, train_labels, test_features, ks, temperature, chunk_size)
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    preds = {kk: torch.empty(test_features.shape[0], dtype=torch.int64) for kk in ks}
    for start, end, votes in _knn_votes(
        train_features, train_labels, test_features, ks, temperature, num_classes, chunk_size
    ):
        for kk, v in votes.items():
            preds[kk][start:end] = v.argmax(dim=1).cpu()
    return preds


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int | Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Score weighted kNN classification of test features against their labels.

    Same vote as :func:`knn_predict` (use it to get predictions, e.g. for unlabelled
    test data). Accuracies are fractions in ``[0, 1]``.

    Args:
        train_features: ``(N, D)``; train_labels: ``(N,)``.
        test_features: ``(M, D)``; test_labels: ``(M,)``.
        k, temperature, num_classes, chunk_size: as in :func:`knn_predict`; ``num_classes``
            defaults to ``max(train_labels.max(), test_labels.max()) + 1``.

    Returns:
        ``{"knn_top1@<k>": acc, ...}`` for every k, plus ``"knn_top5@<k>"`` when there are at
        least 5 classes (a hit when the true class is among the 5 largest vote totals).

    References: Wu et al. 2018 (arXiv:1805.01978); Caron et al. 2021 (arXiv:2104.14294).
    """
    ks = _as_ks(k)
    _check_inputs(train_features, train_labels, test_features, ks, temperature, chunk_size)
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels must be ({test_features.shape[0]},), got {tuple(test_labels.shape)}")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    targets = test_labels.to(device=train_features.device, dtype=torch.int64)
    top1 = {kk: 0 for kk in ks}
    top5 = {kk: 0 for kk in ks}
    for start, end, votes in _knn_votes(
        train_features, train_labels, test_features, ks, temperature, num_classes, chunk_size
    ):
        target = targets[start:end, None]
        for kk, v in votes.items():
            top1[kk] += int((v.argmax(dim=1, keepdim=True) == target).sum())
            if num_classes >= 5:
                top5[kk] += int((v.topk(5, dim=1).indices == target).any(dim=1).sum())

    m = max(test_features.shape[0], 1)
    metrics: dict[str, float] = {}
    for kk in ks:
        metrics[f"knn_top1@{kk}"] = top1[kk] / m
        if num_classes >= 5:
            metrics[f"knn_top5@{kk}"] = top5[kk] / m
    return metrics
