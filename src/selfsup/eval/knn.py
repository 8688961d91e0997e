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

from selfsup.eval.neighbors import faiss_index, faiss_search, resolve_backend

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
    backend: str,
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
    resolve_backend(backend)


# Similarities per block: rows x N values (279 rows x 60k train = 64 MB in float32). Fewer rows
# keep the block in cache for the top-k passes but make the product re-read the whole training
# matrix per block: 64 rows lost 1.5x on 784-d raw pixels, and 280 rows cost 256-d features ~10%.
_BLOCK_ELEMENTS = 1 << 24


def _block_rows(chunk_size: int, n_train: int) -> int:
    """Test rows per similarity block: ``chunk_size`` capped at ``_BLOCK_ELEMENTS // N``."""
    return max(1, min(chunk_size, _BLOCK_ELEMENTS // max(n_train, 1)))


def _group_size(n: int, k: int) -> int:
    """Columns per group for :func:`_grouped_topk`: ``~sqrt(N / k)``, which balances the
    ``N / B`` group maxima against the ``k * B`` candidates, preferring (within a factor 1.5)
    a divisor of ``N`` so that no padding copy is needed; 1 (a plain top-k) when tiny."""
    ideal = (n / k) ** 0.5
    group = max(1, int(round(ideal)))
    divisors = [b for b in range(max(1, int(ideal / 1.5)), int(ideal * 1.5) + 1) if n % b == 0 and n // b >= k]
    if divisors:
        group = min(divisors, key=lambda b: abs(b - ideal))
    return group if -(-n // group) >= k else 1


def _grouped_topk(sim: Tensor, k: int, group: int) -> tuple[Tensor, Tensor]:
    """``sim.topk(k, dim=1)`` (values sorted descending, column indices) via group maxima.

    ``sim`` is ``(C, B * G)`` with ``B = group`` (padding columns hold -inf); group ``g``
    is the columns ``g, g + G, g + 2G, ...``, so the ``(C, G)`` group maxima are ``B - 1``
    element-wise maxima of contiguous rows (one vectorised pass). Let ``t`` be the k-th
    largest of the ``G >= k`` group maxima: the k groups with the largest maxima hold k
    values ``>= t`` and every value ``> t`` (its group's maximum is ``> t``), so the top k
    of their ``k * B`` columns is the exact top k, ties at ``t`` aside. That pass plus
    top-k's over ``G + k * B ~ 2 sqrt(N k)`` values per row replace a top-k over all ``N``.
    """
    if group == 1:
        return sim.topk(k, dim=1)
    rows, width = sim.shape
    groups = width // group
    best_groups = sim.view(rows, group, groups).amax(dim=1).topk(k, dim=1, sorted=False).indices  # (C, k)
    offsets = torch.arange(0, width, groups, device=sim.device)  # (B,)
    columns = (best_groups[:, :, None] + offsets).reshape(rows, k * group)
    values, pos = sim.gather(1, columns).topk(k, dim=1)
    return values, columns.gather(1, pos)


def _votes(
    sim: Tensor, neighbour_labels: Tensor, ks: list[int], temperature: float, num_classes: int
) -> dict[int, Tensor]:
    """``{k: (C, num_classes) votes}`` from the ``(C, k_max)`` neighbours, sorted by similarity.

    One scatter-add fills the votes of each slice ``[k_{i-1}, k_i)`` of the neighbour list
    in its own class block; a cumulative sum over the slices gives every k at once.
    """
    rows = sim.shape[0]
    weights = (sim / temperature).exp()
    slice_of = torch.zeros(ks[-1], dtype=torch.int64, device=sim.device)
    for i, kk in enumerate(ks[:-1]):
        slice_of[kk:] = i + 1
    target = neighbour_labels + slice_of * num_classes
    flat = torch.zeros(rows, len(ks) * num_classes, dtype=sim.dtype, device=sim.device)
    flat.scatter_add_(1, target, weights)
    per_k = flat.view(rows, len(ks), num_classes).cumsum(dim=1)
    return {kk: per_k[:, i] for i, kk in enumerate(ks)}


def _knn_votes(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    ks: list[int],
    temperature: float,
    num_classes: int,
    chunk_size: int,
    backend: str = "auto",
) -> Iterator[tuple[int, int, dict[int, Tensor]]]:
    """Yield ``(start, end, {k: votes (end - start, num_classes)})`` per chunk of test rows.

    ``votes[i, c] = sum over the k most cosine-similar training samples j with label c of
    exp(sim(i, j) / temperature)``. The search runs once with the largest k: neighbours come
    sorted by similarity, so the first k of them are exactly the top-k for every smaller k.
    With faiss (float32 on CPU) one ``IndexFlatIP`` index serves every chunk; otherwise only
    a block of ``(rows, N)`` similarities (``_BLOCK_ELEMENTS`` values) exists at a time.
    """
    device = train_features.device
    # float32 at least (half precision similarities tie far too often); float64 is kept.
    dtype = torch.promote_types(train_features.dtype, torch.float32)
    train = F.normalize(train_features.to(dtype), dim=1)
    labels = train_labels.to(device=device, dtype=torch.int64)
    k_max = ks[-1]
    use_faiss = device.type == "cpu" and dtype == torch.float32 and resolve_backend(backend) == "faiss"
    n = train.shape[0]
    group = _group_size(n, k_max)
    if use_faiss:
        index = faiss_index(train)
    else:
        # (G * B, D): zero rows pad the training set to whole groups (rows, not a transposed
        # copy: the product reads ``train_pad.T`` as a transposed operand for free).
        pad = -(-n // group) * group - n
        train_pad = F.pad(train, (0, 0, 0, pad)) if pad else train
        rows = _block_rows(chunk_size, train_pad.shape[0])
    for start in range(0, test_features.shape[0], chunk_size):
        end = min(start + chunk_size, test_features.shape[0])
        query = F.normalize(test_features[start:end].to(device=device, dtype=dtype), dim=1)
        if use_faiss:
            sim, idx = faiss_search(index, query, k_max)
        else:
            parts = []
            for row in range(0, end - start, rows):
                block = query[row : row + rows] @ train_pad.T
                if pad:
                    block[:, n:] = float("-inf")  # the padding columns never win
                parts.append(_grouped_topk(block, k_max, group))  # (rows, k_max), sorted descending
            sim, idx = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        yield start, end, _votes(sim, labels[idx], ks, temperature, num_classes)


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int | Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    backend: str = "auto",
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
        chunk_size: test rows per search call (the torch search further cuts them into
            blocks of at most 16M similarities).
        backend: ``"faiss"`` (exact ``IndexFlatIP`` search; CPU float32 features only, others
            use torch), ``"torch"`` (blocked matrix products and a grouped top-k) or
            ``"auto"`` (faiss when installed). Both are exact: the same neighbours and
            predictions up to ties in the similarity and float rounding.

    Returns:
        ``{k: predictions (M,) int64 on CPU}`` for each requested k.

    References: Wu et al. 2018 (arXiv:1805.01978); Caron et al. 2021 (arXiv:2104.14294).
    """
    ks = _as_ks(k)
    _check_inputs(train_features, train_labels, test_features, ks, temperature, chunk_size, backend)
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    preds = {kk: torch.empty(test_features.shape[0], dtype=torch.int64) for kk in ks}
    for start, end, votes in _knn_votes(
        train_features, train_labels, test_features, ks, temperature, num_classes, chunk_size, backend
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
    backend: str = "auto",
) -> dict[str, float]:
    """Score weighted kNN classification of test features against their labels.

    Same vote as :func:`knn_predict` (use it to get predictions, e.g. for unlabelled
    test data). Accuracies are fractions in ``[0, 1]``.

    Args:
        train_features: ``(N, D)``; train_labels: ``(N,)``.
        test_features: ``(M, D)``; test_labels: ``(M,)``.
        k, temperature, num_classes, chunk_size, backend: as in :func:`knn_predict`; ``num_classes``
            defaults to ``max(train_labels.max(), test_labels.max()) + 1``.

    Returns:
        ``{"knn_top1@<k>": acc, ...}`` for every k, plus ``"knn_top5@<k>"`` when there are at
        least 5 classes (a hit when the true class is among the 5 largest vote totals).

    References: Wu et al. 2018 (arXiv:1805.01978); Caron et al. 2021 (arXiv:2104.14294).
    """
    ks = _as_ks(k)
    _check_inputs(train_features, train_labels, test_features, ks, temperature, chunk_size, backend)
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels must be ({test_features.shape[0]},), got {tuple(test_labels.shape)}")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    targets = test_labels.to(device=train_features.device, dtype=torch.int64)
    top1 = {kk: 0 for kk in ks}
    top5 = {kk: 0 for kk in ks}
    for start, end, votes in _knn_votes(
        train_features, train_labels, test_features, ks, temperature, num_classes, chunk_size, backend
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
