"""Clustering quality of features: k-means, then accuracy under the best label matching."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["cluster_accuracy", "clustering_metrics"]

ArrayLike = Tensor | np.ndarray | Sequence[int]


def _to_int_array(values: ArrayLike, name: str) -> np.ndarray:
    """Return a 1-D non-negative int64 NumPy array from a tensor, array or sequence."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0):
        raise ValueError(f"{name} must hold non-negative integers")
    return arr.astype(np.int64)


def cluster_accuracy(pred: ArrayLike, labels: ArrayLike) -> float:
    """Return the accuracy of cluster ids after the best one-to-one mapping onto labels.

    The mapping maximises the number of matched samples (Hungarian algorithm on the
    cluster-by-class contingency table); with more clusters than classes the unmatched
    clusters count as errors. Invariant to any permutation of cluster ids.

    Args:
        pred: ``(N,)`` cluster ids; labels: ``(N,)`` class labels.

    Returns:
        Accuracy as a fraction in ``[0, 1]``.

    References: Kuhn, "The Hungarian Method for the Assignment Problem", 1955; used as the
    clustering metric by Xie, Girshick & Farhadi, "Unsupervised Deep Embedding for
    Clustering Analysis", ICML 2016 (arXiv:1511.06335).
    """
    # Imported here so `import selfsup.eval` does not pay SciPy's import time.
    from scipy.optimize import linear_sum_assignment

    p = _to_int_array(pred, "pred")
    y = _to_int_array(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"pred and labels differ in length: {p.shape} vs {y.shape}")
    if p.size == 0:
        raise ValueError("pred and labels are empty")
    counts = np.zeros((p.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(counts, (p, y), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum()) / p.size


def clustering_metrics(
    features: Tensor,
    labels: Tensor,
    num_clusters: int | None = None,
    seed: int = 0,
    normalize: bool = True,
    n_init: int = 10,
) -> dict[str, float]:
    """Cluster ``(N, D)`` features with k-means and score the clusters against the labels.

    Args:
        features: ``(N, D)`` features.
        labels: ``(N,)`` ground-truth classes (used for scoring only).
        num_clusters: k of k-means; defaults to the number of distinct labels.
        seed: k-means ``random_state`` (its initialisations are drawn by scikit-learn).
        normalize: L2-normalise features first, so k-means compares directions as the
            cosine-trained encoders of this library do.
        n_init: k-means restarts; the lowest-inertia run is kept.

    Returns:
        ``{"cluster_acc": Hungarian-matched accuracy, "nmi": normalised mutual information,
        "ari": adjusted Rand index}``.

    References: Lloyd, "Least squares quantization in PCM", 1982 (k-means); Vinh, Epps &
    Bailey, JMLR 2010 (NMI); Hubert & Arabie, 1985 (ARI).
    """
    # Imported here so `import selfsup.eval` does not pay scikit-learn's import time.
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got {tuple(features.shape)}")
    y = _to_int_array(labels, "labels")
    if y.shape[0] != features.shape[0]:
        raise ValueError("features and labels differ in length")
    x = features.detach().to("cpu", torch.float64)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    k = int(num_clusters) if num_clusters is not None else int(np.unique(y).size)
    pred = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x.numpy())
    return {
        "cluster_acc": cluster_accuracy(pred, y),
        "nmi": float(normalized_mutual_info_score(y, pred)),
        "ari": float(adjusted_rand_score(y, pred)),
    }
